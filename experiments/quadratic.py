"""Hypergradient error against K on a strongly convex quadratic lower level
with a closed-form hypergradient (RHG and BDA schedules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from bilevel_jax._src import schedules
from bilevel_jax._src import unrolled
from experiments import common
from bilevel_jax._src.problems import quadratic as quad

F = config.Field
SCHEMA = {
  "problem": {
    "dim_x": F("int", 5, config.positive),
    "dim_y": F("int", 20, config.positive),
    "condition": F("float", 10.0, lambda v: None if v >= 1 else "must be >= 1"),
    "rho": F("float", 0.1, lambda v: None if v >= 0 else "must be >= 0"),
    "seed": F("int", 0),
  },
  "lower": {
    "K": F("list[int]", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], config.positive),
    "alphas": F("list[alpha]", [0, "0.5/k", "0.9/k"]),
    "theorem2": F("bool", True, doc="add the schedule of Theorem 2"),
    "upper_lr": F("float", 1.0, config.positive, "s_u; F(x, .) has sigma = L_F = 1, so s_u <= 1"),
  },
}


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  p, low = cfg["problem"], cfg["lower"]
  problem = quad.make_quadratic(
    jax.random.PRNGKey(p["seed"]),
    dim_x=p["dim_x"],
    dim_y=p["dim_y"],
    condition=p["condition"],
    rho=p["rho"],
  )
  x = jax.random.normal(jax.random.PRNGKey(p["seed"] + 1), (p["dim_x"],), problem.A.dtype)
  y0 = jnp.zeros(p["dim_y"], problem.A.dtype)
  exact = problem.hypergradient(x)
  s_l = float(1.0 / problem.lower_smoothness())
  alphas = {
    f"{'RHG' if config.alpha_is_zero(a) else 'BDA'} alpha={config.alpha_label(a)}": (
      config.alpha_schedule(a, upper_lr=low["upper_lr"])
    )
    for a in low["alphas"]
  }
  if low["theorem2"]:
    alphas["BDA alpha=Thm2"] = schedules.theorem2(
      upper_lr=low["upper_lr"], sigma=1.0, smoothness=1.0, gamma=1.0, epsilon=0.01
    )
  rows, curves = [], {name: [] for name in alphas}
  for name, alpha in alphas.items():
    common.progress(f"[quadratic] {name}", quiet)
    for K in low["K"]:
      fn = jax.jit(
        lambda x, alpha=alpha, K=K: unrolled.hypergradient(
          problem.upper,
          problem.lower,
          x,
          y0,
          steps=K,
          upper_lr=low["upper_lr"],
          lower_lr=s_l,
          alpha=alpha,
        )
      )
      _, grad = fn(x)
      err = float(jnp.linalg.norm(grad - exact) / jnp.linalg.norm(exact))
      curves[name].append(err)
      rows.append({"method": name, "K": K, "rel_error": err})

  def draw(plt):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, errs in curves.items():
      ax.loglog(low["K"], np.maximum(errs, 1e-17), marker="o", label=name)
    ax.set_xlabel("K (lower iterations)")
    ax.set_ylabel("||grad phi_K - grad phi|| / ||grad phi||")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

  return common.ExperimentResult(
    title="Strongly convex quadratic: hypergradient error against the closed form",
    columns=["method", "K", "rel_error"],
    rows=rows,
    histories={"curves": curves, "K": low["K"]},
    figures={"quadratic_error.png": draw},
    notes=[
      f"dim_x = {p['dim_x']}, dim_y = {p['dim_y']}, cond(A) = {p['condition']:g}, "
      f"s_l = 1/L_f = {s_l:.3g}; dtype {problem.A.dtype}."
    ],
  )
