"""Typed configuration from command-line flags and YAML files, shared by every `convstack` verb.

A config is a pydantic model with `extra="forbid"` and strict types. Each field becomes a flag
(`learning_rate` -> `--learning-rate`, help from the field's description); `--config FILE.yaml`
supplies the same keys; flags override the file, the file overrides the defaults. Unknown keys,
wrong types and out-of-range values raise `ConfigValueError` with one line naming the key.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigValueError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message is one line."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add one flag per field of `model`; unset flags stay absent from the parsed namespace."""
    for name, field in model.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} (default: {default})".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
            const = (field.json_schema_extra or {}).get("flag_const")
            if const is not None:  # `--flag` alone means `--flag CONST`
                kwargs.update(nargs="?", const=const)
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
            kwargs["metavar"] = annotation.__name__.upper()
        else:
            raise TypeError(f"config field {name!r} has an unsupported type {annotation!r}")
        parser.add_argument(flag_name(name), **kwargs)


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigValueError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigValueError(f"{path}: not valid YAML: {first_line}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigValueError(f"{path}: expected a mapping of config keys, got {kind}")
    return data


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<config>"
    flag = flag_name(key) if error["loc"] else ""
    where = f" ({flag})" if flag else ""
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    return f"{source}: {key}{where}: {error['msg']}, got {error.get('input')!r}"


def build_config(
    model: type[ConfigT], namespace: argparse.Namespace, config_file: str | None = None
) -> ConfigT:
    """Merge defaults <- YAML file <- flags and validate strictly."""
    values: dict[str, Any] = {}
    source = "flags"
    if config_file:
        values.update(read_yaml_config(config_file))
        source = f"{config_file} or flags"
    values.update({k: v for k, v in vars(namespace).items() if k in model.model_fields})
    try:
        return model.model_validate(values, strict=True)
    except ValidationError as exc:
        raise ConfigValueError("; ".join(_describe(e, source) for e in exc.errors())) from exc
