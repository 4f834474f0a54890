"""Pieces shared by the value-function experiments: the (VFP_eps) solver
settings in a config, timing with compile time separated, and the per-mu_k
report (multiplier lambda_k, KKT residual of (2.4), inner status).

A VFP run whose final KKT residual is above the default ``kkt_tol`` of
`solve_vfp` reports ``not_stationary`` in the table's status column, and one
whose value function failed at the final iterate of some mu_k
``inner_failed (<inner status>)``: the table shows the status, it does not
hide it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from experiments import config
from bilevel_jax._src import status as status_lib
from experiments import common
from bilevel_jax._src.value import vfp

F = config.Field


def vfp_schema(**defaults) -> dict:
  """The [vfp] section: mu schedule, eps and the augmented-Lagrangian settings."""
  schema = {
    "mus": F("list[float]", [1e-1, 1e-2, 1e-3], config.positive, "decreasing mu_k"),
    "epsilon": F("float", 1e-3, config.positive, "eps of (VFP_eps)"),
    "optimizer": F("str", "adam", config.one_of(*common.OPTIMIZERS)),
    "learning_rate": F("float", 1e-2, config.positive),
    "inner_steps": F("int", 150, config.positive),
    "outer_steps": F("int", 8, config.positive),
    "rho": F("float", 10.0, config.positive),
    "repeats": F("int", 3, config.positive, "timed runs after compilation"),
  }
  for key, value in defaults.items():
    schema[key] = F(schema[key].kind, value, schema[key].check, schema[key].doc)
  return schema


def timed(fn: Callable, *args, repeats: int = 3):
  """Compiles ``fn`` once (timed), then runs it ``repeats`` times.

  Returns ``(output, compile_s, median run_s)``; runs are timed around
  `jax.block_until_ready`.
  """
  tic = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - tic
  times, out = [], None
  for _ in range(repeats):
    tic = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - tic)
  return out, compile_s, statistics.median(times)


def solve(
  cfg_vfp: dict,
  upper,
  lower,
  value_fn,
  x0,
  y0,
  projection_x=None,
  projection_y=None,
  pass_mu: bool = False,
):
  """Runs `solve_vfp` with the config's settings; returns (solution, compile_s, run_s)."""
  optimizer = common.make_optimizer(cfg_vfp["optimizer"], cfg_vfp["learning_rate"])
  mus = np.asarray(cfg_vfp["mus"], dtype=float)

  def run(x0, y0):
    return vfp.solve_vfp(
      upper,
      lower,
      value_fn,
      x0,
      y0,
      mus=mus,
      epsilon=cfg_vfp["epsilon"],
      optimizer=optimizer,
      projection_x=projection_x,
      projection_y=projection_y,
      inner_steps=cfg_vfp["inner_steps"],
      outer_steps=cfg_vfp["outer_steps"],
      rho=cfg_vfp["rho"],
      pass_mu=pass_mu,
    )

  return timed(run, x0, y0, repeats=cfg_vfp["repeats"])


def status_label(status, inner_status=None) -> str:
  """``"success"``, ``"not_stationary"``, ``"inner_failed (inaccurate)"``, ..."""
  code = int(np.asarray(status))
  try:
    label = status_lib.Status(code).name.lower()
  except ValueError:
    label = f"status {code}"
  if code == status_lib.INNER_FAILED and inner_status is not None:
    label += f" ({status_label(inner_status)})"
  return label


def per_mu(info) -> dict:
  """The per-mu_k record (lists) of a `VFPInfo`, with the final status."""
  keys = (
    "mus",
    "lambdas",
    "kkt_residual",
    "stationarity",
    "feasibility",
    "complementarity",
    "constraint",
    "upper_value",
    "inner_statuses",
  )
  out = {k: np.asarray(getattr(info, k)).tolist() for k in keys}
  out["x"] = np.asarray(info.xs).reshape(len(out["mus"]), -1).tolist()
  out["status"] = status_label(info.status, info.inner_status)
  out["kkt_tol"] = float(info.kkt_tol)
  out["lambda_growing"] = bool(info.lambda_growing)
  return out


def kkt_figure(runs: dict, title: str):
  """lambda_k and the KKT residual of (2.4) against mu_k, one curve per run."""

  def draw(plt):
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.4))
    for name, rec in runs.items():
      axes[0].semilogx(rec["mus"], rec["lambdas"], "o-", label=name)
      axes[1].loglog(rec["mus"], np.maximum(rec["kkt_residual"], 1e-16), "o-", label=name)
    for ax, label in zip(axes, ("multiplier lambda_k", "KKT residual of (2.4)")):
      ax.set_xlabel("mu_k")
      ax.set_title(label)
      ax.invert_xaxis()
      ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

  return draw


def vfp_row(method: str, sol, x_ref, compile_s: float, run_s: float, **extra) -> dict:
  """One table row: final x, its error against ``x_ref``, lambda, KKT, times."""
  x = np.asarray(sol.x, dtype=float).ravel()
  err = float(np.linalg.norm(x - np.asarray(x_ref, dtype=float).ravel()))
  return {
    "method": method,
    "x": [round(float(v), 5) for v in x] if x.size > 1 else float(x[0]),
    "x_err": err,
    "lambda": float(sol.lam),
    "kkt": float(sol.info.kkt_residual[-1]),
    "compile_s": compile_s,
    "run_s": run_s,
    "status": status_label(sol.info.status, sol.info.inner_status)
    + (", lambda growing" if bool(sol.info.lambda_growing) else ""),
    **extra,
  }


COLUMNS = ["method", "x", "x_err", "F", "y", "lambda", "kkt", "compile_s", "run_s", "status"]


def bda_row(method: str, result, x_ref: float, upper) -> dict:
  """A table row for a BDA run of `upper_loop.optimize` (scalar x)."""
  y = np.asarray(result.y).ravel()
  return {
    "method": method,
    "x": float(result.x),
    "x_err": abs(float(result.x) - x_ref),
    "F": float(upper(result.x, result.y)),
    "y": [round(float(v), 5) for v in y] if y.size > 1 else float(y[0]),
    "compile_s": float(result.info.compile_time),
    "run_s": float(np.sum(result.history["step_time"])),
    "status": status_label(result.info.status, result.info.inner_status),
  }


def result(
  title: str, rows: list, records: dict, figure: str, notes: list, **extra
) -> common.ExperimentResult:
  """The `ExperimentResult` of a VFP experiment: table, per-mu_k records, KKT figure."""
  return common.ExperimentResult(
    title=title,
    columns=COLUMNS,
    rows=rows,
    histories=records,
    figures={figure: kkt_figure(records, title.split(":")[0])},
    notes=notes,
    extra={"per_mu": records, **extra},
  )
