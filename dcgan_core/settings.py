"""Settings of both halves, declared once: dataclass fields with their default, help and choices.

A field is declared with :func:`setting` (default, help text, choices); the same declaration
gives the command-line flag (:func:`add_flags`: its type, choices and "(default: ...)" in the
help) and checks values from every layer (:func:`apply`: presets, TOML files, flags and saved
configs are coerced by one rule, unknown keys and wrong types are errors naming the key and
where the value came from). Usage errors exit 2 in every CLI (argparse's own, and
:class:`SettingsError` by the CLIs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key, the value and its origin."""


def setting(default: Any, help: str = "", choices: tuple = (), flag: bool = True) -> Any:
    """A dataclass field with what its flag and its checks need (``flag=False``: file only)."""
    metadata = {"help": help, "choices": tuple(choices), "flag": flag}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def coerce(value: Any, kind: type, key: str, origin: str, error: type[Exception] = SettingsError) -> Any:
    """``value`` as ``kind``: text is parsed (flags, --set), an int is a float where one is
    expected; anything else must already have the type."""
    if isinstance(value, str) and kind is not str:
        value = _parse_text(value, kind, key, origin, error)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise error(f"{origin}: {key} = {value!r} must be {kind.__name__}")
    return value


def _parse_text(text: str, kind: type, key: str, origin: str, error: type[Exception]) -> Any:
    if kind is list:  # "3", "3,8" or "[3, 8]"
        try:
            return json.loads(text if text.strip().startswith("[") else f"[{text}]")
        except ValueError:
            pass
    if kind is bool and text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    if kind is not bool:
        try:
            return kind(text)
        except ValueError:
            pass
    raise error(f"{origin}: {key} = {text!r} is not a valid {kind.__name__}")


def apply(target: Any, values: dict[str, Any], origin: str, prefix: str = "",
          error: type[Exception] = SettingsError) -> None:
    """Set ``values`` on the dataclass ``target``; a nested dataclass takes a table of its own."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise error(f"{origin}: {_unknown(target, name, prefix)} are {', '.join(fields)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise error(f"{origin}: [{name}] must be a table of settings")
            apply(current, value, origin, f"{name}.", error)
        else:
            kind = type(current)
            coerced = value if kind in (list, dict) and isinstance(value, kind) else coerce(value, kind, name,
                                                                                             origin, error)
            setattr(target, key, coerced)


def _unknown(target: Any, name: str, prefix: str) -> str:
    if prefix:
        return f"unknown key {name}; keys of [{prefix[:-1]}]"
    if all(dataclasses.is_dataclass(getattr(target, f.name)) for f in dataclasses.fields(target)):
        return f"unknown section [{name}]; sections"
    return f"unknown setting {name!r}; settings"


def read_toml(path: Path, error: type[Exception] = SettingsError) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"config file {path} is not UTF-8 text (byte {exc.start}): is it a TOML file?") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise error(f"cannot read config file {path}: {exc}") from None


def add_flags(parser: argparse.ArgumentParser, settings: type) -> None:
    """One ``--flag-name`` per field of the ``settings`` dataclass, default None (unset: the file
    or the default decides); booleans that default to True get a ``--no-`` flag."""
    defaults = settings()
    for field in dataclasses.fields(settings):
        if not field.metadata.get("flag", False):
            continue
        default, flag = getattr(defaults, field.name), "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {default})" if default != "" else field.metadata["help"]
        if isinstance(default, bool):
            negative = "--no-" + field.name.replace("_", "-")
            parser.add_argument(negative if default else flag, dest=field.name, action="store_const",
                                const=not default, help=field.metadata["help"])
            continue
        choices = field.metadata.get("choices") or None
        parser.add_argument(flag, type=type(default), choices=choices, help=help_text)


def declaration(settings: type, key: str) -> tuple[dataclasses.Field, Any]:
    """The field declared for a dotted key (``run.device``) of ``settings``, and its default."""
    target: Any = settings()
    *sections, name = key.split(".")
    for section in sections:
        target = getattr(target, section)
    field = {f.name: f for f in dataclasses.fields(target)}[name]
    return field, getattr(target, name)


def add_shorthand(parser: argparse.ArgumentParser, flag: str, settings: type, key: str) -> None:
    """``flag`` for the setting ``key``, its help and choices from the declaration (the value is
    checked and coerced with the rest of the settings)."""
    field, default = declaration(settings, key)
    choices = [str(c) for c in field.metadata.get("choices", ())] or None
    parser.add_argument(flag, choices=choices, dest=flag.lstrip("-").replace("-", "_"),
                        help=f"{field.metadata.get('help', '')} (--set {key}=...; default: {default})")
