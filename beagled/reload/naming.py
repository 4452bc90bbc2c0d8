"""Served model names: ``<prefix><voice>-v<NNNN>`` (versioned) or ``<prefix><voice>`` (fixed), and
the operator's ``served_name_template`` for the command and ssh methods."""

from __future__ import annotations

import re

from beagled.errors import ConfigError

_SAMPLE = {"voice": "default", "version": 1, "job_id": "j-0"}


def versioned_name(prefix: str, voice: str, version: int) -> str:
    return f"{prefix}{voice}-v{version:04d}"


def fixed_name(prefix: str, voice: str) -> str:
    return f"{prefix}{voice}"


def parse_version(prefix: str, voice: str, name: str) -> int | None:
    """The version in ``name`` if it is a versioned name of ``voice``, else ``None``."""
    match = re.fullmatch(re.escape(f"{prefix}{voice}") + r"-v(\d{4,})", name)
    return int(match.group(1)) if match else None


def check_template(key: str, template: str) -> str:
    """Validate a ``str.format`` template over ``voice``, ``version`` (int) and ``job_id``."""
    try:
        name = template.format(**_SAMPLE)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            key,
            f"bad template {template!r} ({e!r}); "
            "use {voice}, {version} (e.g. {version:04d}) and {job_id}",
        ) from e
    if not name:
        raise ConfigError(key, "the template gives an empty name")
    return template


def render_template(template: str, *, voice: str, version: int, job_id: str) -> str:
    return template.format(voice=voice, version=version, job_id=job_id)
