"""The training spec: what the engine gives a training run, typed, with the one set of defaults.

Theory of operation. The engine (``beagled.engine.spec.build_spec``) cuts a job into a ``TrainingSpec``:
the job's identity (``job_id``, ``voice``, ``attempt``), the models (``base_model``, ``served_base``,
``init_adapter`` to continue from, ``served_adapter`` to compare with), the objective, the pairs as
``Example`` rows (``train``, ``heldout`` for the gate, ``siblings`` for reports) and the ``Hyper``
parameters. ``to_json`` gives the wire form, the JSON object a worker reads from its spec file or its
stdin, with ``out_dir`` (where the try writes its adapter) once the engine has chosen it; the trainer adds
``backend`` (``for_worker``) and Ray's driver ``executor``. Its keys and values are what the engine has always
written, so stored spec files and running workers agree.

Every worker reads the hyper-parameters back through ``Hyper.from_json``: one set of defaults (the
``[training.hyper]`` defaults of ``beagled.config``, which takes them from here) and one set of ranges.
A bad value raises ``ConfigError`` naming its key (``hyper.rank: must be an integer >= 1, got 0``).
``complete=True`` (the mlx backend) asks for every key; keys this module does not know are kept in
``Hyper.extra`` for a backend that honours them (``beta`` for DPO in the torch backends) or refuses them.
Every worker reads the whole spec through ``TrainingSpec.from_json`` too: a pair of the wrong shape
raises ``ConfigError`` naming its place (``train[3]: needs string prompt, chosen and rejected``); what
only a worker can check (its paths, the objectives it trains, the model's layers) stays in the worker.

Pure core: the standard library and ``beagled.errors`` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from beagled.errors import ConfigError

HYPER_KEYS = (
    "rank", "alpha", "dropout", "target_modules", "num_layers", "learning_rate", "steps", "batch_size",
    "max_seq_len", "seed",
)  # fmt: skip

# the integer parameters and their least value
_INT_LOW = {"rank": 1, "steps": 1, "batch_size": 1, "max_seq_len": 8, "seed": 0}
# the real parameters: (low, high, low allowed); high is never allowed
_FLOAT_RANGE = {
    "alpha": (0.0, math.inf, False),
    "dropout": (0.0, 1.0, True),
    "learning_rate": (0.0, 1.0, False),
}


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"hyper.{key}", f"must be an integer >= {low}, got {value!r}")
    return value


def _float(key: str, value: Any, low: float, high: float, low_ok: bool) -> float:
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    above = number >= low if low_ok else number > low
    if not (math.isfinite(number) and above and number < high):
        raise ConfigError(
            f"hyper.{key}", f"must be a number in {'[' if low_ok else '('}{low}, {high}), got {value!r}"
        )
    return number


@dataclass(frozen=True)
class Hyper:
    """LoRA and optimiser settings of one run; the defaults are ``[training.hyper]``'s."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_layers: int = -1  # -1: every layer, else the last ``num_layers`` blocks
    learning_rate: float = 2e-3
    steps: int = 40
    batch_size: int = 4
    max_seq_len: int = 256
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys only some backend knows (``beta``)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first value out of its range."""
        for key, low in _INT_LOW.items():
            _int(key, getattr(self, key), low)
        for key, (lo, hi, lo_ok) in _FLOAT_RANGE.items():
            _float(key, getattr(self, key), lo, hi, lo_ok)
        targets = self.target_modules
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                "hyper.target_modules", f"must be a non-empty list of module names, got {list(targets)!r}"
            )
        n = self.num_layers
        if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
            raise ConfigError("hyper.num_layers", f"must be -1 (all) or a positive integer, got {n!r}")

    @classmethod
    def from_json(cls, raw: Any, *, complete: bool = False) -> Hyper:
        """The ``hyper`` object of a spec; a missing key takes its default (an error if ``complete``)."""
        if not isinstance(raw, Mapping):
            raise ConfigError("hyper", "must be an object")
        if complete:
            missing = [k for k in HYPER_KEYS if k not in raw]
            if missing:
                raise ConfigError(f"hyper.{missing[0]}", "is required")
        values = {k: raw[k] for k in HYPER_KEYS if k in raw}
        targets = values.get("target_modules", cls.target_modules)
        if not isinstance(targets, list | tuple):
            raise ConfigError(
                "hyper.target_modules", f"must be a non-empty list of module names, got {targets!r}"
            )
        values["target_modules"] = tuple(targets)
        for key, (lo, hi, lo_ok) in _FLOAT_RANGE.items():
            if key in values:
                values[key] = _float(key, values[key], lo, hi, lo_ok)
        return cls(**values, extra={k: v for k, v in raw.items() if k not in HYPER_KEYS})

    def to_json(self) -> dict[str, Any]:
        """The wire form: the extra keys, then every known one (``target_modules`` a list)."""
        known = {k: getattr(self, k) for k in HYPER_KEYS}
        return {**self.extra, **known, "target_modules": list(self.target_modules)}

    def layers_to_transform(self, n_model_layers: int) -> list[int] | None:
        """The last ``num_layers`` blocks (mlx-lm's convention), or ``None`` for all of them."""
        if self.num_layers == -1 or self.num_layers >= n_model_layers:
            return None
        return list(range(n_model_layers - self.num_layers, n_model_layers))


ROLES = ("system", "user", "assistant")  # a chat turn's roles (submit's ``messages`` are checked with them)
TURN_SHAPE = "{'role': system|user|assistant, 'content': str}"


def is_turn(message: Any) -> bool:
    """A chat turn as a pair's ``messages`` hold it (``TURN_SHAPE``)."""
    return (
        isinstance(message, Mapping)
        and message.get("role") in ROLES
        and isinstance(message.get("content"), str)
    )


@dataclass(frozen=True)
class Example:
    """A pair as a spec row: the better draft (``chosen``), the worse (``rejected``) and what came before
    it: a ``prompt``, or a chat's ``system`` and ``messages`` (rendered by ``beagled.training.render``)."""

    pair_id: str
    chosen: str
    rejected: str
    prompt: str
    system: str | None = None
    messages: tuple[Mapping[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pair_id": self.pair_id,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "prompt": self.prompt,
        }
        if self.messages:
            out["messages"] = [dict(m) for m in self.messages]
        if self.system is not None:
            out["system"] = self.system
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str = "example", *, default_id: str = "") -> Example:
        """A spec row, its types checked; a bad one raises ``ConfigError`` keyed by ``where``
        (``train[3]``). A row without ``pair_id`` takes ``default_id`` (its index in the spec)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(where, "must be an object")
        prompt = raw.get("prompt") or ""
        chosen, rejected = raw.get("chosen"), raw.get("rejected")
        if not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ConfigError(where, "needs string prompt, chosen and rejected")
        system, messages = raw.get("system"), raw.get("messages") or []
        if system is not None and not isinstance(system, str):
            raise ConfigError(f"{where}.system", "must be a string")
        if not isinstance(messages, list | tuple):
            raise ConfigError(f"{where}.messages", "must be a list of turns")
        for i, m in enumerate(messages):
            if not is_turn(m):
                raise ConfigError(where, f"messages[{i}] must be {TURN_SHAPE}")
        return cls(
            pair_id=str(raw.get("pair_id", default_id)),
            chosen=chosen,
            rejected=rejected,
            prompt=prompt,
            system=system,
            messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
        )


def _required(raw: Mapping[str, Any], key: str) -> Any:
    if key not in raw:
        raise ConfigError(key, "is required")
    return raw[key]


def _examples(rows: Any, what: str) -> tuple[Example, ...]:
    if rows is None:
        return ()
    if not isinstance(rows, list | tuple):
        raise ConfigError(what, "must be a list of pairs")
    return tuple(Example.from_json(r, f"{what}[{i}]", default_id=str(i)) for i, r in enumerate(rows))


@dataclass(frozen=True)
class TrainingSpec:
    """One try of one job, as the engine writes it for a worker."""

    job_id: str
    voice: str
    attempt: int
    base_model: str
    served_base: str | None
    init_adapter: str | None
    served_adapter: str | None
    objective: str
    dpo_weight: float
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]  # judged on the evaluation set as it was when the job was cut
    siblings: tuple[Example, ...]  # the job's own held-out pairs, for reports only
    hyper: Hyper = field(default_factory=Hyper)
    out_dir: str | None = None  # the try's staging directory, chosen by the engine per backend

    def to_json(self) -> dict[str, Any]:
        """The wire form (``out_dir`` only once it is chosen)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "out_dir" and value is None:
                continue
            if isinstance(value, Hyper):
                value = value.to_json()
            elif isinstance(value, tuple):
                value = [e.to_json() for e in value]
            out[f.name] = value
        return out

    def for_worker(self, backend: str) -> dict[str, Any]:
        """What a worker reads: the wire form and the backend that runs it."""
        if self.out_dir is None:
            raise ValueError("a training spec goes to a worker only with its out_dir")
        return {**self.to_json(), "backend": backend}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], *, complete: bool = False) -> TrainingSpec:
        """The engine's part of a wire spec (``backend``, ``executor`` are left out), every pair's types
        and the hyper-parameters checked (``ConfigError`` naming the place); ``complete``: every
        hyper-parameter is required (``Hyper.from_json``)."""
        return cls(
            job_id=_required(raw, "job_id"),
            voice=_required(raw, "voice"),
            attempt=_required(raw, "attempt"),
            base_model=_required(raw, "base_model"),
            served_base=raw.get("served_base"),
            init_adapter=raw.get("init_adapter"),
            served_adapter=raw.get("served_adapter"),
            objective=raw.get("objective", "sft"),
            dpo_weight=raw.get("dpo_weight", 1.0),
            train=_examples(raw.get("train"), "train"),
            heldout=_examples(raw.get("heldout"), "heldout"),
            siblings=_examples(raw.get("siblings"), "siblings"),
            hyper=Hyper.from_json(raw.get("hyper", {}), complete=complete),
            out_dir=raw.get("out_dir"),
        )
