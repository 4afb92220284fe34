"""`models.config`: TensorFlow Serving's `ModelServerConfig` text proto.

The same file is read by the embedded server and by the `tensorflow/serving` container
(`--model_config_file`), so validation follows what TF Serving accepts, plus a few static checks
that catch rollout mistakes before a server sees them. Every edit returns a modified copy; the
file is only ever replaced atomically. Pure: no TensorFlow import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from convstack.common.files import write_atomic

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig

TENSORFLOW_PLATFORM = "tensorflow"
# ModelType.TENSORFLOW of the deprecated `model_type` field, which TF Serving still honours.
_DEPRECATED_MODEL_TYPE_TENSORFLOW = 1
# "1:40 : Message type ..." -> the problem alone; line and column are reported separately.
_PARSE_POSITION = re.compile(r"^\s*\d+(:\d+)?\s*:\s*")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ModelConfigError(ValueError):
    """A models.config that cannot be parsed, read, written or served; one line, naming it."""


def parse_model_config(text: str, source: str = "<models.config>") -> ModelServerConfig:
    """Parse ModelServerConfig text; ModelConfigError names `source`, the line and the problem."""
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        problem = _PARSE_POSITION.sub("", str(exc)).replace("\n", " ")
        line, column = exc.GetLine(), exc.GetColumn()
        where = f"line {line}, column {column}" if line is not None else "parse error"
        # TF Serving's wording leads, so that tools grepping its message find ours too.
        raise ModelConfigError(
            f"{source}: {where}: Error parsing text-format {config.DESCRIPTOR.full_name}: {problem}"
        ) from exc
    return config


def load_model_config(path: str | os.PathLike) -> ModelServerConfig:
    """Read, parse and validate the config file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read the model config: {exc}") from exc
    config = parse_model_config(text, source=str(path))
    try:
        validate_model_config(config)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{path}: {exc}") from exc
    return config


def format_model_config(config: ModelServerConfig) -> str:
    """Text format, stable for equal configs (field order of the proto, labels sorted)."""
    return text_format.MessageToString(config)


def write_model_config(path: str | os.PathLike, config: ModelServerConfig) -> None:
    """Validate `config` and replace `path` with it atomically and durably
    (`convstack.common.files`): a server polling the file sees either the old or the new
    config, never half of one."""
    validate_model_config(config)
    write_atomic(path, format_model_config(config))


def single_model_config(name: str, base_path: str | os.PathLike) -> ModelServerConfig:
    """One TensorFlow model serving its latest version, like `--model_name/--model_base_path`."""
    return add_model(ModelServerConfig(), name, base_path, latest=1)


def validate_model_config(config: ModelServerConfig) -> None:
    """ModelConfigError naming the model unless TF Serving could serve `config`.

    TF Serving's rules: a `model_config_list` (custom configs are not supported here), unique
    names, an absolute base path (or URI), platform "tensorflow". Static checks on top: names
    and base paths non-empty, `specific` lists at least one version, and with a `specific`
    policy every label points at one of its versions (any other label could never resolve).
    An empty config (no models) is valid, as in TF Serving.
    """
    kind = config.WhichOneof("config")
    if kind == "custom_model_config":
        raise ModelConfigError("custom_model_config is not supported; use model_config_list")
    seen: set[str] = set()
    for index, model in enumerate(config.model_config_list.config):
        if not model.name:
            raise ModelConfigError(f"model #{index + 1} in model_config_list has an empty name")
        if model.name in seen:
            raise ModelConfigError(
                f"Illegal to list model {model.name} multiple times in config list"
            )
        seen.add(model.name)
        _validate_model(model)


def _validate_model(model: ModelConfig) -> None:
    name = model.name
    if not model.base_path:
        raise ModelConfigError(f"model {name!r} has no base_path")
    if not (os.path.isabs(model.base_path) or _URI_SCHEME.match(model.base_path)):
        raise ModelConfigError(
            f"Expected model {name} to have an absolute path or URI; "
            f"got base_path()={model.base_path}"
        )
    _validate_platform(model)
    policy = model.model_version_policy
    if policy.WhichOneof("policy_choice") == "specific":
        specific = set(policy.specific.versions)
        if not specific:
            raise ModelConfigError(f"model {name!r}: the specific version policy lists no versions")
        for label, version in sorted(model.version_labels.items()):
            if version not in specific:
                raise ModelConfigError(
                    f"model {name!r}: label {label!r} points at version {version}, which is not "
                    f"among the specific versions {sorted(specific)} it serves"
                )
    for label, version in sorted(model.version_labels.items()):
        if not label:
            raise ModelConfigError(f"model {name!r} has a version label with an empty name")
        if version < 1:
            raise ModelConfigError(f"model {name!r}: label {label!r} points at version {version}")


def _validate_platform(model: ModelConfig) -> None:
    # TF Serving has no default platform: a config without one fails to load there.
    name = model.name
    if model.model_type:
        if model.model_platform:
            raise ModelConfigError(
                f"model {name!r} sets both model_type (deprecated) and model_platform"
            )
        if model.model_type != _DEPRECATED_MODEL_TYPE_TENSORFLOW:
            raise ModelConfigError(f"model {name!r}: model_type {model.model_type} not supported")
        return
    if model.model_platform != TENSORFLOW_PLATFORM:
        got = repr(model.model_platform) if model.model_platform else "nothing"
        raise ModelConfigError(
            f'model {name!r}: model_platform must be "{TENSORFLOW_PLATFORM}" (TF Serving '
            f"requires it), got {got}"
        )


def _copy(config: ModelServerConfig) -> ModelServerConfig:
    copy = ModelServerConfig()
    copy.CopyFrom(config)
    return copy


def _find(config: ModelServerConfig, name: str) -> ModelConfig:
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    raise ModelConfigError(f"model {name!r} is not in the config")


def _set_policy(
    model: ModelConfig, latest: int | None, all: bool, specific: Sequence[int] | None
) -> None:
    chosen = [latest is not None, bool(all), specific is not None]
    if sum(chosen) != 1:
        raise ModelConfigError(
            f"model {model.name!r}: give exactly one version policy (latest, all or specific)"
        )
    policy = model.model_version_policy
    policy.Clear()
    if latest is not None:
        if isinstance(latest, bool) or int(latest) != latest or latest < 1:
            raise ModelConfigError(f"model {model.name!r}: latest must be >= 1, got {latest!r}")
        policy.latest.num_versions = int(latest)
    elif all:
        policy.all.SetInParent()
    else:
        versions = sorted({int(v) for v in specific})
        if not versions or versions[0] < 1:
            raise ModelConfigError(
                f"model {model.name!r}: specific needs positive versions, got {list(specific)}"
            )
        policy.specific.versions.extend(versions)


def set_version_policy(
    config: ModelServerConfig,
    name: str,
    *,
    latest: int | None = None,
    all: bool = False,
    specific: Sequence[int] | None = None,
) -> ModelServerConfig:
    """A copy of `config` where model `name` serves `latest` N, `all` or `specific` versions."""
    copy = _copy(config)
    _set_policy(_find(copy, name), latest, all, specific)
    return copy


def set_version_labels(
    config: ModelServerConfig, name: str, labels: Mapping[str, int]
) -> ModelServerConfig:
    """A copy of `config` where model `name` carries exactly `labels` (label -> version)."""
    copy = _copy(config)
    model = _find(copy, name)
    model.version_labels.clear()
    for label, version in labels.items():
        model.version_labels[label] = int(version)
    return copy


def add_model(
    config: ModelServerConfig,
    name: str,
    base_path: str | os.PathLike,
    *,
    latest: int | None = None,
    all: bool = False,
    specific: Sequence[int] | None = None,
    labels: Mapping[str, int] | None = None,
) -> ModelServerConfig:
    """A copy of `config` with a new TensorFlow model (policy defaults to latest 1)."""
    if any(model.name == name for model in config.model_config_list.config):
        raise ModelConfigError(f"model {name!r} is already in the config")
    if latest is None and not all and specific is None:
        latest = 1
    copy = _copy(config)
    model = copy.model_config_list.config.add(
        name=name, base_path=str(base_path), model_platform=TENSORFLOW_PLATFORM
    )
    _set_policy(model, latest, all, specific)
    for label, version in (labels or {}).items():
        model.version_labels[label] = int(version)
    return copy


def remove_model(config: ModelServerConfig, name: str) -> ModelServerConfig:
    """A copy of `config` without model `name`."""
    copy = _copy(config)
    models = copy.model_config_list.config
    for index, model in enumerate(models):
        if model.name == name:
            del models[index]
            return copy
    raise ModelConfigError(f"model {name!r} is not in the config")
