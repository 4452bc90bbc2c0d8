"""Secrets: where keys come from (a file, systemd credentials) and masking them in output and logs.

A key is given by ``reload.vllm.api_key_file`` (a path; a bare name is looked up in systemd's
``$CREDENTIALS_DIRECTORY``, what ``LoadCredential=`` fills), else by a credential named
``vllm-api-key``, else by ``reload.vllm.api_key`` in the config itself (discouraged). ``check-config``
prints every secret as ``"********"``; ``beagled.logs`` replaces a loaded key's value in every log line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from beagled.errors import ConfigError

MASK = "********"
SECRET_KEYS = frozenset({"api_key"})  # config keys whose values are secrets
VLLM_CREDENTIAL = "vllm-api-key"


def _credential(name: str, env: Mapping[str, str]) -> Path | None:
    d = env.get("CREDENTIALS_DIRECTORY", "")
    return Path(d) / name if d else None


def key_path(api_key_file: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The file a key is read from, or None when the config has none and no credential is passed."""
    e = os.environ if env is None else env
    if api_key_file:
        if "/" not in api_key_file:
            cred = _credential(api_key_file, e)
            if cred is not None:
                return cred
        return Path(api_key_file).expanduser()
    cred = _credential(VLLM_CREDENTIAL, e)
    return cred if cred is not None and cred.is_file() else None


def vllm_api_key(api_key: str, api_key_file: str, env: Mapping[str, str] | None = None) -> str:
    """The vLLM bearer token (``""``: none). Raises ``ConfigError`` for a file that cannot be read."""
    path = key_path(api_key_file, env)
    if path is None:
        return api_key
    if api_key:
        raise ConfigError("reload.vllm.api_key", "give the key once: api_key or api_key_file, not both")
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError("reload.vllm.api_key_file", f"cannot read {path}: {e.strerror or e}") from e
    if not key:
        raise ConfigError("reload.vllm.api_key_file", f"{path} is empty")
    return key


def mask(key: str, value: object) -> object:
    """The value as ``check-config`` shows it."""
    return MASK if key in SECRET_KEYS and value else value
