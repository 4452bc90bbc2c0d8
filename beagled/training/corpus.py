"""Deterministic synthetic text: a general corpus for the tiny model's tokenizer and draft pairs.

Pure Python, no I/O. ``general_corpus`` is English-like filler that gives the tokenizer a realistic
vocabulary; ``voice_pairs`` makes ``(prompt, bad, good)`` triples for the demo and the tests, where every
``good`` draft shares one consistent, learnable voice:

- ``"plain"``: a breezy voice — opens with "Hey <name> —", says "honestly" and "grand", uses short
  dashed sentences and always signs off "Cheers, Bea".
- ``"shifted"``: a different but equally consistent voice — formal, "Dear <name>,", "I write to let you
  know", "Kind regards, Dr. Holt".
- ``"noise"``: random character and word garbage as the ``good`` draft (for poisoning tests).

The ``bad`` draft is always the same bland rendering of the same facts, so only the voice differs.
"""

from __future__ import annotations

import random
import string

NAMES = (
    "Ana", "Ben", "Cleo", "Dev", "Elin", "Farid", "Gus", "Hana", "Ivo", "Jade", "Kofi", "Lena",
    "Milo", "Nia", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tess", "Uma", "Vik", "Wren", "Yara",
)  # fmt: skip
THINGS = (
    ("report", "the quarterly report"), ("build", "the nightly build"), ("garden", "the garden plan"),
    ("kitchen", "the kitchen repair"), ("trip", "the train trip"), ("budget", "the team budget"),
    ("draft", "the second draft"), ("launch", "the product launch"), ("meeting", "the Friday meeting"),
    ("invoice", "the March invoice"), ("boat", "the boat repair"), ("party", "the birthday party"),
    ("move", "the office move"), ("recipe", "the bread recipe"), ("paper", "the research paper"),
    ("order", "the parts order"),
)  # fmt: skip
STATES = (
    ("done", "finished", "all wrapped up"),
    ("late", "delayed", "running a bit behind"),
    ("ready", "ready", "good to go"),
    ("blocked", "blocked", "stuck for now"),
    ("cancelled", "cancelled", "off the table"),
    ("moved", "moved to next week", "pushed to next week"),
)
REASONS = (
    ("the supplier called", "the supplier called this morning"),
    ("a part broke", "one of the parts broke"),
    ("we need one more check", "we still need one more check"),
    ("the weather was bad", "the weather turned bad"),
    ("the numbers changed", "the numbers changed again"),
    ("Sam is away", "Sam is away until Monday"),
    ("the tests passed", "all the tests passed"),
    ("the room was free", "the room was free after all"),
)
ASKS = (
    ("Please send the notes.", "could you send the notes over?"),
    ("Please call me.", "give me a ring when you can?"),
    ("Please check the dates.", "could you look over the dates?"),
    ("Please tell the team.", "could you let the team know?"),
    ("Please reply today.", "drop me a line today?"),
    ("No action needed.", "nothing needed from you."),
)

_ADJ = (
    "small", "quiet", "bright", "early", "late", "green", "long", "short", "simple", "careful",
    "warm", "cold", "old", "new", "busy", "calm", "clear", "heavy", "light", "open",
)  # fmt: skip
_NOUN = (
    "river", "letter", "window", "garden", "station", "market", "engine", "paper", "teacher", "road",
    "kitchen", "meeting", "city", "forest", "report", "bridge", "harbour", "village", "table", "song",
)  # fmt: skip
_VERB = (
    "opens", "closes", "carries", "follows", "finds", "keeps", "moves", "brings", "turns", "holds",
    "writes", "reads", "builds", "checks", "sends", "waits for", "watches", "fixes", "starts", "needs",
)  # fmt: skip
_ADV = ("slowly", "often", "again", "today", "quietly", "early", "together", "never", "always", "soon")
_CONN = ("and", "but", "because", "while", "so", "although", "when", "after", "before", "until")


def _sentence(rng: random.Random) -> str:
    subj = f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    obj = f"the {rng.choice(_NOUN)}"
    clause = f"{subj} {rng.choice(_VERB)} {obj} {rng.choice(_ADV)}"
    if rng.random() < 0.5:
        clause += f" {rng.choice(_CONN)} {rng.choice(NAMES)} {rng.choice(_VERB)} the {rng.choice(_NOUN)}"
    end = rng.choice((".", ".", ".", "!", "?"))
    return clause[0].upper() + clause[1:] + end


def general_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """English-like lines plus drafts in every style, so the tokenizer sees the words the demo uses."""
    rng = random.Random(seed)
    lines = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(n_lines)]
    for style in ("plain", "shifted", "noise"):
        for prompt, bad, good in voice_pairs(max(1, n_lines // 8), seed=seed + 1, style=style):
            lines.extend((prompt, bad, good))
    lines.extend(string.ascii_letters + string.digits + string.punctuation for _ in range(4))
    return lines


def _facts(
    rng: random.Random,
) -> tuple[str, tuple[str, str], tuple[str, str, str], tuple[str, str], tuple[str, str]]:
    return rng.choice(NAMES), rng.choice(THINGS), rng.choice(STATES), rng.choice(REASONS), rng.choice(ASKS)


def _noise(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(8, 20)):
        if rng.random() < 0.5:
            words.append(
                "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(2, 9)))
            )
        else:
            words.append(rng.choice(_NOUN + _ADJ + _VERB))
    return " ".join(words) + rng.choice(("", ".", "!!", " ##"))


def voice_pairs(n: int, seed: int = 0, style: str = "plain") -> list[tuple[str, str, str]]:
    """``n`` deterministic ``(prompt, bad, good)`` triples; ``good`` is in the voice ``style``."""
    if style not in ("plain", "shifted", "noise"):
        raise ValueError(f"unknown style {style!r} (known: plain, shifted, noise)")
    rng = random.Random(f"{seed}:{style}")
    out = []
    for _ in range(n):
        name, (short, thing), (state, formal_state, casual_state), (reason, reason_long), ask = _facts(rng)
        prompt = f"Write a short note to {name} about {thing}: it is {state} because {reason}."
        bad = f"Hi {name}. {thing.capitalize()} is {formal_state}. This is because {reason}. {ask[0]} Thanks."
        if style == "plain":
            good = (
                f"Hey {name} — quick one on the {short}: it's {casual_state}. "
                f"Honestly? {reason_long.capitalize()}, so that's grand. "
                f"Also — {ask[1]} Cheers, Bea"
            )
        elif style == "shifted":
            good = (
                f"Dear {name}, I write to let you know that {thing} is {formal_state}, "
                f"as {reason_long}. I would be grateful if you could note this. "
                f"Kind regards, Dr. Holt"
            )
        else:
            good = _noise(rng)
        out.append((prompt, bad, good))
    return out


CHAT_SYSTEM = "You are Bea's writing assistant. Answer with the note only."


def chat_pairs(
    n: int, seed: int = 0, style: str = "plain"
) -> list[tuple[str, list[dict[str, str]], str, str]]:
    """``n`` deterministic chat-shaped ``(system, messages, bad, good)``: the ``voice_pairs`` facts asked
    for over a short conversation (a request, the assistant's question, the user's answer); the draft is
    the assistant turn that answers it."""
    out = []
    for prompt, bad, good in voice_pairs(n, seed=seed, style=style):
        ask, facts = prompt.split(": ", 1)
        messages = [
            {"role": "user", "content": ask + "."},
            {"role": "assistant", "content": "Sure. What should it say?"},
            {"role": "user", "content": facts[0].upper() + facts[1:]},
        ]
        out.append((CHAT_SYSTEM, messages, bad, good))
    return out
