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
  "list[float]", "list[str]", "alpha" (a number in [0, 1], "c/k", or an
  inline table naming any schedule of `bilevel_jax.schedules`, see
  `parse_schedule`), or "list[alpha]".
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
    raise ValueError(
      f"cannot read {value!r} as alpha (a number in [0, 1], 'c/k', or an inline "
      "table { schedule = ..., ... })"
    )
  if not 0 <= c <= 1:
    raise ValueError(f"alpha constant {c} must lie in [0, 1]")
  return kind, c


# Inline-table schedules: name -> (required keys, optional keys), the
# keyword arguments of the factory in `bilevel_jax.schedules`.
SCHEDULES = {
  "constant": (("value",), ()),
  "harmonic": (("c",), ()),
  "geometric": (("alpha0", "decay"), ()),
  "theorem2": (("sigma", "smoothness"), ("gamma", "epsilon", "upper_lr")),
}


def parse_schedule(value: dict) -> dict:
  """Checks an inline-table alpha such as ``{ schedule = "theorem2", sigma
  = 1.0, smoothness = 1.0, gamma = 1.0 }`` and returns a copy.

  ``schedule`` names a factory of `bilevel_jax.schedules` ("constant",
  "harmonic", "geometric", "theorem2"); the other keys are its keyword
  arguments. Theorem 2's ``upper_lr`` (s_u) may be left out: the experiment
  then passes its own s_u (see `alpha_schedule`). Raises ValueError naming
  the bad key.
  """
  if "schedule" not in value:
    raise ValueError(
      f"schedule table needs the key `schedule` (one of {sorted(SCHEDULES)}); got keys "
      f"{sorted(value)}"
    )
  name = value["schedule"]
  if name not in SCHEDULES:
    raise ValueError(f"`schedule` = {name!r} must be one of {sorted(SCHEDULES)}")
  required, optional = SCHEDULES[name]
  params = {k: v for k, v in value.items() if k != "schedule"}
  for key in params:
    if key not in required + optional:
      raise ValueError(
        f"unknown key `{key}` for schedule {name!r}; known keys: {sorted(required + optional)}"
      )
  for key in required:
    if key not in params:
      raise ValueError(f"schedule {name!r} needs the key `{key}`")
  for key, v in params.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"schedule {name!r}: `{key}` = {v!r} must be a finite number")
  # Build it once so that out-of-range values fail here, naming their key
  # (Theorem 2 without upper_lr: checked with the largest s_u it allows).
  try:
    _build(name, params, None)
  except ValueError as err:
    raise ValueError(f"schedule {name!r}: {err}") from None
  return {"schedule": name, **params}


def _build(name: str, params: dict, upper_lr):
  from bilevel_jax._src import schedules

  if name == "theorem2":
    params = dict(params)
    if "upper_lr" not in params:
      if upper_lr is None:  # validation only: the largest s_u Theorem 2 allows
        sigma, smooth = float(params["sigma"]), float(params["smoothness"])
        upper_lr = 2.0 / (smooth + sigma) if sigma > 0 and smooth > 0 else 1.0
      params["upper_lr"] = upper_lr
  return getattr(schedules, name)(**params)


def alpha_schedule(value, upper_lr: float | None = None):
  """A config alpha as the ``alpha`` argument of `bilevel_jax.bda.solve`:
  a number for a constant ("0.5", 0.5), `schedules.harmonic` for "c/k", and
  the named factory for an inline table. ``upper_lr`` is the experiment's
  s_u, used by a "theorem2" table that does not give its own. Raises
  ConfigError naming the key when the schedule's constants are invalid for
  this s_u (Theorem 2 needs s_u <= 2 / (smoothness + sigma))."""
  if isinstance(value, dict):
    params = parse_schedule(value)
    name = params.pop("schedule")
    try:
      return _build(name, params, upper_lr)
    except ValueError as err:
      raise ConfigError(f"alpha schedule {name!r} with s_u = {upper_lr}: {err}") from None
  from bilevel_jax._src import schedules

  kind, c = parse_alpha(value)
  return schedules.harmonic(c) if kind == "harmonic" else c


def alpha_label(value) -> str:
  """Short label: "0.5/k", "0.5", or "theorem2(sigma=1, smoothness=1, ...)"."""
  if isinstance(value, dict):
    params = parse_schedule(value)
    name = params.pop("schedule")
    return f"{name}(" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")"
  kind, c = parse_alpha(value)
  return f"{c:g}/k" if kind == "harmonic" else f"{c:g}"


def alpha_is_zero(value) -> bool:
  """True when the config alpha is the constant 0 (RHG)."""
  if isinstance(value, dict):
    params = parse_schedule(value)
    return params["schedule"] == "constant" and params["value"] == 0
  kind, c = parse_alpha(value)
  return kind == "constant" and c == 0


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
    if isinstance(value, dict):
      return parse_schedule(value)
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
