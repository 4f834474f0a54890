"""A hyperparameter problem of the form (3.5) with nonsmooth regularizers:

    g(x, y) = l(y) + x_1 ||y||_1 + x_2 ||D y||_1,   l(y) = ||A y - b||^2 / (2 n),

(lasso plus total variation, D the first-difference matrix), x in
X = [x_min, x_max]^2 (Remark 3.2: g >= 0, so Lemma 3.1's uniform lower bound
holds with Y = R^m), and the validation loss F(x, y) = ||A_v y - b_v||^2 / (2 n_v).
The signal is sparse and piecewise constant. Both |.| are smoothed by the
Chen-Mangasarian CHKS smoothing; m is too large for the entropic integral
(it would need a rule in R^m), so only the quadratic value function is used.

Reference: a grid search of F(x, S(x)) over a log grid of x, with S(x)
computed by `quadratic` at mu = ``reference_mu`` (the smoothing at that mu
moves S by O(mu)); the VFP solution is scored by the same F(x, S(x)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from bilevel_jax._src import projections
from bilevel_jax._src import smoothing
from experiments import common
from experiments import value_common as vc
from bilevel_jax._src.value import quadratic

F = config.Field
SCHEMA = {
  "problem": {
    "dim": F("int", 20, config.positive, "m"),
    "n_train": F("int", 30, config.positive),
    "n_val": F("int", 30, config.positive),
    "noise": F("float", 0.3, config.positive),
    "seed": F("int", 0),
    "x0": F("list[float]", [0.1, 0.1], config.positive),
    "x_bounds": F("list[float]", [1e-3, 10.0], config.positive),
    "grid": F("int", 25, config.positive, "reference grid points per axis"),
    "reference_mu": F("float", 1e-5, config.positive),
  },
  "vfp": vc.vfp_schema(
    mus=[1e-1, 1e-2, 1e-3, 1e-4],
    epsilon=1e-4,
    learning_rate=1e-2,
    inner_steps=150,
    outer_steps=8,
    repeats=1,
  ),
}


def make_data(p):
  key = jax.random.PRNGKey(p["seed"])
  k1, k2, k3, k4 = jax.random.split(key, 4)
  m = p["dim"]
  truth = np.zeros(m)
  truth[m // 4 : m // 2] = 1.5
  truth[3 * m // 4 :] = -1.0
  truth = jnp.asarray(truth)
  A = jax.random.normal(k1, (p["n_train"], m))
  A_val = jax.random.normal(k2, (p["n_val"], m))
  b = A @ truth + p["noise"] * jax.random.normal(k3, (p["n_train"],))
  b_val = A_val @ truth + p["noise"] * jax.random.normal(k4, (p["n_val"],))
  return A, b, A_val, b_val


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  p = cfg["problem"]
  A, b, A_val, b_val = make_data(p)
  m = p["dim"]

  def lower(x, y, mu):
    loss = 0.5 * jnp.sum((A @ y - b) ** 2) / A.shape[0]
    return (
      loss + x[0] * smoothing.l1(y, mu, "chks") + x[1] * smoothing.l1(y[1:] - y[:-1], mu, "chks")
    )

  def upper(x, y, mu=None):
    return 0.5 * jnp.sum((A_val @ y - b_val) ** 2) / A_val.shape[0]

  y_zero = jnp.zeros(m)
  value_fn = lambda x, mu: quadratic.quadratic(lower, x, y_zero, mu=mu, pass_mu=True)

  @jax.jit
  def val_loss(x):
    y = quadratic.quadratic(lower, x, y_zero, mu=p["reference_mu"], pass_mu=True, max_steps=20000).y
    return upper(x, y)

  common.progress("[value_hyper] reference grid", quiet)
  grid = np.geomspace(p["x_bounds"][0], p["x_bounds"][1], p["grid"])
  xx = jnp.asarray(np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2))
  losses = np.asarray(jax.jit(jax.vmap(val_loss))(xx))
  best = int(np.argmin(losses))
  x_ref, f_ref = np.asarray(xx[best]), float(losses[best])

  common.progress("[value_hyper] VFP + quadratic", quiet)
  project_x = projections.box(*p["x_bounds"])
  sol, compile_s, run_s = vc.solve(
    cfg["vfp"],
    upper,
    lower,
    value_fn,
    jnp.asarray(p["x0"]),
    y_zero,
    projection_x=project_x,
    pass_mu=True,
  )
  records = {"VFP quadratic": vc.per_mu(sol.info)}
  f_vfp = float(val_loss(sol.x))
  log_err = float(np.linalg.norm(np.log10(np.asarray(sol.x)) - np.log10(x_ref)))
  rows = [
    vc.vfp_row("VFP quadratic", sol, x_ref, compile_s, run_s, val_loss=f_vfp, log10_x_err=log_err),
    {
      "method": f"grid search ({p['grid']}x{p['grid']})",
      "x": [round(float(v), 5) for v in x_ref],
      "x_err": 0.0,
      "val_loss": f_ref,
      "log10_x_err": 0.0,
      "status": "reference",
    },
  ]
  f_init = float(val_loss(jnp.asarray(p["x0"])))
  notes = [
    f"val_loss = F(x, S(x)) with S from `quadratic` at mu = {p['reference_mu']:g}; "
    f"at x0 = {p['x0']} it is {f_init:.4g}.",
    "x_err is measured against the best grid point, whose own spacing is a factor "
    f"{grid[1] / grid[0]:.3g} per axis.",
  ]
  return common.ExperimentResult(
    title="Hyperparameter problem (3.5): lasso + total variation, quadratic value function",
    columns=[
      "method",
      "x",
      "x_err",
      "log10_x_err",
      "val_loss",
      "lambda",
      "kkt",
      "compile_s",
      "run_s",
      "status",
    ],
    rows=rows,
    histories=records,
    figures={"value_hyper_kkt.png": vc.kkt_figure(records, "(3.5): (VFP^mu_eps)")},
    notes=notes,
    extra={
      "per_mu": records,
      "reference": {"x": x_ref.tolist(), "val_loss": f_ref},
      "summary": {
        "val_loss_vfp": f_vfp,
        "val_loss_grid": f_ref,
        "val_loss_excess_percent": 100.0 * (f_vfp / f_ref - 1.0),
        "log10_x_err": log_err,
        "val_loss_x0": f_init,
      },
    },
  )
