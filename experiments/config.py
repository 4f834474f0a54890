"""Experiment configs: TOML files validated against a per-experiment schema.

A config names its experiment at the top level (``experiment = "example1"``)
and sets keys in sections. Unknown sections or keys and values of the wrong
type or range raise `ConfigError` naming the file and the key; missing keys
take the schema's defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any
from collections.abc import Callable

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib


class ConfigError(ValueError):
  """A config file has an unknown key or a bad value."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: its type, default and an optional check.

  ``kind`` is one of "int", "float", "str", "bool", "list[int]",
  "list[float]", "list[str]", "alpha" (a number in [0, 1] or "c/k"), or
  "list[alpha]".
  """

  kind: str
  default: Any
  check: Callable[[Any], str | None] | None = None
  doc: str = ""


def positive(value):
  values = value if isinstance(value, list) else [value]
  if any(not v > 0 for v in values):
    return "must be > 0"
  return None


def one_of(*choices):
  def check(value):
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if v not in choices]
    return f"must be one of {list(choices)}" if bad else None

  return check


def unit_interval(value):
  return None if 0 <= value <= 1 else "must lie in [0, 1]"


def parse_alpha(value) -> tuple[str, float]:
  """'0.5/k' -> ('harmonic', 0.5); 0.5 or '0.5' -> ('constant', 0.5)."""
  if isinstance(value, bool):
    raise ValueError("a boolean is not an alpha")
  if isinstance(value, (int, float)):
    kind, c = "constant", float(value)
  elif isinstance(value, str) and value.replace(" ", "").endswith("/k"):
    kind, c = "harmonic", float(value.replace(" ", "")[:-2])
  elif isinstance(value, str):
    kind, c = "constant", float(value)
  else:
    raise ValueError(f"cannot read {value!r} as alpha")
  if not 0 <= c <= 1:
    raise ValueError(f"alpha constant {c} must lie in [0, 1]")
  return kind, c


def _coerce(kind: str, value):
  """Returns the value converted to ``kind`` or raises ValueError."""
  if kind.startswith("list["):
    if not isinstance(value, list) or not value:
      raise ValueError("must be a non-empty list")
    return [_coerce(kind[5:-1], v) for v in value]
  if kind == "bool":
    if not isinstance(value, bool):
      raise ValueError("must be true or false")
    return value
  if kind == "int":
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError("must be an integer")
    return value
  if kind == "float":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError("must be a number")
    if not math.isfinite(value):
      raise ValueError("must be a finite number")
    return float(value)
  if kind == "str":
    if not isinstance(value, str):
      raise ValueError("must be a string")
    return value
  if kind == "alpha":
    parse_alpha(value)
    return value
  raise AssertionError(f"unknown field kind {kind}")


def validate(raw: dict, schema: dict[str, dict[str, Field]], source: str) -> dict:
  """Checks ``raw`` (parsed TOML, without the ``experiment`` key) against
  ``schema`` and fills in defaults."""
  out: dict[str, dict[str, Any]] = {}
  for section in raw:
    if section not in schema:
      raise ConfigError(f"{source}: unknown section [{section}]; known sections: {sorted(schema)}.")
    if not isinstance(raw[section], dict):
      raise ConfigError(f"{source}: `{section}` must be a [section] table.")
  for section, fields in schema.items():
    given = raw.get(section, {})
    for key in given:
      if key not in fields:
        raise ConfigError(
          f"{source}: unknown key `{key}` in [{section}]; known keys: {sorted(fields)}."
        )
    values = {}
    for key, field in fields.items():
      if key not in given:
        values[key] = field.default
        continue
      try:
        value = _coerce(field.kind, given[key])
      except ValueError as err:
        raise ConfigError(f"{source}: [{section}] `{key}` = {given[key]!r} {err}.") from None
      problem = field.check(value) if field.check else None
      if problem:
        raise ConfigError(f"{source}: [{section}] `{key}` = {given[key]!r} {problem}.")
      values[key] = value
    out[section] = values
  return out


def check_out_dir(path: str) -> None:
  """Raises ``ConfigError`` when the ``--out`` folder cannot be a folder."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--out {path!r} is a file; give a folder.")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise ConfigError(f"--out {path!r}: {parent!r} is not a writable folder.")


def read_toml(path: str) -> dict:
  """The parsed TOML file at ``path``: the one place configs are read.

  Raises ``ConfigError`` naming the file when it is missing, a folder, not
  UTF-8 or not valid TOML.
  """
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist.")
  if os.path.isdir(path):
    raise ConfigError(f"config path {path!r} is a folder, not a TOML file.")
  try:
    with open(path, "rb") as handle:
      text = handle.read().decode("utf-8")
    return tomllib.loads(text)
  except UnicodeDecodeError as err:
    raise ConfigError(
      f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})."
    ) from None
  except tomllib.TOMLDecodeError as err:
    raise ConfigError(f"{path}: not valid TOML: {err}") from None
  except OSError as err:
    raise ConfigError(f"{path}: cannot be read: {err.strerror}.") from None


def read(path: str) -> tuple[str, dict]:
  """Returns (experiment name, raw sections) of an experiment's TOML config."""
  raw = read_toml(path)
  experiment = raw.pop("experiment", None)
  if experiment is None:
    raise ConfigError(f"{path}: missing top-level key `experiment`.")
  raw.pop("description", None)
  return experiment, raw


def description(path: str) -> str:
  """The optional top-level ``description`` of a config."""
  return str(read_toml(path).get("description", ""))
