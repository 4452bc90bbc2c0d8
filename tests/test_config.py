"""Config: defaults, the documented file, lookup order, and errors that name the key (exit 2)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from beagled import config
from beagled.errors import ConfigError
from beagled.training_spec import Hyper

REPO = Path(__file__).resolve().parent.parent


def keys_of(obj: Any, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):
        if f.name == "source" or (isinstance(obj, Hyper) and f.name == "extra"):  # not a TOML key
            continue
        v = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out |= keys_of(v, name + ".")
        else:
            out.add(name)
    return out


def test_shipped_config_documents_every_key_with_its_default() -> None:
    text = (REPO / "config.toml").read_text()
    shipped = config.from_mapping(tomllib.loads(text))
    defaults = config.from_mapping({})
    assert shipped == dataclasses.replace(defaults, source="")
    for key in keys_of(defaults):
        leaf = key.rsplit(".", 1)[-1]
        documented = f"{leaf} =" in text or f"[{key}]" in text  # a table key is documented by its section
        assert documented, f"config.toml does not document {key}"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"daemon": {"bogus": 1}}, "daemon.bogus"),
        ({"nope": {}}, "nope"),
        ({"daemon": {"max_connections": "many"}}, "daemon.max_connections"),
        ({"daemon": {"max_connections": 0}}, "daemon.max_connections"),
        ({"scheduler": {"min_pairs": -1}}, "scheduler.min_pairs"),
        ({"scheduler": {"max_wait_s": True}}, "scheduler.max_wait_s"),
        ({"training": {"backends": ["tpu"]}}, "training.backends"),
        ({"training": {"backends": []}}, "training.backends"),
        ({"training": {"objective": "rlhf"}}, "training.objective"),
        ({"training": {"heldout_share": 1.5}}, "training.heldout_share"),
        ({"training": {"base_model": "/does/not/exist"}}, "training.base_model"),
        ({"training": {"hyper": {"rank": 0}}}, "training.hyper.rank"),
        ({"training": {"hyper": {"target_modules": "q_proj"}}}, "training.hyper.target_modules"),
        ({"training": {"prompt_template": "no placeholder"}}, "training.prompt_template"),
        ({"metrics": {"listen": "nohost"}}, "metrics.listen"),
        ({"reload": {"method": "ftp"}}, "reload.method"),
        ({"reload": {"method": "ssh"}}, "reload.ssh.host"),
        ({"reload": {"method": "command"}}, "reload.command.argv"),
        ({"reload": {"vllm": {"naming": "random"}}}, "reload.vllm.naming"),
        ({"daemon": {"max_draft_bytes": 2_000_000}}, "daemon.max_draft_bytes"),
    ],
)
def test_bad_values_name_their_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_mapping(table)
    assert e.value.key == key
    assert key in str(e.value)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "beagled", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_check_config_cli_exit_codes_and_lookup_order(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[scheduler]\nmin_pairs = 7\n")
    env_cfg = tmp_path / "env.toml"
    env_cfg.write_text("[scheduler]\nmin_pairs = 9\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[scheduler]\nmin_pairs = 11\n")
    env = {"BEAGLED_CONFIG": ""}
    assert "min_pairs = 7" in run_cli("check-config", cwd=tmp_path, env=env).stdout
    assert (
        "min_pairs = 9" in run_cli("check-config", cwd=tmp_path, env={"BEAGLED_CONFIG": str(env_cfg)}).stdout
    )
    out = run_cli(
        "check-config", "--config", str(explicit), cwd=tmp_path, env={"BEAGLED_CONFIG": str(env_cfg)}
    )
    assert out.returncode == 0 and "min_pairs = 11" in out.stdout
    printed = out.stdout.split("\n", 1)[1]
    assert config.from_mapping(tomllib.loads(printed)).scheduler.min_pairs == 11  # the output is valid TOML
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nmax_connections = "lots"\n')
    out = run_cli("check-config", "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "daemon.max_connections" in out.stderr
    bad.write_text("not = [valid")
    out = run_cli("check-config", "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "not valid TOML" in out.stderr
    out = run_cli("check-config", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run_cli("serve", "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 2


def test_defaults_need_no_gpu_and_no_file(tmp_path: Path) -> None:
    cfg = config.from_mapping({})
    assert cfg.training.base_model == ""  # the tiny local model
    assert cfg.reload.method == "none"
    assert cfg.socket_path == cfg.state_dir / "beagled.sock"
