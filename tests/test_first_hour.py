"""A new user's first hour (issue 14): each numbered problem, reproduced and now fixed."""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from beagled import __version__, ctl, hfcache, logs, manifest, paths, protocol, secrets
from beagled.cli import beagled_main
from beagled.client import default_socket_path
from beagled.config import from_mapping
from beagled.errors import ConfigError, Conflict
from beagled.events import PAYLOAD_TYPES
from beagled.metrics import Metrics
from tests.daemon_proc import fake_backend, poll

# --- 1. no backend, no storm ----------------------------------------------------------------------


def test_no_backend_is_no_event_storm_and_a_later_install_is_picked_up(
    make_daemon: Any, tmp_path: Path
) -> None:
    # a real daemon whose one backend is a trainer not installed yet; retries as fast as the fixture's
    # retry_backoff_s = 0.05 s: before, that appended AttemptFailed 20 times a second, forever
    exe = tmp_path / "later" / "trainer"
    d = make_daemon(
        {
            "training": {"backends": ["later"], "heldout_share": 0.0},
            "training.custom_backends": {"later": [str(exe)]},
        }
    )
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"b{i}", good=f"g{i}")
    poll(lambda: any(e["type"] == "TrainingBlocked" for e in d.events()), 30, what="the job to block")
    time.sleep(2.0)  # an absence (no retry events) can only be waited out: 40 backoffs of the old loop
    types = [e["type"] for e in d.events()]
    assert types == ["PairSubmitted"] * 4 + ["JobCreated", "TrainingBlocked"]
    with d.client() as c:
        (v,) = c.voices()["voices"]
        (job,) = c.jobs()["jobs"]
    assert "waits for a training backend" in v["waiting"] and "later" in v["waiting"]
    assert job["state"] == "queued" and job["blocked"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).read().decode()
    assert 'beagled_backend_available{backend="later"} 0.0' in metrics
    assert "training backends unavailable" in d.log_text()
    # installed later: `train` re-probes at once (no restart), the job is unblocked and trains
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in fake_backend("ok")) + ' "$@"\n')
    exe.chmod(0o755)
    with d.client() as c, pytest.raises(Conflict):
        c.train("default")  # nothing pending to cut; the probe is what counts
    d.wait_job(job["job_id"], ("promoted",))
    types = [e["type"] for e in d.events()]
    assert types[:7] == ["PairSubmitted"] * 4 + ["JobCreated", "TrainingBlocked", "TrainingUnblocked"]


# --- 2. one path resolver ---------------------------------------------------------------------


def test_client_and_daemon_resolve_the_same_socket_under_xdg_state_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in (
        "BEAGLED_SOCKET",
        "BEAGLED_CONFIG",
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "XDG_RUNTIME_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    daemon_side = from_mapping({}).socket_path
    assert daemon_side == tmp_path / "xdg-state" / "beagled" / "beagled.sock"
    assert default_socket_path() == daemon_side  # was ~/.local/state/beagled: "not running"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd-state"))
    assert (
        from_mapping({}).socket_path == default_socket_path() == tmp_path / "systemd-state" / "beagled.sock"
    )


def test_config_lookup_order_and_check_config_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BEAGLED_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    xdg = tmp_path / "cfg" / "beagled" / "config.toml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("[scheduler]\nmin_pairs = 7\n")
    assert paths.config_path() == (xdg, False)
    assert beagled_main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert f"# effective settings ({xdg};" in out and "min_pairs = 7" in out
    (tmp_path / "config.toml").write_text("[scheduler]\nmin_pairs = 5\n")
    assert paths.config_path() == (Path("config.toml"), False)  # ./config.toml before XDG
    monkeypatch.setenv("BEAGLED_CONFIG", str(xdg))
    assert paths.config_path() == (xdg, True)
    assert paths.config_candidates()[-1] == Path("/etc/beagled/config.toml")


# --- 3. secrets -------------------------------------------------------------------------------


def test_check_config_masks_keys_and_a_key_file_or_credential_supplies_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[reload.vllm]\napi_key = "sk-in-clear-123"\n')
    assert beagled_main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "sk-in-clear-123" not in out and 'api_key = "********"' in out
    # a credential (systemd LoadCredential=vllm-api-key:…) or a named file supplies the key instead
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vllm-api-key").write_text("sk-from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert secrets.vllm_api_key("", "") == "sk-from-credential"
    (creds / "other").write_text("sk-named\n")
    assert secrets.vllm_api_key("", "other") == "sk-named"
    with pytest.raises(ConfigError, match="not both"):
        secrets.vllm_api_key("sk-x", "other")
    cfg.write_text('[reload.vllm]\napi_key_file = "/nonexistent/key"\n')
    assert beagled_main(["check-config", "--config", str(cfg)]) == 2
    assert "api_key_file" in capsys.readouterr().err


def test_a_loaded_key_is_masked_in_every_log_line() -> None:
    logs.add_secret("sk-never-logged")
    record = logging.makeLogRecord(
        {"msg": "reload failed: Bearer %s", "args": ("sk-never-logged",), "levelno": 40, "levelname": "ERROR"}
    )
    record.url = "http://h/?k=sk-never-logged"
    for fmt in (logs.JsonFormatter(), logs.TextFormatter()):
        line = fmt.format(record)
        assert "sk-never-logged" not in line and logs.MASK in line


# --- 4. clear failures ----------------------------------------------------------------------------


def test_demo_without_its_extra_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # -S: no site-packages, so neither mlx nor anything else is installed (as after `pip install -e .`
    # without [mlx] — and less); the check runs before anything third-party is imported
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-S", "-m", "beagled", "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(repo), "PATH": os.environ.get("PATH", "")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "pip install 'beagled[mlx]'" in done.stderr
    assert "Traceback" not in done.stderr


# --- 10. habits of the ecosystem: watch, --version, completion, journald ----------------------------


def test_watch_lines_show_times_as_times_and_fit_the_terminal() -> None:
    event = {
        "seq": 9,
        "type": "AttemptFailed",
        "at": 1_796_000_000.0,
        "data": {"job_id": "j-1", "attempt": 1, "error": "x" * 300, "retry_at": 1_796_000_005.0},
    }
    line = ctl.format_event(event, tz=UTC)
    assert "retry_at=" + datetime.fromtimestamp(1_796_000_005, UTC).strftime("%H:%M:%S") in line
    assert "e+09" not in line
    out = io.StringIO()
    board = ctl.ProgressBoard(out, tty=True, width=50, tz=UTC)
    board.event(event)
    assert all(len(ln) <= 50 for ln in out.getvalue().splitlines())


def test_no_escapes_for_a_dumb_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "dumb")
    assert not ctl.fancy_terminal(Tty())
    monkeypatch.setenv("TERM", "xterm-256color")
    assert ctl.fancy_terminal(Tty()) and not ctl.fancy_terminal(io.StringIO())


def test_beaglectl_version_and_completion_scripts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert ctl.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"beaglectl {__version__}"
    assert ctl.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o default -F _beaglectl beaglectl" in script and "--from-seq" in script
    (tmp_path / "c.bash").write_text(script)
    # load it in a real bash and ask for completions of `beaglectl wa` and `beaglectl watch --f`
    probe = (
        f"source {tmp_path / 'c.bash'}; COMP_WORDS=(beaglectl wa); COMP_CWORD=1; _beaglectl; "
        'echo "${COMPREPLY[@]}"; COMP_WORDS=(beaglectl watch --f); COMP_CWORD=2; _beaglectl; '
        'echo "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True, timeout=30)
    assert done.stdout.splitlines() == ["watch", "--from-seq"]
    assert ctl.main(["completion", "zsh"]) == 0
    z = capsys.readouterr().out
    assert z.startswith("#compdef beaglectl") and "'watch:" in z


def test_journald_gets_priority_prefixes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # stderr is "journald's" when $JOURNAL_STREAM names its device:inode, as systemd sets it
    err = (tmp_path / "stderr").open("w")
    st = os.fstat(err.fileno())
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    saved = logging.getLogger().handlers[:]
    try:
        logs.setup("text", "info")
        logging.getLogger("beagled.t").warning("disk is slow")
        logging.getLogger("beagled.t").error("disk failed")
        logging.getLogger("beagled.t").info("ok")
    finally:
        logging.getLogger().handlers[:] = saved
        err.close()
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert [ln[:3] for ln in lines] == ["<4>", "<3>", "<6>"]


# --- 8. models from the local Hugging Face cache ------------------------------------------------------


def test_base_model_may_be_a_repo_id_in_the_local_hf_cache(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    refs = snap.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123\n")
    assert hfcache.resolve("Qwen/Qwen2.5-0.5B-Instruct", env) == snap
    assert hfcache.resolve("Qwen/Qwen2.5-0.5B-Instruct@abc123", env) == snap
    assert hfcache.resolve(str(tmp_path), env) == tmp_path  # a directory still works
    with pytest.raises(ConfigError, match=r"hf download Qwen/Qwen2\.5-7B") as e:
        hfcache.resolve("Qwen/Qwen2.5-7B", env)
    assert "never downloads" in str(e.value)
    with pytest.raises(ConfigError, match="not a directory"):
        hfcache.resolve("/no/such/dir", env)


# --- 9. hash once ---------------------------------------------------------------------------------


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_the_base_model_hash_is_read_once_and_follows_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEAGLED_HASH_CACHE", str(tmp_path / "cache.json"))
    model = tmp_path / "model"
    model.mkdir()
    shard = model / "model-00001-of-00001.safetensors"
    shard.write_bytes(os.urandom(1 << 20) * 16)  # 16 MiB
    before = _bytes_read()
    first = manifest.base_model_sha256(model)
    assert _bytes_read() - before >= 16 << 20  # the cold hash reads the weights
    before = _bytes_read()
    assert manifest.base_model_sha256(model) == first
    assert _bytes_read() - before < 1 << 20  # the cached one does not (was: 16 MiB again, every job)
    with shard.open("r+b") as f:  # same size, new content: a new key, a new digest
        f.write(b"\0" * 8)
    assert manifest.base_model_sha256(model) != first


# --- 13. a watch client that closes is a normal close -----------------------------------------------


def test_a_watch_client_closing_is_logged_as_a_normal_close(make_daemon: Any) -> None:
    d = make_daemon()
    with d.client() as c:
        c.submit(bad="a", good="b")
    for _ in range(2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        s.sendall(b'{"v": 1, "id": 1, "op": "watch", "from_seq": 0}\n')
        assert b'"event"' in s.recv(65536)  # streaming
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, as a kill does
        s.close()
    with d.client() as c:  # an event to stream to the closed watchers: the daemon notices them now
        c.submit(bad="c", good="d")
    poll(lambda: d.log_text().count("client closed the connection") >= 2, 30, what="both closes")
    log = d.log_text()
    assert "Traceback" not in log and "connection failed" not in log and '"level": "error"' not in log


# --- 6. min_pairs counts what the user submitted ----------------------------------------------------


def test_min_pairs_counts_held_out_pairs_too(make_daemon: Any) -> None:
    d = make_daemon()
    with d.client() as c:
        for i in range(4):  # min_pairs = 4: three to train on, one held out for evaluation
            c.request("submit", bad=f"b{i}", good=f"g{i}", heldout=i == 2)
    (job,) = d.wait_jobs(lambda js: len(js) == 1)  # was: no job (3 pending < 4), and nothing said why
    assert job["pairs"] == 3
    (created,) = [e for e in d.events() if e["type"] == "JobCreated"]
    assert created["data"]["reason"] == "min_pairs"
    with d.client() as c:
        (v,) = c.voices()["voices"]
    assert v["heldout_pairs"] == 1


def test_min_pairs_makes_a_job_however_the_split_falls(make_daemon: Any) -> None:
    # the split holds (all but one in a million) every pair out: the pair that completes a window of
    # min_pairs with nothing to train on trains instead, one by one or in one pipelined batch
    d = make_daemon({"training": {"heldout_share": 0.999999}})
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"b{i}", good=f"g{i}", voice="one")
        got = c.pipeline([("submit", {"voice": "batch", "bad": f"b{i}", "good": f"g{i}"}) for i in range(4)])
        assert all(r["ok"] for r in got), got
    js = d.wait_jobs(lambda js: len(js) == 2)
    cuts = sorted((j["voice"], j["pairs"], j["sibling_pairs"]) for j in js)
    assert cuts == [("batch", 1, 3), ("one", 1, 3)]


# --- 12. the TRL path masks the prompt whichever column a TRL release reads ---------------------------


def test_sft_rows_mask_the_prompt_in_labels_and_completion_mask(tiny_model: Path) -> None:
    from beagled.training.torch_common import IGNORE, encode_example, sft_row

    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model))
    ids, labels = encode_example(tok, "Rewrite this draft in my voice:\n\nhi", "Hey there, Bea here", 256)
    row = sft_row(ids, labels)
    n_prompt = next(i for i, y in enumerate(labels) if y != IGNORE)
    assert n_prompt > 0
    # some TRL releases rebuild labels from input_ids and a completion_mask: it says the same thing
    assert row["completion_mask"] == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert row["labels"][:n_prompt] == [IGNORE] * n_prompt


# --- 5. the contract is documented in the repository ---------------------------------------------------


def test_readme_links_resolve_inside_the_repo_and_the_protocol_doc_covers_every_op() -> None:
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r"`(\.\./[^`]+)`", readme)
    for target in targets:
        if "://" in target:
            continue
        path = (repo / target).resolve()
        assert path.is_relative_to(repo) and path.exists(), target  # was: ../shared/CONTRACT.md
    assert "docs/protocol.md" in targets
    doc = (repo / "docs" / "protocol.md").read_text()
    for op in protocol.OPS:
        assert f"`{op}`" in doc, op
    for code in ("invalid_json", "bad_request", "unknown_op", "unsupported_version", "too_large"):
        assert f"`{code}`" in doc
    for code in ("forbidden", "not_found", "conflict", "unavailable", "internal"):
        assert f"`{code}`" in doc
    for field in ("prompt", "quality", "key", "heldout", "messages", "served_name", "heldout_pairs"):
        assert f"`{field}`" in doc, field
    for event_type in PAYLOAD_TYPES:  # every event a watch can show is named for users
        assert f"`{event_type}`" in doc, event_type
    for field in ("cancel_running", "force", "waiting_for_executor"):
        assert f"`{field}`" in doc, field
    assert "/v1/chat/completions" in doc


def test_metrics_add_process_series_and_drop_created() -> None:
    text = Metrics().exposition().decode()
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    assert "_created" not in text
