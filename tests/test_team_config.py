"""The settings of a shared log: validation, where adapters live, and the password never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from beagled.config import from_mapping, to_toml
from beagled.dialects import PostgresDialect
from beagled.errors import ConfigError


def test_database_url_is_checked_and_a_password_in_it_is_never_printed() -> None:
    with pytest.raises(ConfigError, match=r"daemon\.database_url"):
        from_mapping({"daemon": {"state_dir": "/tmp/x", "database_url": "mysql://db/x"}})
    cfg = from_mapping(
        {"daemon": {"state_dir": "/tmp/x", "database_url": "postgresql+psycopg://bea:s3cret@db:5432/b"}}
    )
    text = to_toml(cfg)
    assert "s3cret" not in text
    assert 'database_url = "postgresql+psycopg://bea:***@db:5432/b"' in text
    assert "leader_timeout_s = 10.0" in text


def test_adapters_dir_moves_the_voices(tmp_path: Path) -> None:
    cfg = from_mapping({"daemon": {"state_dir": str(tmp_path), "adapters_dir": str(tmp_path / "shared")}})
    assert cfg.voices_dir == tmp_path / "shared"
    assert from_mapping({"daemon": {"state_dir": str(tmp_path)}}).voices_dir == tmp_path / "voices"


def test_password_file_is_used_and_never_described(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    d = PostgresDialect("postgresql+psycopg://bea@db:5432/b", str(secret))
    assert d.url.password == "hunter2"
    assert "hunter2" not in d.describe()
    with pytest.raises(ConfigError, match=r"database_password_file"):
        PostgresDialect("postgresql+psycopg://bea@db/b", str(tmp_path / "missing"))
