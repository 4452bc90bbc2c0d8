"""The launchd agent: launchd has no linter on Linux, so parse it with plistlib and check its keys."""

from __future__ import annotations

import plistlib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLIST = ROOT / "launchd" / "com.beagled.daemon.plist"
HOME_PLACEHOLDER = "__HOME__"


def load(home: str | None = None) -> dict[str, Any]:
    data = PLIST.read_bytes()
    if home is not None:
        data = data.replace(HOME_PLACEHOLDER.encode(), home.encode())
    plist: dict[str, Any] = plistlib.loads(data)
    return plist


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def test_parses_as_an_xml_plist() -> None:
    assert PLIST.read_bytes().startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist')
    plist = load()
    assert isinstance(plist, dict)
    assert plistlib.loads(plistlib.dumps(plist)) == plist


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("Label", str),
        ("ProgramArguments", list),
        ("RunAtLoad", bool),
        ("KeepAlive", dict),
        ("ThrottleInterval", int),
        ("StandardOutPath", str),
        ("StandardErrorPath", str),
        ("WorkingDirectory", str),
        ("EnvironmentVariables", dict),
        ("ExitTimeOut", int),
        ("ProcessType", str),
        ("SoftResourceLimits", dict),
    ],
)
def test_required_keys_and_types(key: str, kind: type) -> None:
    plist = load()
    assert key in plist
    assert type(plist[key]) is kind  # bool is an int subclass: compare exactly


def test_values() -> None:
    plist = load()
    assert plist["Label"] == "com.beagled.daemon"
    assert PLIST.name == plist["Label"] + ".plist"  # launchctl expects the file named after the label
    args = plist["ProgramArguments"]
    assert all(isinstance(a, str) for a in args)
    assert args[0].startswith("/")
    assert "beagled" in args[1]
    assert args[2] == "serve"
    config = args[args.index("--config") + 1]
    assert plist["EnvironmentVariables"]["BEAGLED_CONFIG"] == config
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on crash, not after a clean stop
    assert 1 <= plist["ThrottleInterval"] <= 60
    assert plist["ProcessType"] != "Background"  # Background throttles MLX training
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 1024
    assert plist["Umask"] == 0o077
    env = plist["EnvironmentVariables"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert "/usr/bin" in env["PATH"].split(":")


def test_paths_are_absolute_once_installed() -> None:
    """launchd expands neither ~ nor $HOME: every path must be absolute after the install's sed."""
    plist = load(home="/Users/tester")
    for text in strings(plist):
        assert "~" not in text, text
        assert "$" not in text, text
        assert HOME_PLACEHOLDER not in text
    for key in ("WorkingDirectory", "StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith("/Users/tester/"), key
    assert plist["EnvironmentVariables"]["BEAGLED_CONFIG"].startswith("/Users/tester/")
    for entry in plist["EnvironmentVariables"]["PATH"].split(":"):
        assert entry.startswith("/"), entry
