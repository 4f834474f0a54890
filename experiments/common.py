"""Pieces shared by the experiment modules."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any
from collections.abc import Callable

import numpy as np
import optax

from experiments import config

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass
class ExperimentResult:
  """What an experiment hands back to the CLI.

  Attributes:
    title: one line for the report.
    columns: the table's column names, in order.
    rows: one dict per table row.
    histories: run name -> metric name -> list of per-upper-step values.
    figures: file name -> function(plt, histories) drawing one figure.
    notes: lines printed under the table.
  """

  title: str
  columns: list
  rows: list
  histories: dict = dataclasses.field(default_factory=dict)
  figures: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def make_alpha(value: Any, upper_lr: float | None = None):
  """A config alpha ('0.5/k', 0.5, '0' or an inline schedule table) as the
  ``alpha`` argument of bda.solve (`config.alpha_schedule`, the one reader)."""
  return config.alpha_schedule(value, upper_lr=upper_lr)


alpha_label = config.alpha_label


def method_name(alpha_value: Any, truncate=None) -> str:
  if config.alpha_is_zero(alpha_value):
    return "T-RHG" if truncate else "RHG"
  return "T-BDA" if truncate else "BDA"


def spread(values) -> dict:
  """Mean, standard error (std with ddof=1 over sqrt(n)), median, min, max
  and n of per-seed or per-instance values, as Python floats. The standard
  error of one value is undefined: NaN, never 0.

  Examples:
    >>> s = spread([1.0, 2.0, 3.0, 6.0])
    >>> s["mean"], round(s["se"], 4), s["n"]
    (3.0, 1.0801, 4)
  """
  v = np.asarray(values, dtype=float).ravel()
  n = v.size
  se = float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
  return {
    "mean": float(np.mean(v)),
    "se": se,
    "median": float(np.median(v)),
    "min": float(np.min(v)),
    "max": float(np.max(v)),
    "n": int(n),
  }


def progress(message: str, quiet: bool = False) -> None:
  if not quiet:
    print(message, file=sys.stderr, flush=True)


UPPER_SCHEMA = {
  "optimizer": config.Field("str", "sgd", config.one_of(*OPTIMIZERS)),
  "learning_rate": config.Field("float", 0.1, config.positive),
  "steps": config.Field("int", 100, config.positive),
  "log_every": config.Field("int", 0),
}


def upper_schema(**defaults) -> dict[str, config.Field]:
  """`UPPER_SCHEMA` with experiment-specific defaults."""
  schema = dict(UPPER_SCHEMA)
  for key, value in defaults.items():
    schema[key] = dataclasses.replace(schema[key], default=value)
  return schema


def plot_metric_grid(
  metrics: list[tuple[str, str]],
  runs: dict[str, dict],
  title: str,
  styles: Callable[[str], dict] | None = None,
):
  """Returns a plotting function: one log-scale panel per metric, one curve
  per run, x axis = upper iteration."""

  def draw(plt):
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    for ax, (key, label) in zip(axes, metrics):
      for name, hist in runs.items():
        values = [max(v, 1e-16) for v in hist[key]]
        ax.semilogy(
          range(1, len(values) + 1), values, label=name, **(styles(name) if styles else {})
        )
      ax.set_xlabel("upper iteration")
      ax.set_title(label)
      ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

  return draw
