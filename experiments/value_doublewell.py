"""A lower level that is nonconvex in y (a double well): only the entropic
smoothing applies (the quadratic one needs g(x, .) convex). Against BDA.

    g(x, y) = (y^2 - 1)^2 - x y,  y in Y = [-2, 2],  x in X = [-1, 1],
    F(x, y) = (y - 1)^2 / 2 + (x - x_t)^2 / 2.

For x > 0 the global minimizer of g(x, .) is in the right well (y ~ 1 + x/8),
for x < 0 in the left one; the left well stays a local minimizer for small
x > 0. The reference solution (x_ref, y_ref) is found by brute force: the
global lower minimizer on a fine y grid for each x on a fine x grid.

BDA runs gradient steps on g from a fixed y0: started in the left well it
stays there. (VFP_eps) with the entropic v_mu is started from the same
points, and again from the Gibbs mean E_alpha[y] at x0 (``.y`` of
`entropic`), which at small mu sits near the global minimizer: a practical
way to seed y that only the integral formulation offers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from bilevel_jax._src import projections
from bilevel_jax._src import unrolled
from bilevel_jax._src import upper_loop
from experiments import common
from experiments import value_common as vc
from bilevel_jax._src.value import entropic

F = config.Field
SCHEMA = {
  "problem": {
    "x_target": F("float", 0.3),
    "x0": F("float", 0.2),
    "y0": F("float", -1.5, doc="initial y for BDA and the first VFP run"),
    "grid": F("int", 4001, config.positive, "brute-force grid size (x and y)"),
  },
  "entropic": {
    "order": F("int", 8, config.positive),
    "panels": F("int", 64, config.positive),
    "seed_mu": F("float", 1e-3, config.positive, "mu of the Gibbs-mean seed"),
  },
  "vfp": vc.vfp_schema(mus=[1e-1, 1e-2, 1e-3], epsilon=1e-3, learning_rate=1e-2),
  "bda": {
    "K": F("int", 32, config.positive),
    "alpha": F("alpha", "0.5/k"),
    "upper_lr": F("float", 0.5, config.positive),
    "lower_lr": F("float", 0.05, config.positive),
    "learning_rate": F("float", 0.2, config.positive),
    "steps": F("int", 200, config.positive),
  },
}

Y_BOUNDS = (-2.0, 2.0)
X_BOUNDS = (-1.0, 1.0)


def lower(x, y):
  return (y[0] ** 2 - 1.0) ** 2 - x * y[0]


def reference(x_target: float, n: int):
  """Brute force: x on a grid, the global minimizer of g(x, .) on a y grid."""
  xs = np.linspace(*X_BOUNDS, n)
  ys = np.linspace(*Y_BOUNDS, n)
  g = (ys[None, :] ** 2 - 1.0) ** 2 - xs[:, None] * ys[None, :]
  y_star = ys[np.argmin(g, axis=1)]
  upper = 0.5 * (y_star - 1.0) ** 2 + 0.5 * (xs - x_target) ** 2
  i = int(np.argmin(upper))
  return float(xs[i]), float(y_star[i]), float(upper[i])


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  prob, ent, b = cfg["problem"], cfg["entropic"], cfg["bda"]
  x_t = prob["x_target"]

  def upper(x, y):
    return 0.5 * (y[0] - 1.0) ** 2 + 0.5 * (x - x_t) ** 2

  x_ref, y_ref, f_ref = reference(x_t, prob["grid"])
  box = (jnp.array([Y_BOUNDS[0]]), jnp.array([Y_BOUNDS[1]]))
  value_fn = lambda x, mu: entropic.entropic(
    lower, x, mu=mu, box=box, order=ent["order"], panels=ent["panels"]
  )
  project_x, project_y = projections.box(*X_BOUNDS), projections.box(*Y_BOUNDS)
  x0 = jnp.asarray(prob["x0"])
  y_fixed = jnp.array([prob["y0"]])
  y_gibbs = jax.jit(lambda x: value_fn(x, ent["seed_mu"]).y)(x0)
  starts = {f"y0={prob['y0']:g}": y_fixed, f"y0=Gibbs mean ({float(y_gibbs[0]):.3f})": y_gibbs}
  rows, records = [], {}
  for label, y0 in starts.items():
    common.progress(f"[value_doublewell] VFP + entropic, {label}", quiet)
    sol, compile_s, run_s = vc.solve(
      cfg["vfp"], upper, lower, value_fn, x0, y0, projection_x=project_x, projection_y=project_y
    )
    name = f"VFP entropic, {label}"
    records[name] = vc.per_mu(sol.info)
    rows.append(
      vc.vfp_row(
        name, sol, x_ref, compile_s, run_s, F=float(upper(sol.x, sol.y)), y=float(sol.y[0])
      )
    )
  for label, y0 in starts.items():
    common.progress(f"[value_doublewell] BDA, {label}", quiet)
    hg = unrolled.make_hypergradient(
      upper,
      lower,
      steps=b["K"],
      upper_lr=b["upper_lr"],
      lower_lr=b["lower_lr"],
      alpha=common.make_alpha(b["alpha"]),
    )
    res = upper_loop.optimize(
      hg,
      x0,
      common.make_optimizer("sgd", b["learning_rate"]),
      steps=b["steps"],
      y0=y0,
      projection=project_x,
      log_every=0,
    )
    rows.append(
      vc.bda_row(
        f"BDA K={b['K']} alpha={common.alpha_label(b['alpha'])}, {label}", res, x_ref, upper
      )
    )
  notes = [
    f"Reference (brute force, {prob['grid']}-point grids): x = {x_ref:.4f}, "
    f"y = {y_ref:.4f}, F = {f_ref:.3g}; the grid spacing {2.0 / (prob['grid'] - 1):.1e} "
    "bounds its own error.",
    "The quadratic smoothing does not apply: g(x, .) is not convex.",
  ]
  return vc.result(
    "Double-well lower level (nonconvex in y): entropic value function vs BDA",
    rows,
    records,
    "value_doublewell_kkt.png",
    notes,
    reference={"x": x_ref, "y": y_ref, "F": f_ref},
    gibbs_seed={"x0": prob["x0"], "mu": ent["seed_mu"], "y": float(y_gibbs[0])},
  )
