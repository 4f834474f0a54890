"""Entropic value function on an unbounded Y (Section 4.2): gradient
consistency with the `log_radius` schedule (Theorem 4.18), the bias term
mu ln vol(Y_mu) (Theorem 4.13) and the two shapes of Y_mu (box and ball).

Part 1 (m = 1, Y = R): g(x, y) = |y - x - c|, smoothed by the CHKS density
(`smoothing.abs`), so v = 0 and partial v(0) = {0} for every shift c. For
each mu_k, `consistency_check` samples x_kj = mu_k u_j (u_j = +-1, and x = 0)
and reports max_j |grad v_mu_k(x_kj) - 0|. Y_mu = [-r_mu, r_mu] with
r_mu = r0 (1 + ln(1 + 1/mu)) (`log_radius`), against a fixed radius: the
minimizer y = x + c must lie in Y_mu (Lemma 4.12, (4.22)), and a Y_mu that
does not grow to Y leaves the Gibbs mass on its boundary, where
grad_x g = 1. v_mu(0) - v(0) and mu ln vol(Y_mu) (``info.mu_log_volume``) are
reported beside the distances.

Part 2 (m = 2, Y = R^2): g(x, y) = sqrt(||y - x||^2 + mu^2), v = 0,
partial v(0) = {0}, with Y_mu the max-norm box [-r_mu, r_mu]^2 or the
Euclidean ball B_{r_mu}(0) (the footnote to Theorem 4.13). Both should be
consistent and give the same v_mu up to the rule's error (the Gibbs mass sits
near y = x, inside both); the ball has the smaller volume, hence the smaller
bound mu ln vol(Y_mu) on v - v_mu (``entropic``'s module doc), and needs far
fewer nodes (its rule is radial, the box's a square grid).

Every value function here is a Gauss-Legendre rule whose panels are about
``panel_width`` mu wide (the Gibbs density has width mu), so the number of
nodes grows like r_mu / mu per axis; each mu_k gets its own rule (its own
`consistency_check` call). The rule's error estimate and status are reported;
a distance computed from an INACCURATE rule is not evidence either way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from bilevel_jax._src import smoothing
from bilevel_jax._src.value import consistency
from bilevel_jax._src.value import entropic
from experiments import common
from experiments import value_common as vc

F = config.Field
SCHEMA = {
  "consistency": {
    "mus": F("list[float]", [1e-1, 1e-2, 1e-3, 1e-4], config.positive, "decreasing mu_k"),
    "r0": F("float", 1.0, config.positive, "log_radius(r0)"),
    "shifts": F("list[float]", [0.0, 4.0], None, "minimizer y = x + c"),
    "fixed_radius": F("float", 3.0, config.positive, "the non-growing Y_mu compared"),
    "order": F("int", 8, config.positive, "Gauss-Legendre nodes per panel"),
    "panel_width": F("float", 1.0, config.positive, "panel width in units of mu"),
    "num_directions": F("int", 8, config.positive),
  },
  "ball": {
    "mus": F("list[float]", [1e-1, 3e-2, 1e-2], config.positive, "decreasing mu_k"),
    "r0": F("float", 0.5, config.positive, "log_radius(r0)"),
    "order": F("int", 4, config.positive),
    "panel_width": F("float", 1.0, config.positive, "panel width in units of mu"),
    "angular_panels": F("int", 8, config.positive, "ball rule: panels per angle"),
    "num_directions": F("int", 8, config.positive),
    "batch_size": F("int", 65536, config.positive, "nodes per chunk of g"),
  },
}

COLUMNS = [
  "case",
  "Y_mu",
  "mu",
  "r_mu",
  "nodes",
  "mu_log_volume",
  "bias",
  "max_distance",
  "integration_error",
  "status",
]


def _panels(width: float, mu: float, panel_width: float) -> int:
  return max(2, math.ceil(width / (panel_width * mu)))


def _case(g, x_bar, mu: float, num_directions: int, kwargs: dict) -> dict:
  """One `consistency_check` at a single mu (the rule depends on mu) against
  partial v(x_bar) = {0}, and v_mu(x_bar) with the rule's info (v(x_bar) = 0)."""
  value_fn = lambda x, m: entropic.entropic(g, x, mu=m, pass_mu=True, **kwargs)
  check = consistency.consistency_check(
    value_fn,
    x_bar,
    mus=jnp.array([mu]),
    num_directions=num_directions,
    subdifferential=jnp.zeros((1, jnp.size(x_bar)), x_bar.dtype),
  )
  sol = jax.jit(value_fn)(x_bar, mu)
  return {
    "mu": mu,
    "nodes": int(sol.info.num_points),
    "mu_log_volume": float(sol.info.mu_log_volume),
    "bias": float(sol.value),  # v_mu(x_bar) - v(x_bar), v = 0
    "max_distance": float(check.max_distance[0]),
    "integration_error": float(sol.info.integration_error),
    "status": vc.status_label(check.info.status, check.info.inner_status),
  }


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  c1, c2 = cfg["consistency"], cfg["ball"]
  rows = []
  radius1 = entropic.log_radius(c1["r0"])
  real_line = (jnp.array([-jnp.inf]), jnp.array([jnp.inf]))
  for shift in c1["shifts"]:
    g = lambda x, y, mu, c=shift: smoothing.abs(y[0] - x - c, mu, "chks")
    schedules = {"log_radius": radius1, f"fixed r = {c1['fixed_radius']:g}": c1["fixed_radius"]}
    for label, radius in schedules.items():
      if label != "log_radius" and shift == 0.0:
        continue  # the fixed radius contains y = x: nothing to compare
      for mu in c1["mus"]:
        r = float(radius(mu)) if callable(radius) else float(radius)
        panels = _panels(2 * r, mu, c1["panel_width"])
        common.progress(f"[value_unbounded] c = {shift:g}, {label}, mu = {mu:g}", quiet)
        kwargs = dict(box=real_line, radius=radius, order=c1["order"], panels=panels)
        row = _case(g, jnp.asarray(0.0), mu, c1["num_directions"], kwargs)
        rows.append({"case": f"abs(y - x - {shift:g}), m = 1", "Y_mu": label, "r_mu": r, **row})

  radius2 = entropic.log_radius(c2["r0"])
  plane = (jnp.full(2, -jnp.inf), jnp.full(2, jnp.inf))
  g2 = lambda x, y, mu: jnp.sqrt(jnp.sum((y - x) ** 2) + mu * mu)
  for truncation in ("box", "ball"):
    for mu in c2["mus"]:
      r = float(radius2(mu))
      if truncation == "box":
        n = _panels(2 * r, mu, c2["panel_width"])
        panels = (n, n)
      else:
        panels = (_panels(r, mu, c2["panel_width"]), c2["angular_panels"])
      common.progress(f"[value_unbounded] m = 2, {truncation}, mu = {mu:g}", quiet)
      kwargs = dict(
        box=plane, radius=radius2, truncation=truncation, order=c2["order"], panels=panels
      )
      row = _case(
        g2, jnp.zeros(2), mu, c2["num_directions"], dict(kwargs, batch_size=c2["batch_size"])
      )
      rows.append({"case": "norm(y - x), m = 2", "Y_mu": truncation, "r_mu": r, **row})

  def figure(plt):
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    groups = {}
    for row in rows:
      groups.setdefault((row["case"], row["Y_mu"]), []).append(row)
    for (case, y_mu), rs in groups.items():
      ax.loglog(
        [r["mu"] for r in rs],
        np.maximum([r["max_distance"] for r in rs], 1e-17),
        "o-",
        label=f"{case}, {y_mu}",
      )
    ax.set_xlabel("mu_k")
    ax.set_title("dist(grad v_mu(x_k), partial v(0)), Y unbounded")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig

  notes = [
    "max_distance: max over x_kj in {0, +-mu_k u_j} of |grad v_mu_k(x_kj)| (partial v(0) = {0}).",
    "bias: v_mu(0) - v(0) from the rule; mu_log_volume: mu ln vol(Y_mu) (info.mu_log_volume).",
    "status: of consistency_check, with the worst status of the value function at the sample "
    "points (inner_failed (inaccurate) when a rule's error estimate exceeds its tol 1e-4).",
  ]
  return common.ExperimentResult(
    title="Unbounded Y: gradient consistency with log_radius (Thm 4.18), box and ball Y_mu",
    columns=COLUMNS,
    rows=rows,
    figures={"value_unbounded_consistency.png": figure},
    notes=notes,
  )
