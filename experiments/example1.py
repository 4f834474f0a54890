"""Example 1 of the BDA paper (Section 5.1, Figures 1-3): BDA against RHG on
a lower level with a continuum of solutions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments import config
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import unrolled
from bilevel_jax._src import upper_loop
from experiments import common
from bilevel_jax._src.problems import example1 as ex1

F = config.Field
SCHEMA = {
  "problem": {
    "x0": F("float", 0.0),
    "y0": F("list[float]", [2.0, 2.0], lambda v: None if len(v) == 2 else "must have 2 entries"),
  },
  "lower": {
    "upper_lr": F("float", 0.7, config.positive, "s_u"),
    "lower_lr": F("float", 0.2, config.positive, "s_l"),
    "K": F("list[int]", [8, 16, 64], config.positive),
    "alphas": F(
      "list[alpha]",
      ["0.5/k", "0.9/k", 0.5, 0],
      doc="numbers, 'c/k' strings or schedule tables such as "
      "{ schedule = 'theorem2', sigma = 1.0, smoothness = 1.0 } (s_u from upper_lr)",
    ),
  },
  "upper": common.upper_schema(optimizer="sgd", learning_rate=0.5, steps=100),
  "figures": {
    "enabled": F("bool", True),
    "K": F("int", 16, config.positive),
    "alpha": F("alpha", "0.5/k"),
    "k_alphas": F("list[alpha]", [0], doc="schedules drawn beside `alpha` in Figure 2 (0: RHG)"),
    "init_x": F("list[float]", [0.0, 0.0, 2.0]),
    "init_y": F("list[list[float]]", [[0.0, 0.0], [2.0, 2.0], [2.0, 2.0]]),
  },
}

METRICS = [
  ("F_gap", "|F - F*|"),
  ("f_gap", "|f - f*(x)|"),
  ("x_err", "||x - x*||^2/||x*||^2"),
  ("y_err", "||y - y*||^2/||y*||^2"),
]


def method_name(alpha) -> str:
  return "RHG" if config.alpha_is_zero(alpha) else "BDA"


def alpha_key(alpha) -> str:
  """A key without dots for the results summary: '0p5_k', '0', 'theorem2'."""
  if isinstance(alpha, dict):
    return alpha["schedule"]
  return config.alpha_label(alpha).replace(".", "p").replace("/", "_")


def _run(cfg, K, alpha, x0, y0):
  hg = unrolled.make_hypergradient(
    ex1.upper,
    ex1.lower,
    steps=K,
    upper_lr=cfg["lower"]["upper_lr"],
    lower_lr=cfg["lower"]["lower_lr"],
    alpha=config.alpha_schedule(alpha, upper_lr=cfg["lower"]["upper_lr"]),
  )
  up = cfg["upper"]
  result = upper_loop.optimize(
    hg,
    jnp.asarray(x0),
    common.make_optimizer(up["optimizer"], up["learning_rate"]),
    steps=up["steps"],
    y0=jnp.asarray(y0),
    projection=ex1.projection(),
    metrics_fn=ex1.metrics,
    log_every=up["log_every"],
  )
  return result


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  prob, low, figs = cfg["problem"], cfg["lower"], cfg["figures"]
  default_init = (prob["x0"], tuple(prob["y0"]))
  results, histories = {}, {}

  def get(K, alpha, init=default_init):
    """Runs (K, alpha, init) once; the table and all three figures share runs."""
    name = f"{method_name(alpha)} K={K} alpha={config.alpha_label(alpha)}"
    if init != default_init:
      name += f" x0={init[0]:g} y0=({init[1][0]:g},{init[1][1]:g})"
    if name not in results:
      common.progress(f"[example1] {name}", quiet)
      results[name] = _run(cfg, K, alpha, init[0], list(init[1]))
      histories[name] = {k: v.tolist() for k, v in results[name].history.items()}
    return results[name], histories[name]

  rows = []
  for K in low["K"]:
    for alpha in low["alphas"]:
      result, hist = get(K, alpha)
      rows.append(
        {
          "method": method_name(alpha),
          "K": K,
          "alpha": config.alpha_label(alpha),
          "x": float(result.x),
          "y": [round(float(v), 6) for v in np.asarray(result.y)],
          **{key: hist[key][-1] for key, _ in METRICS},
          "ms_per_step": 1e3 * float(np.median(result.history["step_time"])),
          "status": status_lib.status_message(result.info.status),
        }
      )

  figures = {}
  if figs["enabled"]:
    if len(figs["init_x"]) != len(figs["init_y"]):
      raise config.ConfigError("[figures] `init_x` and `init_y` must have the same length.")
    pair = (figs["alpha"], 0)  # BDA with the figure's schedule, and RHG
    init_runs = {
      f"{method_name(a)} x0={x0:g} y0=({y0[0]:g},{y0[1]:g})": get(figs["K"], a, (x0, tuple(y0)))[1]
      for x0, y0 in zip(figs["init_x"], figs["init_y"])
      for a in pair
    }
    k_alphas = [figs["alpha"]] + [a for a in figs["k_alphas"] if a != figs["alpha"]]
    k_runs = {
      f"{method_name(a)} K={K}"
      + ("" if config.alpha_is_zero(a) else f" alpha={config.alpha_label(a)}"): get(K, a)[1]
      for K in low["K"]
      for a in k_alphas
    }
    a_runs = {f"alpha={config.alpha_label(a)}": get(figs["K"], a)[1] for a in low["alphas"]}
    dashed = lambda name: {"linestyle": "--" if name.startswith("RHG") else "-"}
    figures = {
      "figure1_initialization.png": common.plot_metric_grid(
        METRICS, init_runs, f"Example 1: initial points (K={figs['K']})", dashed
      ),
      "figure2_K.png": common.plot_metric_grid(
        METRICS, k_runs, "Example 1: lower iterations K", dashed
      ),
      "figure3_alpha.png": common.plot_metric_grid(
        METRICS, a_runs, f"Example 1: aggregation schedules (K={figs['K']})"
      ),
    }

  # Placeholder-friendly copy for docs/results.md: summary.K16.theorem2.x etc.
  summary: dict = {}
  for alpha in low["alphas"]:
    key = alpha_key(alpha)
    for K in low["K"]:
      row = next(r for r in rows if r["K"] == K and r["alpha"] == config.alpha_label(alpha))
      summary.setdefault(f"K{K}", {})[key] = {
        k: row[k] for k in ("x", "F_gap", "f_gap", "x_err", "y_err")
      }
  bda_rows = [r for r in rows if r["method"] == "BDA"]
  rhg_rows = [r for r in rows if r["method"] == "RHG"]
  notes = ["x* = 1, y* = (1, 1), F* = 0; |f - f*(x)| is the lower optimality gap at the current x."]
  if bda_rows and rhg_rows:
    notes.append(
      f"closest BDA x: {min(abs(r['x'] - 1) for r in bda_rows):.3g} from x*; "
      f"closest RHG x: {min(abs(r['x'] - 1) for r in rhg_rows):.3g} from x*."
    )
  return common.ExperimentResult(
    title="Example 1 (BDA paper, Section 5.1): BDA vs RHG without LLS",
    columns=[
      "method",
      "K",
      "alpha",
      "x",
      "y",
      "F_gap",
      "f_gap",
      "x_err",
      "y_err",
      "ms_per_step",
      "status",
    ],
    rows=rows,
    histories=histories,
    figures=figures,
    notes=notes,
    extra={
      "summary": summary,
      "schedules": {alpha_key(a): config.alpha_label(a) for a in low["alphas"]},
    },
  )
