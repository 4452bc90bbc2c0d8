"""The systemd units: `systemd-analyze verify` with empty stderr, and the sandbox's exposure score.

`systemd-analyze verify` exits 0 on unknown keys and bad values (it only warns), so every check here
also demands an empty stderr. The shipped units verify as they are: ExecStart goes through
/usr/bin/env, which exists everywhere, instead of naming a beagled binary this machine may lack.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_UNIT = ROOT / "systemd" / "beagled.service"
USER_UNIT = ROOT / "systemd" / "beagled-user.service"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
MAX_EXPOSURE = 4.0


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed (apt-get install -y systemd)")
    return binary


def run_analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat"}
    full_env.update(env or {})
    return subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, timeout=120, env=full_env, check=False
    )


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user manager needs $XDG_RUNTIME_DIR (a container has no logind to provide one)."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    home = tmp_path / "home"
    home.mkdir()
    return {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(home)}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (keys may repeat; an empty assignment resets)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: assignment outside a section: {raw!r}"
        key, _, value = line.partition("=")
        values = current.setdefault(key.strip(), [])
        if value.strip() == "":
            values.clear()
        values.append(value.strip())
    return sections


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    return float(match.group(1))


def gpu_dropin() -> str:
    """The GPU drop-in documented in docs/deploy.md (the ini block after the gpu-dropin marker)."""
    text = DEPLOY_DOC.read_text()
    match = re.search(r"<!-- gpu-dropin -->\s*```ini\n(.*?)```", text, re.S)
    assert match, "docs/deploy.md lost its GPU drop-in block"
    return match.group(1)


# --- system unit --------------------------------------------------------------------------------------


def test_system_unit_verifies_cleanly() -> None:
    proc = run_analyze("verify", str(SYSTEM_UNIT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout == "", proc.stdout


def test_system_unit_exposure(tmp_path: Path) -> None:
    proc = run_analyze("security", "--offline=true", str(SYSTEM_UNIT))
    assert proc.returncode == 0, proc.stderr
    score = exposure(proc.stdout)
    print(f"beagled.service exposure: {score}")
    assert score <= MAX_EXPOSURE, proc.stdout


def test_system_unit_settings() -> None:
    service = parse_unit(SYSTEM_UNIT)["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key}= missing"
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("KillMode") == "mixed"
    assert one("TimeoutStopSec") == "15"
    assert one("Restart") == "on-failure"
    assert one("OOMPolicy") == "continue"
    assert one("StateDirectory") == "beagled"
    assert one("RuntimeDirectory") == "beagled"
    assert one("ProtectSystem") == "strict"
    assert one("PrivateDevices") == "yes"
    assert one("NoNewPrivileges") == "yes"
    assert one("UMask") == "0077"
    assert one("CapabilityBoundingSet") == ""
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "@system-service" in service["SystemCallFilter"]
    # Training subprocesses JIT-compile kernels (torch/triton/CUDA, mlx): W^X would break them.
    assert "MemoryDenyWriteExecute" not in service
    # A private user namespace maps the loop's uid to 65534 and breaks the allowed_uids peer check.
    assert service.get("PrivateUsers", ["no"])[-1] in ("no", "false")
    exec_start = one("ExecStart").split()
    assert exec_start[:3] == ["/usr/bin/env", "beagled", "serve"]
    assert "--config" in exec_start
    assert any(v.startswith("BEAGLED_CONFIG=") for v in service["Environment"])


def test_gpu_dropin_verifies_and_stays_within_exposure(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    (unit_dir / "beagled.service.d").mkdir(parents=True)
    shutil.copy(SYSTEM_UNIT, unit_dir / "beagled.service")
    (unit_dir / "beagled.service.d" / "gpu.conf").write_text(gpu_dropin())
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    proc = run_analyze("verify", "beagled.service", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    proc = run_analyze("security", "--offline=true", "beagled.service", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "potentially has access to hardware" in proc.stdout, "the drop-in was not applied"
    assert exposure(proc.stdout) <= MAX_EXPOSURE, proc.stdout


def test_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """Guards the guard: verify's rc stays 0 on an unknown key, stderr does not stay empty."""
    broken = tmp_path / "beagled.service"
    broken.write_text(SYSTEM_UNIT.read_text().replace("[Service]\n", "[Service]\nWatchDogSec=30\n", 1))
    proc = run_analyze("verify", str(broken))
    assert "Unknown key" in proc.stderr


# --- user unit ----------------------------------------------------------------------------------------


def test_user_unit_verifies_cleanly(tmp_path: Path) -> None:
    proc = run_analyze("--user", "verify", str(USER_UNIT), env=user_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_user_unit_settings(tmp_path: Path) -> None:
    unit = parse_unit(USER_UNIT)
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["KillMode"] == ["mixed"]
    assert service["StateDirectory"] == ["beagled"]
    assert "MemoryDenyWriteExecute" not in service
    assert unit["Install"]["WantedBy"] == ["default.target"]
    # Scored for information only: a user manager cannot set up the mount-namespace sandbox.
    proc = run_analyze("--user", "security", "--offline=true", str(USER_UNIT), env=user_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    print(f"beagled-user.service exposure: {exposure(proc.stdout)}")
    # what a user manager can apply without privileges or mount namespaces (issue 14: was 6.5)
    assert exposure(proc.stdout) <= 6.3, proc.stdout
    assert service["KeyringMode"] == ["private"]
