"""The smoothing method for (VFP_eps) (Proposition 2.13).

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

For a decreasing sequence mu_1 > mu_2 > ... > mu_K, solve

    min_{x in X, y in Y} f_mu(x, y)  s.t.  c_mu(x, y) = g_mu(x, y) - v_mu(x) - eps <= 0   (VFP^mu_eps)

and report, for each mu_k, the multiplier lambda_k and the residual of the
KKT system (2.4):

    0 in grad f_mu + lambda grad g_mu - lambda (grad v_mu, 0) + N_{X x Y},
    lambda >= 0,  c_mu <= 0,  lambda c_mu = 0.

Proposition 2.13: if the (x_k, y_k, lambda_k) stay bounded, their
accumulation points are stationary for (VFP_eps).

Practical choices (ours):

* Each subproblem is solved by the augmented Lagrangian method (PHR form for
  one inequality),

      L_rho(x, y; lambda) = f_mu + ((lambda + rho c_mu)_+^2 - lambda^2) / (2 rho),

  minimized over (x, y) by ``inner_steps`` projected Optax steps
  (``params <- P_{X x Y}(params + optimizer.update(grad L))``), followed by
  lambda <- (lambda + rho c_mu)_+; ``outer_steps`` such rounds per mu_k. When a
  round reduces the violation c_+ by less than a factor 4 (and c_+ >
  ``feas_tol``), rho is multiplied by ``rho_growth`` (up to ``rho_max``). We chose the augmented Lagrangian over
  an exact penalty because it yields the multiplier lambda_k that (2.4) and
  Proposition 2.13 are about, and its subproblems are smooth.
* (x, y, lambda, rho) carry over from mu_k to mu_{k+1} (warm start); the
  Optax state is reset at each mu_k (the objective changed).
* Stationarity is measured by the natural residual
  ||(x, y) - P_{X x Y}((x, y) - grad_{x,y}(f_mu + lambda c_mu))||; the KKT
  residual is max(stationarity, c_+, |lambda c|).
* Everything is one jitted program: `lax.scan` over mu_k, over the rounds and
  over the inner steps; v_mu is whatever ``value_fn`` computes (entropic or
  quadratic), differentiated through its own custom rule.

What the status says (`bilevel_jax.Status`):

* Inner failures are passed on. When ``value_fn`` returns a solution (as
  `entropic` and `quadratic` do), its ``info.status`` at the final iterate of
  each mu_k is recorded in ``info.inner_statuses``; the first failure is
  ``info.inner_status`` and the status is INNER_FAILED when nothing else
  failed. An INACCURATE entropic v_mu can have a gradient of the wrong sign,
  so the (x_k, y_k) it produced are not evidence of stationarity.
* NOT_STATIONARY when the final KKT residual exceeds ``kkt_tol``, by default

      kkt_tol = 1e-2 (1 + ||grad_{x,y} f_{mu_1}(P(x0, y0))||):

  the residual is in the units of a gradient of f (at a KKT point,
  grad f = -lambda grad c up to the normal cone, so lambda grad c has the same
  scale), and the inner solves are a fixed number of first-order steps, not
  solves to tolerance: the default asks for stationarity to 1% of the
  gradient scale at the start. It accepts what the default settings reach on a
  well-posed problem (0.02 on the test problem, where ||grad f|| = 3.2) and
  flags the committed failures (KKT residuals 0.16 to 4.7 against tolerances
  0.03 to 0.07). Pass ``kkt_tol`` to set it.
* ``info.lambda_growing`` flags multipliers that grow across mu_k, since
  Proposition 2.13 needs bounded lambda_k. With Delta_k = lambda_k -
  lambda_{k-1}, it is True when (K >= 2) lambda_K > 10 max(1, lambda_1) and
  Delta_K > 0, or when (K >= 3) the last increment is positive, not smaller
  than the one before, and not negligible: Delta_K >= max(Delta_{K-1},
  0.1 max(1, lambda_K)) (a convergent sequence has shrinking increments; the
  max(1, .) ignores multipliers below 1). It does not change the status: a
  few mu_k cannot prove divergence; read it with ``info.lambdas``.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation
from bilevel_jax._src.value import common


class VFPInfo(NamedTuple):
  """One entry per mu_k (arrays of length K), plus the final status.

  Attributes:
    num_steps: Optax steps run in all, K outer_steps inner_steps.
    status: NONFINITE, NOT_STATIONARY (final KKT residual above ``kkt_tol``),
      INNER_FAILED (only ``value_fn`` failed), INVALID_INPUT (a traced
      ``epsilon``, ``rho``, ``rho_max``, ``feas_tol`` or mu_k not > 0,
      ``rho_growth`` < 1 or ``lam0`` < 0) or SUCCESS (`bilevel_jax.Status`).
    residual: the final KKT residual, ``kkt_residual[-1]``.
    kkt_tol: the tolerance it was compared with.
    inner_status: the first non-SUCCESS status of ``value_fn`` over the final
      iterates of the mu_k, SUCCESS otherwise.
    inner_failures: number of mu_k whose final inner status failed.
    inner_statuses: (K,) status of ``value_fn`` at (x_k, mu_k) (SUCCESS when
      it returns a bare value).
    lambda_growing: the multipliers grow across mu_k (module doc).
    mus: the smoothing parameters mu_k.
    lambdas: multipliers lambda_k after the rounds at mu_k.
    kkt_residual: max(stationarity, feasibility, complementarity) of (2.4).
    stationarity: natural residual of the first line of (2.4).
    feasibility: max(0, c_mu(x_k, y_k)).
    complementarity: |lambda_k c_mu(x_k, y_k)|.
    constraint: c_mu(x_k, y_k) = g_mu - v_mu - eps.
    upper_value: f_mu(x_k, y_k).
    rho: penalty parameter at the end of mu_k.
    xs, ys: the iterates (x_k, y_k), stacked along a leading axis.
  """

  num_steps: jax.Array
  status: jax.Array
  residual: jax.Array
  kkt_tol: jax.Array
  inner_status: jax.Array
  inner_failures: jax.Array
  inner_statuses: jax.Array
  lambda_growing: jax.Array
  mus: jax.Array
  lambdas: jax.Array
  kkt_residual: jax.Array
  stationarity: jax.Array
  feasibility: jax.Array
  complementarity: jax.Array
  constraint: jax.Array
  upper_value: jax.Array
  rho: jax.Array
  xs: Any
  ys: Any


class VFPSolution(NamedTuple):
  """Final (x, y), the multiplier ``lam`` and the per-mu_k ``info``."""

  x: Any
  y: Any
  lam: jax.Array
  info: VFPInfo


def geometric_mus(mu0: float, factor: float, count: int) -> np.ndarray:
  """mu_k = mu0 factor^k, k = 0..count-1 (a decreasing schedule).

  Examples:
    >>> from bilevel_jax import value
    >>> [float(mu) for mu in value.geometric_mus(1.0, 0.1, 3)]
    [1.0, 0.1, 0.01]
  """
  validation.check_positive("mu0", mu0)
  if not 0 < factor < 1:
    raise ValueError(f"`factor` must lie in (0, 1), got {factor}.")
  count = validation.check_positive_int("count", count)
  return mu0 * factor ** np.arange(count)


def _check_mus(mus) -> None:
  concrete = validation.concrete_value(mus)
  if concrete is None:
    return
  if concrete.ndim != 1 or concrete.size == 0:
    raise ValueError(f"`mus` must be a non-empty 1-D array, got shape {concrete.shape}.")
  validation.check_positive("mus", concrete)
  if np.any(np.diff(concrete) > 0):
    raise ValueError(f"`mus` must be non-increasing, got {concrete}.")


def solve_vfp(
  f: Callable,
  g: Callable,
  value_fn: Callable,
  x0,
  y0,
  *,
  mus,
  epsilon,
  optimizer: optax.GradientTransformation,
  projection_x: Callable | None = None,
  projection_y: Callable | None = None,
  inner_steps: int = 200,
  outer_steps: int = 10,
  rho: float = 10.0,
  rho_growth: float = 2.0,
  rho_max: float = 1e4,
  feas_tol: float = 1e-6,
  lam0: float = 0.0,
  pass_mu: bool = False,
  kkt_tol: float | None = None,
  throw: bool = False,
) -> VFPSolution:
  """Smoothing method for (VFP_eps): augmented Lagrangian on (VFP^mu_eps).

  Args:
    f: upper objective f_mu(x, y) (or f(x, y, mu) with ``pass_mu``).
    g: lower objective g_mu(x, y) (or g(x, y, mu) with ``pass_mu``), the same
      smoothing used inside ``value_fn``.
    value_fn: (x, mu) -> v_mu(x) or a solution with ``.value`` (and
      ``.info.status``, which is passed on), e.g.
      ``lambda x, mu: value.entropic(g, x, mu=mu, box=box)``.
    x0: initial upper point (a pytree of float arrays).
    y0: initial lower point (a pytree of float arrays).
    mus: decreasing smoothing parameters mu_1 >= ... >= mu_K > 0.
    epsilon: eps > 0 of (VFP_eps).
    optimizer: Optax transformation for the inner steps on (x, y).
    projection_x: projection onto X (default: identity).
    projection_y: projection onto Y (default: identity).
    inner_steps: Optax steps per augmented-Lagrangian round (static).
    outer_steps: rounds (multiplier updates) per mu_k (static).
    rho: initial penalty parameter.
    rho_growth: its growth factor.
    rho_max: its cap.
    feas_tol: violations c_+ below this never increase rho.
    lam0: initial multiplier >= 0.
    pass_mu: call f and g with mu as the third argument.
    kkt_tol: status is NOT_STATIONARY when the last KKT residual exceeds it
      (default 1e-2 (1 + ||grad f_{mu_1}(x0, y0)||), module doc).
    throw: raise `SolverError` when the status is not SUCCESS (see
      `bilevel_jax.Status`).

  Returns:
    `VFPSolution` (x, y, lam, info) with per-mu_k multipliers and KKT residuals.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from bilevel_jax import value
    >>> f = lambda x, y: 0.5 * (y[0] - 3.0) ** 2 + 0.5 * (x - 1.0) ** 2
    >>> g = lambda x, y: 0.5 * (y[0] - x) ** 2   # v = 0: |y - x| <= sqrt(2 eps)
    >>> sol = value.solve_vfp(f, g, lambda x, mu: value.quadratic(g, x, jnp.zeros(1), mu=mu),
    ...                       0.0, jnp.zeros(1), mus=value.geometric_mus(0.1, 0.1, 3),
    ...                       epsilon=0.02, optimizer=optax.adam(3e-2), inner_steps=100,
    ...                       outer_steps=6)
    >>> round(float(sol.x), 2), round(float(sol.y[0]), 2), int(sol.info.status)
    (1.9, 2.11, 0)
  """
  f3, g3 = common.lower_fn(f, pass_mu, "f"), common.lower_fn(g, pass_mu, "g")
  if not callable(value_fn):
    raise TypeError(f"`value_fn` must be callable, got {type(value_fn).__name__}.")
  inner_steps = validation.check_positive_int("inner_steps", inner_steps)
  outer_steps = validation.check_positive_int("outer_steps", outer_steps)
  validation.check_positive("epsilon", epsilon)
  validation.check_positive("rho", rho)
  validation.check_positive("rho_max", rho_max)
  validation.check_positive("feas_tol", feas_tol)
  if validation.concrete_value(rho_growth) is not None and float(rho_growth) < 1:
    raise ValueError(f"`rho_growth` must be >= 1, got {rho_growth}.")
  if validation.concrete_value(lam0) is not None and float(lam0) < 0:
    raise ValueError(f"`lam0` must be >= 0, got {lam0}.")
  _check_mus(mus)
  if kkt_tol is not None:
    validation.check_positive("kkt_tol", kkt_tol)
  common.check_variable("x0", x0)
  common.check_variable("y0", y0)
  dtype = common.floating_dtype(x0)
  mus = jnp.asarray(mus, dtype)
  mu_probe = mus[0]
  validation.check_scalar_output("f", f3, x0, y0, mu_probe)
  validation.check_scalar_output("g", g3, x0, y0, mu_probe)
  validation.check_scalar_output(
    "value_fn", lambda x, m: common.value_of(value_fn(x, m)), x0, mu_probe
  )
  px = projection_x if projection_x is not None else (lambda t: t)
  py = projection_y if projection_y is not None else (lambda t: t)
  project = lambda params: (px(params[0]), py(params[1]))
  eps = jnp.asarray(epsilon, dtype)

  def constraint_and_status(params, mu):
    x, y = params
    out = value_fn(x, mu)
    return g3(x, y, mu) - common.value_of(out) - eps, common.status_of(out)

  def constraint(params, mu):
    # Not constraint_and_status(...)[0]: the same value, but the traced status
    # changes XLA's fusion of the inner loop and the iterates by rounding.
    x, y = params
    return g3(x, y, mu) - common.value_of(value_fn(x, mu)) - eps

  def lagrangian(params, mu, lam, rho_):
    c = constraint(params, mu)
    return f3(params[0], params[1], mu) + (
      jnp.square(jnp.maximum(lam + rho_ * c, 0.0)) - lam * lam
    ) / (2.0 * rho_)

  grad_l = jax.grad(lagrangian)

  def inner(params, mu, lam, rho_):
    def step(carry, _):
      params, state = carry
      grads = grad_l(params, mu, lam, rho_)
      updates, state = optimizer.update(grads, state, params)
      params = project(optax.apply_updates(params, updates))
      params = tree_ops.tree_cast_like(params, carry[0])
      return (params, state), None

    (params, _), _ = lax.scan(step, (params, optimizer.init(params)), None, length=inner_steps)
    return params

  def round_(carry, _):
    params, lam, rho_, mu = carry
    viol_before = jnp.maximum(constraint(params, mu), 0.0)
    params = inner(params, mu, lam, rho_)
    c = constraint(params, mu)
    lam = jnp.maximum(lam + rho_ * c, 0.0)
    viol = jnp.maximum(c, 0.0)
    slow = (viol > 0.25 * viol_before) & (viol > feas_tol)
    rho_ = jnp.where(slow, jnp.minimum(rho_ * rho_growth, rho_max), rho_)
    return (params, lam, rho_, mu), None

  def kkt(params, mu, lam):
    def lag(p):
      return f3(p[0], p[1], mu) + lam * constraint(p, mu)

    grads = jax.grad(lag)(params)
    moved = project(tree_ops.tree_sub(params, grads))
    stat = tree_ops.tree_norm(tree_ops.tree_sub(params, moved))
    c, inner = constraint_and_status(params, mu)
    return stat, jnp.maximum(c, 0.0), jnp.abs(lam * c), c, inner

  def per_mu(carry, mu):
    params, lam, rho_ = carry
    (params, lam, rho_, _), _ = lax.scan(round_, (params, lam, rho_, mu), None, length=outer_steps)
    stat, feas, comp, c, inner = kkt(params, mu, lam)
    out = dict(
      lam=lam,
      stat=stat,
      feas=feas,
      comp=comp,
      c=c,
      rho=rho_,
      inner=inner,
      f=f3(params[0], params[1], mu),
      x=params[0],
      y=params[1],
    )
    return (params, lam, rho_), out

  params0 = project((x0, y0))
  carry0 = (params0, jnp.asarray(lam0, dtype), jnp.asarray(rho, dtype))
  (params, lam, _), out = lax.scan(per_mu, carry0, mus)
  kkt_res = jnp.maximum(jnp.maximum(out["stat"], out["feas"]), out["comp"])
  finite = tree_ops.tree_all_finite(params) & jnp.isfinite(lam) & jnp.all(jnp.isfinite(kkt_res))
  if kkt_tol is None:
    grad_f0 = jax.grad(lambda p: f3(p[0], p[1], mus[0]))(params0)
    tol = 1e-2 * (1.0 + tree_ops.tree_norm(grad_f0))
  else:
    tol = jnp.asarray(kkt_tol, dtype)
  own = jnp.where(
    ~finite,
    status_lib.NONFINITE,
    jnp.where(kkt_res[-1] > tol, status_lib.NOT_STATIONARY, status_lib.SUCCESS),
  )
  valid = (
    validation.is_positive(epsilon)
    & validation.is_positive(rho)
    & validation.is_positive(rho_max)
    & validation.is_positive(feas_tol)
    & validation.is_positive(mus)
    & jnp.all(jnp.asarray(rho_growth) >= 1)
    & jnp.all(jnp.asarray(lam0) >= 0)
  )
  own = status_lib.unless_invalid(valid, own)
  inner_statuses = out["inner"].astype(jnp.int32)
  failed = inner_statuses != status_lib.SUCCESS
  inner_status = jnp.where(
    jnp.any(failed), inner_statuses[jnp.argmax(failed)], status_lib.SUCCESS
  ).astype(jnp.int32)
  info = VFPInfo(
    num_steps=jnp.asarray(mus.shape[0] * outer_steps * inner_steps, jnp.int32),
    status=status_lib.with_inner(own, inner_status),
    residual=kkt_res[-1],
    kkt_tol=jnp.asarray(tol, dtype),
    inner_status=inner_status,
    inner_failures=jnp.sum(failed).astype(jnp.int32),
    inner_statuses=inner_statuses,
    lambda_growing=lambda_growing(out["lam"]),
    mus=mus,
    lambdas=out["lam"],
    kkt_residual=kkt_res,
    stationarity=out["stat"],
    feasibility=out["feas"],
    complementarity=out["comp"],
    constraint=out["c"],
    upper_value=out["f"],
    rho=out["rho"],
    xs=out["x"],
    ys=out["y"],
  )
  status_lib.raise_if_failed(info.status, throw=throw, where="value.solve_vfp")
  return VFPSolution(x=params[0], y=params[1], lam=lam, info=info)


def lambda_growing(lambdas):
  """The test of ``info.lambda_growing`` on the multipliers (K,) (module doc)."""
  count = lambdas.shape[0]
  if count < 2:
    return jnp.zeros((), bool)
  last, delta = lambdas[-1], lambdas[-1] - lambdas[-2]
  large = (last > 10.0 * jnp.maximum(1.0, lambdas[0])) & (delta > 0)
  if count < 3:
    return large
  previous = lambdas[-2] - lambdas[-3]
  accelerating = (delta > 0) & (delta >= previous) & (delta >= 0.1 * jnp.maximum(1.0, last))
  return large | accelerating
