"""A nonsmooth lower level with a closed-form value function (lasso in y):

    g(x, y) = ||y - b||^2 / 2 + x ||y||_1,   v(x) = sum_i h(b_i; x),
    h(b; x) = b^2/2 if |b| <= x, else x |b| - x^2/2,

with S(x) = soft-threshold(b, x). The upper level F(x, y) = ||y - y_t||^2 / 2
with y_t = S(x_true)(b) has the unique solution x_true. ||y||_1 is smoothed by
the Chen-Mangasarian softplus smoothing (Example 2.7); both value-function
smoothings apply (g is convex in y), and the experiment reports
|v_mu(x_true) - v(x_true)| against mu and the x found by (VFP_eps).
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
from bilevel_jax._src.value import entropic
from bilevel_jax._src.value import quadratic

F = config.Field
SCHEMA = {
  "problem": {
    "b": F("list[float]", [2.0, -1.2]),
    "x_true": F("float", 0.7, config.positive),
    "x0": F("float", 0.2, config.positive),
    "x_bounds": F("list[float]", [0.05, 5.0]),
    "y_box": F(
      "list[float]",
      [-3.0, 3.0],
      lambda v: (
        None if len(v) == 2 and v[0] < v[1] else "must be [lower, upper] with lower < upper"
      ),
    ),
    "density": F("str", "softplus", config.one_of(*sorted(smoothing.DENSITIES))),
  },
  "entropic": {
    "order": F("int", 8, config.positive),
    "panels": F("int", 25, config.positive, "per axis"),
  },
  "rate": {"mus": F("list[float]", [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4], config.positive)},
  "vfp": vc.vfp_schema(mus=[1e-1, 1e-2, 1e-3], epsilon=1e-4, learning_rate=1e-2),
}


def closed_form_value(x, b):
  a = np.abs(np.asarray(b, dtype=float))
  return float(np.sum(np.where(a <= x, 0.5 * a * a, x * a - 0.5 * x * x)))


def soft_threshold(b, x):
  b = np.asarray(b, dtype=float)
  return np.sign(b) * np.maximum(np.abs(b) - x, 0.0)


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  prob, ent = cfg["problem"], cfg["entropic"]
  b = jnp.asarray(prob["b"])
  m = b.shape[0]
  y_target = jnp.asarray(soft_threshold(prob["b"], prob["x_true"]))
  density = prob["density"]

  def lower(x, y, mu):
    return 0.5 * jnp.sum((y - b) ** 2) + x * smoothing.l1(y, mu, density)

  def upper(x, y):
    return 0.5 * jnp.sum((y - y_target) ** 2)

  lo, hi = prob["y_box"]
  box = (jnp.full(m, lo), jnp.full(m, hi))
  project_y = projections.box(lo, hi)
  value_fns = {
    "entropic": lambda x, mu: entropic.entropic(
      lower, x, mu=mu, box=box, order=ent["order"], panels=ent["panels"], pass_mu=True
    ),
    "quadratic": lambda x, mu: quadratic.quadratic(
      lower, x, jnp.zeros(m), mu=mu, projection=project_y, pass_mu=True
    ),
  }
  # |v_mu(x_true) - v(x_true)| against mu.
  v_true = closed_form_value(prob["x_true"], prob["b"])
  rate = {"mus": cfg["rate"]["mus"]}
  x_true = jnp.asarray(prob["x_true"])
  for name, value_fn in value_fns.items():
    values = jax.jit(jax.vmap(lambda mu: value_fn(x_true, mu).value))(
      jnp.asarray(cfg["rate"]["mus"])
    )
    rate[name] = np.abs(np.asarray(values) - v_true).tolist()
  rows, records = [], {}
  x0, y0 = jnp.asarray(prob["x0"]), jnp.zeros(m)
  project_x = projections.box(*prob["x_bounds"])
  for name, value_fn in value_fns.items():
    common.progress(f"[value_nonsmooth] VFP + {name}", quiet)
    sol, compile_s, run_s = vc.solve(
      cfg["vfp"],
      lambda x, y, mu: upper(x, y),
      lower,
      value_fn,
      x0,
      y0,
      projection_x=project_x,
      projection_y=project_y,
      pass_mu=True,
    )
    records[f"VFP {name}"] = vc.per_mu(sol.info)
    rows.append(
      vc.vfp_row(
        f"VFP {name}",
        sol,
        prob["x_true"],
        compile_s,
        run_s,
        F=float(upper(sol.x, sol.y)),
        y=[round(float(v), 5) for v in np.asarray(sol.y)],
      )
    )
  slopes = {
    name: float(np.polyfit(np.log10(rate["mus"]), np.log10(rate[name]), 1)[0]) for name in value_fns
  }
  notes = [
    f"x_true = {prob['x_true']}, v(x_true) = {v_true:.6g} (closed form).",
    "|v_mu(x_true) - v(x_true)| for mu = " + ", ".join(f"{m_:g}" for m_ in rate["mus"]) + ":",
    *[
      f"  {name}: "
      + ", ".join(f"{e:.3g}" for e in rate[name])
      + f" (log-log slope {slopes[name]:.3f})"
      for name in value_fns
    ],
    "Theory: quadratic O(mu) (plus-smoothing gap kappa mu x + mu ||y||^2/2); "
    "entropic O(mu ln(1/mu)) (Theorem 4.3's bounds).",
  ]

  def rate_figure(plt):
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for name in value_fns:
      ax.loglog(rate["mus"], rate[name], "o-", label=name)
    ax.set_xlabel("mu")
    ax.set_title("|v_mu(x) - v(x)|, lasso lower level")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig

  out = vc.result(
    "Nonsmooth lower level (lasso in y) with a closed-form value function",
    rows,
    records,
    "value_nonsmooth_kkt.png",
    notes,
    value_error=rate,
    value_error_slopes=slopes,
  )
  out.figures["value_nonsmooth_rate.png"] = rate_figure
  return out
