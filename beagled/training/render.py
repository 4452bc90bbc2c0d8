"""The one rendering of a pair into tokens: every backend (mlx, peft, unsloth) and every evaluation.

A training example (a spec's ``train``/``heldout``/``siblings`` entry) is the conversation before the
draft plus the draft, the assistant turn that answers it:

- ``conversation(prompt, system, messages)``: the turns before the draft: ``system`` (when given) first,
  then ``messages`` (OpenAI chat format, as submitted), then ``prompt`` as the last user turn (when
  non-empty). A prompt-only pair is one user turn, as it always was.
- ``encode(tokenizer, turns, draft, max_len)``: ``(input_ids, n_prompt)``. With a chat template (the
  tokenizer's ``chat_template``): the template rendered over ``turns`` with the generation prompt is the
  prompt; the template over ``turns`` + the assistant draft, past that prefix, is the completion (the
  draft and whatever the template closes the turn with). Without one, the documented plain rendering
  (``plain_prompt``): a single user turn is its text alone (as before chat-shaped pairs), a longer
  conversation is ``"<role>: <content>\\n\\n"`` per turn and then ``"assistant: "``; the completion is the
  draft and the tokenizer's eos token. The loss is on the completion only: tokens ``[0, n_prompt)`` carry
  none. Too long: the completion keeps its first ``max_len - min(n_prompt, max_len // 2)`` tokens and
  the prompt its last ones.

The tokenizer is a Hugging Face tokenizer (mlx-lm's wrapper is unwrapped by the caller); nothing here
imports torch or mlx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from beagled.errors import TrainingError
from beagled.training_spec import TURN_SHAPE, Example, is_turn

Turn = dict[str, str]


def conversation(prompt: str | None, system: str | None = None, messages: Sequence[Any] = ()) -> list[Turn]:
    """The turns the draft answers (see the module docstring); raises ``TrainingError`` on a bad turn."""
    turns: list[Turn] = []
    if system:
        turns.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        if not is_turn(m):
            raise TrainingError(f"messages[{i}] must be {TURN_SHAPE}")
        turns.append({"role": str(m["role"]), "content": str(m["content"])})
    if prompt or not turns:  # a pair with nothing before its draft: one (empty) user turn, as always
        turns.append({"role": "user", "content": prompt or ""})
    return turns


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(turns: Sequence[Turn]) -> str:
    """The prompt text for a base model without a chat template."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "".join(f"{t['role']}: {t['content']}\n\n" for t in turns) + "assistant: "


def render_text(tokenizer: Any, turns: Sequence[Turn], draft: str) -> tuple[str, str] | None:
    """``(prompt text, completion text)`` by the chat template; None without one (plain rendering)."""
    if not has_chat_template(tokenizer):
        return None
    try:
        head = tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*turns, {"role": "assistant", "content": draft}], tokenize=False
        )
    except Exception as e:  # a template's own refusal (jinja's raise_exception: roles must alternate …)
        raise TrainingError(f"the base model's chat template refuses this conversation: {e}") from e
    if not isinstance(head, str) or not isinstance(full, str) or not full.startswith(head):
        raise TrainingError("the chat template does not render the conversation as a prefix of the answer")
    return head, full[len(head) :]


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=special)]


def encode(tokenizer: Any, turns: Sequence[Turn], draft: str, max_len: int) -> tuple[list[int], int]:
    """``(input_ids, n_prompt)``: the rendered conversation and draft; the loss is on ``ids[n_prompt:]``."""
    texts = render_text(tokenizer, turns, draft)
    if texts is not None:
        prompt_ids = _ids(tokenizer, texts[0], special=False)
        completion_ids = _ids(tokenizer, texts[1], special=False)
    else:
        prompt_ids = _ids(tokenizer, plain_prompt(turns), special=True)
        completion_ids = _ids(tokenizer, draft, special=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            completion_ids.append(int(eos))
    if not completion_ids:
        raise TrainingError("a draft encodes to no tokens")
    if len(prompt_ids) + len(completion_ids) > max_len:
        completion_ids = completion_ids[: max_len - min(len(prompt_ids), max_len // 2)]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_len - len(completion_ids)) :]
    return prompt_ids + completion_ids, len(prompt_ids)


def example_turns(example: Example) -> list[Turn]:
    """The turns a spec example's drafts answer (its ``prompt``, ``system`` and ``messages``)."""
    return conversation(example.prompt, example.system, example.messages)
