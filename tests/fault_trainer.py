"""A test backend for training faults: the modes of ``tests/fake_trainer.py`` plus

- ``oom``: allocates memory until it cannot (``MemoryError`` under ``[training] memory_limit_mb``);
- ``spew:<MB>``: writes that many MB of non-JSON garbage on stdout — short lines, then one huge line
  without a newline — and exits 0 without a result;
- ``badjson``: garbage JSON lines, a result line whose values are of the wrong types, and no adapter;
- ``noadapter``: a valid result line but nothing in ``out_dir``;
- ``partial``: an adapter without its manifest (a crash between the files and the manifest).
Everything else is handed to ``fake_trainer.main``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import fake_trainer


def _mode() -> tuple[str, dict]:  # type: ignore[type-arg]
    args = sys.argv[1:]
    mode = args[args.index("--mode") + 1] if "--mode" in args else "ok"
    spec = json.loads(Path(args[-1]).read_text())
    return mode, spec


def main() -> int:
    mode, spec = _mode()
    emit = fake_trainer.emit
    if mode == "oom":
        emit({"type": "progress", "step": 1, "total": 4, "loss": 2.0, "tokens_per_s": 1.0})
        hoard = []
        while True:
            hoard.append(bytearray(16 << 20))
    if mode.startswith("spew:"):
        mb = float(mode.split(":")[1])
        out = sys.stdout.buffer
        for i in range(1000):
            out.write(b"\x00\xff garbage line %d {not json\n" % i)
        chunk = os.urandom(1 << 20).replace(b"\n", b"x")
        for _ in range(int(mb)):
            out.write(chunk)  # one huge line, never terminated
        out.flush()
        return 0
    if mode == "badjson":
        for raw in ("{", "[1,2]", '{"type": 5}', '{"type": "progress", "step": "x"}', "null"):
            print(raw, flush=True)
        emit(
            {"type": "result", "train_loss": "NaN", "eval_loss": [1], "baseline_eval_loss": {}, "steps": "a"}
        )
        return 0
    if mode == "noadapter":
        emit({"type": "result", "train_loss": 0.5, "eval_loss": None, "baseline_eval_loss": None, "steps": 1})
        return 0
    if mode == "partial":
        fake_trainer.write_adapter(Path(spec["out_dir"]), spec)
        emit({"type": "result", "train_loss": 0.5, "eval_loss": None, "baseline_eval_loss": None, "steps": 1})
        return 0
    return fake_trainer.main()


if __name__ == "__main__":
    sys.exit(main())
