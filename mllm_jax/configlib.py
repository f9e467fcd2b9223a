"""Typed, validated views of ml_collections configs.

Configs are Python (`configs/*.py`, overridable as `--config.a.b=1`), but code
reads them through frozen dataclasses so a typo or a bad value fails before
anything compiles, with a message that names the field (`model.num_heads`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config field is unknown, missing or has a bad value; the message names it."""


def to_dict(config: Any) -> dict[str, Any]:
  """ConfigDict / FrozenConfigDict / mapping / dataclass -> plain dict."""
  if dataclasses.is_dataclass(config):
    return dataclasses.asdict(config)
  if hasattr(config, "to_dict"):
    return config.to_dict()
  if isinstance(config, Mapping):
    return dict(config)
  raise ConfigError(f"expected a config mapping, got {type(config).__name__}")


def from_config(cls: type[T], config: Any, prefix: str) -> T:
  """Builds dataclass `cls` from `config`, rejecting unknown fields by name.

  Nested dataclass fields are built recursively; lists become tuples so the
  result is hashable (it is used as a static jit argument).
  """
  values = to_dict(config)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(
        f"{prefix}.{unknown[0]}: unknown field; {prefix} accepts {sorted(names)}")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      value = from_config(hint, value, f"{prefix}.{name}")
    elif isinstance(value, list):
      value = _freeze(value)
    kwargs[name] = value
  obj = cls(**kwargs)
  validate = getattr(obj, "validate", None)
  if validate is not None:
    validate(prefix)
  return obj


def _freeze(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def check(condition: bool, field: str, message: str) -> None:
  """Raises ConfigError naming `field` unless `condition` holds."""
  if not condition:
    raise ConfigError(f"{field}: {message}")


def check_choice(value: Any, choices: typing.Iterable[Any], field: str) -> None:
  choices = tuple(choices)
  check(value in choices, field, f"got {value!r}; choose one of {choices}")
