"""Chat-shaped pairs (issue 14, problem 7) on the tiny local model: one rendering for every backend.

The conversation before the draft (``system``, ``messages``, ``prompt``) is rendered by the base model's
chat template (``beagled.training.render``), the draft as the assistant turn, and the loss is on the
draft only: the torch labels and the mlx loss mask are zero exactly over the rendered conversation.
Without a chat template the documented plain rendering is used; prompt-only pairs render as before.
A daemon trains a job of chat-shaped pairs on mlx and on peft and promotes it, and its held-out loss is
the loss of that rendering (recomputed here with the promoted adapter).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from beagled.training import render
from beagled.training.corpus import chat_pairs, voice_pairs
from beagled.training_spec import Example

transformers = pytest.importorskip("transformers")
backend_mlx = pytest.importorskip("beagled.training.backend_mlx")

MAX_LEN = 256


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)


@pytest.fixture(scope="module")
def mlx_tok(tiny_model: Path) -> Any:
    from mlx_lm import load

    return load(str(tiny_model))[1]


def chat_example(i: int = 0) -> dict[str, Any]:
    system, messages, bad, good = chat_pairs(i + 1, seed=9)[i]
    return {"pair_id": f"c{i}", "prompt": "", "system": system, "messages": messages, "chosen": good,
            "rejected": bad}  # fmt: skip


def mlx_mask(ids: list[int], n_prompt: int) -> np.ndarray:
    """The mlx loss mask over the example's tokens: ``mask[t]`` weighs the prediction of token t+1."""
    _, _, mask = backend_mlx._batch([(ids, n_prompt)], 0)
    return np.array(mask)[0]


def test_the_conversation_carries_no_loss_on_torch_and_on_mlx(tok: Any, mlx_tok: Any) -> None:
    from beagled.training.torch_common import IGNORE, encode_example, sft_row

    ex = chat_example()
    turns = render.conversation(ex["prompt"], ex["system"], ex["messages"])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    head = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert ex["system"] in head and all(m["content"] in head for m in ex["messages"])
    assert head.endswith("<|assistant|>\n")
    n_head = len(tok.encode(head, add_special_tokens=False))

    # torch (peft, unsloth): labels -100 exactly over the rendered conversation, the draft's tokens after
    ids, labels = encode_example(tok, "", ex["chosen"], MAX_LEN, system=ex["system"], messages=ex["messages"])
    n = labels.count(IGNORE)
    assert n == n_head and labels[:n] == [IGNORE] * n
    assert labels[n:] == ids[n:] and len(ids) - n >= 10
    assert tok.decode(ids[:n]) == head
    assert tok.decode(ids[n:]) == ex["chosen"] + "<|end|>\n"  # the assistant turn, closed by the template
    assert sft_row(ids, labels)["completion_mask"] == [0] * n + [1] * (len(ids) - n)

    # mlx: the same tokens, and the loss mask is zero over every prediction of a conversation token
    mlx_ids, mlx_n = backend_mlx.Encoder(mlx_tok, MAX_LEN).encode_example(Example.from_json(ex), "chosen")
    assert (mlx_ids, mlx_n) == (ids, n)
    mask = mlx_mask(mlx_ids, mlx_n)
    assert mask[: n - 1].sum() == 0  # positions 0..n-2 predict conversation tokens 1..n-1
    assert (mask[n - 1 :] == 1.0).all() and mask.sum() == len(ids) - n  # every draft token, nothing else

    # the rejected draft after the same conversation: the same prefix, its own completion
    bad_ids, bad_n = backend_mlx.Encoder(mlx_tok, MAX_LEN).encode_example(Example.from_json(ex), "rejected")
    assert bad_n == n and bad_ids[:n] == ids[:n] and tok.decode(bad_ids[n:]).startswith(ex["rejected"])


def test_a_long_conversation_keeps_its_end_and_the_drafts_start(tok: Any, mlx_tok: Any) -> None:
    from beagled.training.torch_common import IGNORE, encode_example

    msgs = [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "Now the note."}]  # fmt: skip
    ids, labels = encode_example(tok, "", "more " * 100, 64, system="Be brief.", messages=msgs)
    assert len(ids) == 64 and labels.count(IGNORE) == 32
    assert tok.decode(ids[:32]).endswith("Now the note.<|end|>\n<|assistant|>\n")
    ex = {"prompt": "", "system": "Be brief.", "messages": msgs, "chosen": "more " * 100, "rejected": ""}
    assert backend_mlx.Encoder(mlx_tok, 64).encode_example(Example.from_json(ex), "chosen") == (ids, 32)


def test_without_a_chat_template_the_plain_rendering_is_used(tok: Any, mlx_tok: Any) -> None:
    from beagled.training.torch_common import IGNORE, encode_example

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    plain_mlx = copy.copy(mlx_tok)  # mlx-lm's wrapper around a Hugging Face tokenizer without a template
    plain_mlx._tokenizer = plain
    ex = chat_example()
    ids, labels = encode_example(
        plain, "", ex["chosen"], MAX_LEN, system=ex["system"], messages=ex["messages"]
    )
    n = labels.count(IGNORE)
    m = ex["messages"]
    assert plain.decode(ids[:n]) == (
        f"system: {ex['system']}\n\nuser: {m[0]['content']}\n\nassistant: {m[1]['content']}\n\n"
        f"user: {m[2]['content']}\n\nassistant: "
    )
    assert ids[n:] == [*plain.encode(ex["chosen"], add_special_tokens=False), plain.eos_token_id]
    assert backend_mlx.Encoder(plain_mlx, MAX_LEN).encode_example(Example.from_json(ex), "chosen") == (ids, n)
    mask = mlx_mask(ids, n)
    assert mask[: n - 1].sum() == 0 and mask.sum() == len(ids) - n

    # a prompt-only pair: the prompt alone, then the draft and eos (as before chat-shaped pairs)
    ids, labels = encode_example(plain, "Write to Ana.", "Hey Ana", MAX_LEN)
    n = labels.count(IGNORE)
    assert ids[:n] == plain.encode("Write to Ana.") and plain.decode(ids[n:]) == "Hey Ana<|end|>"


def _old_torch_encoding(tok: Any, prompt: str, completion: str) -> list[int]:
    """How the torch path encoded a prompt-only pair before render.py (token-level common prefix)."""

    def ids(x: Any) -> list[int]:
        x = x["input_ids"] if hasattr(x, "keys") else x
        return [int(t) for t in x]

    user = [{"role": "user", "content": prompt}]
    head = ids(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
    full = ids(tok.apply_chat_template([*user, {"role": "assistant", "content": completion}], tokenize=True))
    assert full[: len(head)] == head
    return full


def test_prompt_only_pairs_render_as_before(tok: Any) -> None:
    from beagled.training.torch_common import IGNORE, encode_example

    for prompt, _bad, good in voice_pairs(6, seed=4):
        ids, labels = encode_example(tok, prompt, good, MAX_LEN)
        assert ids == _old_torch_encoding(tok, prompt, good)
        user = [{"role": "user", "content": prompt}]
        n_head = len(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True)["input_ids"])
        assert labels.count(IGNORE) == n_head
    assert render.conversation("p") == [{"role": "user", "content": "p"}]
    assert render.conversation("p", "s") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
    ]


# --- the daemon, end to end -------------------------------------------------------------------------


def _heldout_loss(tiny_model: Path, adapter: Path, examples: list[dict[str, Any]], chat: bool) -> float:
    """The promoted adapter's mean NLL over the held-out better drafts, recomputed with peft; ``chat``:
    as rendered with their conversation, else as prompt-only pairs (the default prompt template)."""
    import torch
    from peft import PeftModel

    from beagled.training.torch_common import encode_example, mean_nll

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model), dtype=torch.float32, local_files_only=True
    )
    model = PeftModel.from_pretrained(base, str(adapter))
    encoded = [
        encode_example(tokenizer, "", e["good"], MAX_LEN, system=e["system"], messages=e["messages"])
        if chat
        else encode_example(tokenizer, f"Rewrite this draft in my voice:\n\n{e['bad']}", e["good"], MAX_LEN)
        for e in examples
    ]
    loss = mean_nll(model, encoded, tokenizer.pad_token_id, 4)
    assert loss is not None
    return loss


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's
@pytest.mark.parametrize("backend", ["mlx", "peft"])
def test_a_job_of_chat_shaped_pairs_trains_and_is_promoted(
    make_daemon: Any, tiny_model: Path, backend: str
) -> None:
    if backend == "peft":
        pytest.importorskip("peft")
        pytest.importorskip("trl")
    d = make_daemon(
        {
            "training": {"backends": [backend], "base_model": str(tiny_model)},
            "training.hyper": {"steps": 30, "learning_rate": 0.005, "batch_size": 4, "seed": 0},
            "scheduler": {"min_pairs": 10**6, "max_wait_s": 10**6},  # the job is cut by ``train``
        }
    )
    pairs = chat_pairs(16, seed=11)
    held = set(random.Random(11).sample(range(len(pairs)), 4))
    heldout = []
    with d.client() as c:
        for i, (system, messages, bad, good) in enumerate(pairs):
            r = c.submit(bad=bad, good=good, system=system, messages=messages, voice="bea", heldout=i in held)
            assert r["duplicate"] is False
            if i in held:
                heldout.append({"system": system, "messages": messages, "bad": bad, "good": good})
        jid = c.train("bea")["job_id"]
    d.wait_job(jid, ("promoted", "rejected", "failed"), timeout=300)
    with d.client() as c:
        job = c.job(jid)["job"]
    assert job["state"] == "promoted" and job["backend"] == backend, job
    assert job["pairs"] == 12 and job["eval_pairs"] == 4
    assert job["eval_loss"] < job["base_eval_loss"] - 0.3, job  # it learnt the voice's answers

    # the held-out loss the gate judged is the loss of the chat rendering, not of a prompt-only one
    adapter = (d.state_dir / "voices" / "bea" / "current").resolve()
    chat = _heldout_loss(tiny_model, adapter, heldout, chat=True)
    prompt_only = _heldout_loss(tiny_model, adapter, heldout, chat=False)
    print(f"{backend}: eval_loss {job['eval_loss']:.6f}, chat {chat:.6f}, prompt-only {prompt_only:.6f}")
    assert chat == pytest.approx(job["eval_loss"], rel=1e-4)
    assert prompt_only != pytest.approx(job["eval_loss"], rel=5e-4)
