"""Settings files: TOML, then environment and keyword overrides, converted to typed structs on load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta

from schemas.errors import ChorusError

T = TypeVar("T")


class SettingsError(ChorusError):
    """A settings file or override is missing, unreadable or invalid."""


class MetricsTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[metrics]`: Prometheus metrics at /metrics and a health check at /healthz, over HTTP.

    Off unless `enabled`. The endpoint has no authentication, so it listens on loopback by default.
    """

    enabled: bool = False
    host: Annotated[str, Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65_535)] = 9464  # 0: any free port (logged as metrics_serving)


# Setting it serves metrics on that port whatever the file says: several processes can share one file.
METRICS_PORT_VARIABLE = "CHORUS_METRICS_PORT"


def read_settings(
    path: Path,
    env_overrides: Mapping[str, str],
    path_keys: tuple[str, ...],
    env: Mapping[str, str] | None,
    overrides: Mapping[str, object],
) -> dict[str, object]:
    """A settings file's top-level table after environment and keyword overrides.

    `env_overrides` maps environment variables to keys; keyword overrides given as None are
    ignored; relative paths under `path_keys` are resolved against the file's folder, after
    "{participant_id}" in them is replaced by the settings' participant id.
    """
    raw = read_toml(path)
    for variable, key in env_overrides.items():
        value = (os.environ if env is None else env).get(variable)
        if value:
            raw[key] = value
    raw.update({k: v for k, v in overrides.items() if v is not None})
    _apply_metrics_port(raw, (os.environ if env is None else env).get(METRICS_PORT_VARIABLE), path)
    # One file can serve several participants: "{participant_id}" in a path names each its own.
    participant_id = raw.get("participant_id")
    for key in path_keys:
        given = raw.get(key)
        if isinstance(given, str):
            if isinstance(participant_id, str):
                given = given.replace("{participant_id}", participant_id)
            raw[key] = str((path.parent / given).resolve())
    return raw


def _apply_metrics_port(raw: dict[str, object], port: str | None, path: Path) -> None:
    if not port:
        return
    if not port.isdigit():
        raise SettingsError(f"{METRICS_PORT_VARIABLE} must be a port number (0: any free one), got {port!r}")
    table = raw.get("metrics")
    if table is not None and not isinstance(table, dict):
        raise SettingsError(f"{path}: expected `metrics` to be a table")
    raw["metrics"] = {**(table or {}), "enabled": True, "port": int(port)}


def read_toml(path: Path) -> dict[str, object]:
    try:
        raw = msgspec.toml.decode(path.read_bytes())
    except FileNotFoundError as e:
        raise SettingsError(f"settings file {path} does not exist") from e
    except OSError as e:  # a folder, or a file this user may not read
        raise SettingsError(f"cannot read settings file {path}: {e.strerror}") from e
    except msgspec.DecodeError as e:
        raise SettingsError(f"{path}: not valid TOML ({e})") from e
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a TOML table")
    return raw


def convert(raw: Mapping[str, object], kind: type[T], source: Path) -> T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as e:
        raise SettingsError(f"{source}: {e}") from e
