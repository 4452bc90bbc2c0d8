"""Shared fixtures: a real daemon process factory with the fake (subprocess) trainer by default."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProc, fake_backend
from tests.pg import PgServer


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts a background command ignoring SIGINT, and every child inherits
    # that; a test that sends Ctrl-C to a child (``beaglectl watch``) needs it delivered as in a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"report_{report.when}", report)  # the fixtures below look at how the test went
    return report


@pytest.fixture
def make_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., DaemonProc]]:
    made: list[DaemonProc] = []

    def make(
        tables: dict[str, dict[str, Any]] | None = None,
        *,
        start: bool = True,
        env: dict[str, str] | None = None,
        backend: list[str] | None = None,
    ) -> DaemonProc:
        t: dict[str, dict[str, Any]] = {
            "training": {"backends": ["fake"]},  # base_model: an empty directory (the fake needs none)
            "training.custom_backends": {"fake": backend or fake_backend("ok")},
            "scheduler": {"min_pairs": 4, "max_wait_s": 300.0, "retry_backoff_s": 0.05},
        }
        for k, v in (tables or {}).items():
            t.setdefault(k, {}).update(v)
        root = tmp_path / f"d{len(made)}"
        (root / "base").mkdir(parents=True)
        t["training"].setdefault("base_model", str(root / "base"))
        d = DaemonProc(root, t, env)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    call = getattr(request.node, "report_call", None)
    for d in made:
        if call is not None and call.failed:  # a failure on a loaded machine is read from its daemon's log
            print(f"--- {d.root}: daemon log, last 8000 characters ---\n{d.log_text()[-8000:]}")
        d.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonProc]) -> DaemonProc:
    return make_daemon()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local model (MLX-built, Hugging Face layout), built once per test session."""
    from beagled.training.tinymodel import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-models")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the session (tests take fresh databases from it)."""
    server = PgServer()
    yield server
    server.close()


# real vLLM CPU servers, session-scoped (tests/vllm_real.py)
from tests.vllm_real import vllm, vllm_no_runtime, vllm_replica, vllm_server  # noqa: E402, F401
