"""Settings files: TOML, then environment and keyword overrides, converted to typed structs on load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import msgspec

from schemas.errors import ChorusError

T = TypeVar("T")


class SettingsError(ChorusError):
    """A settings file or override is missing, unreadable or invalid."""


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
    # One file can serve several participants: "{participant_id}" in a path names each its own.
    participant_id = raw.get("participant_id")
    for key in path_keys:
        given = raw.get(key)
        if isinstance(given, str):
            if isinstance(participant_id, str):
                given = given.replace("{participant_id}", participant_id)
            raw[key] = str((path.parent / given).resolve())
    return raw


def read_toml(path: Path) -> dict[str, object]:
    try:
        raw = msgspec.toml.decode(path.read_bytes())
    except FileNotFoundError as e:
        raise SettingsError(f"settings file {path} does not exist") from e
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
