"""The implicit hypergradient at a point (x, y) the user trained however they like.

For a network trained by the user's own loop (minibatches, Adam, dropout),
there is no solver to differentiate: y is whatever training produced, and the
hypergradient is taken *as if* y were the lower solution y*(x),

    grad phi(x) = grad_x F(x, y) - (d_x grad_y f(x, y))^T v,            (4)
    H v = grad_y F(x, y),   H = hess_yy f(x, y),                        (2)

(the equations of `bilevel_jax._src.implicit.solver`), with H applied only
through Hessian-vector products (forward-over-reverse), on one lower batch
when ``lower_batch`` is given. Three ways to get v:

  * ``adjoint="cg"``: conjugate gradients on (2) (`implicit_diff.cg`), warm
    started from ``v0`` (the residual starts at b - H v0).
  * ``adjoint="neumann"``: the Richardson iteration
    v_{j+1} = v_j - eta (H v_j - b), which from v_0 = 0 is the truncated
    Neumann series v_J = eta sum_{j<J} (I - eta H)^j b (Lorraine et al., 2020);
    it converges for 0 < eta < 2 / L with L the largest eigenvalue of H.
    One step per upper iteration with v carried across iterations is the
    single-loop update of SOBA / AmIGO (Dagréou et al., 2022; Arbel and
    Mairal, 2022).
  * ``adjoint="darts"``: **an approximation**, not a solve: H^{-1} ~ xi I,
    the one-step unrolling of DARTS (Liu, Simonyan, Yang, 2019) and betty's
    ``darts`` hypergradient, with the mixed product by a central finite
    difference, (d_x grad_y f)^T v ~ [grad_x f(x, y + e v) - grad_x f(x, y - e v)] / (2e),
    v = xi b. Its ``info.residual`` is ||H v - b|| / ||b|| at that v (one
    extra Hessian-vector product), the measure of how far the approximation
    is from (2); ``tests/test_implicit_at_solution.py`` measures its error
    against the exact hypergradient.

The returned ``adjoint`` (v) is what to pass as ``v0`` at the next upper
step: warm starts cut the CG or Neumann steps when x moves little.

Status (``info.status``, `bilevel_jax.Status`): NONFINITE when a value,
the gradient or v is not finite; NOT_CONVEX when H has a direction of zero or
negative curvature along v or CG's directions (y is not a minimum of f, so (4)
is not a hypergradient); otherwise SUCCESS when the relative
residual of (2) is at most ``tol`` and INACCURATE when it is not (a
truncated Neumann series, CG at ``max_steps``, or the darts approximation on
a Hessian far from I / xi; pass ``tol=float("inf")`` to accept an
approximation knowingly).
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import implicit_diff
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_lib
from bilevel_jax._src import validation
from bilevel_jax._src import variables

ADJOINTS = ("cg", "neumann", "darts")


class AdjointInfo(NamedTuple):
  """Diagnostics of the adjoint solve (2).

  Attributes:
    num_steps: Hessian-vector products spent on (2) (CG or Neumann steps;
      1 for darts, whose check costs one).
    status: SUCCESS, INACCURATE or NONFINITE (`bilevel_jax.Status`).
    residual: ||H v - b|| / ||b|| at the returned v, b = grad_y F(x, y).
    lower_grad_norm: ||grad_y f(x, y)||: how far y is from stationary, the
      premise of (4); a large value makes the hypergradient meaningless
      whatever the adjoint.
    approximate: True for ``adjoint="darts"``.
    curvature: the smallest Rayleigh quotient p' H p / p' p seen (along v,
      and along CG's directions): NOT_CONVEX when it is <= 0.
  """

  num_steps: Any
  status: Any
  residual: Any
  lower_grad_norm: Any
  approximate: Any
  curvature: Any


class AdjointSolution(NamedTuple):
  """``value`` F(x, y), ``grad`` (4), ``adjoint`` v of (2) (pass it as the
  next call's ``v0``), ``info`` an `AdjointInfo`."""

  value: Any
  grad: Any
  adjoint: Any
  info: AdjointInfo


def _with_batch(fn: Callable, batch) -> Callable:
  return (lambda x, y: fn(x, y)) if batch is None else (lambda x, y: fn(x, y, batch))


def hypergradient_at(
  upper_fn: Callable,
  lower_fn: Callable,
  x,
  y,
  *,
  adjoint: str = "cg",
  v0=None,
  tol: float = 1e-6,
  max_steps: int = 100,
  neumann_lr: float | None = None,
  darts_lr: float | None = None,
  finite_difference: float = 1e-2,
  upper_batch=None,
  lower_batch=None,
  throw: bool = False,
) -> AdjointSolution:
  """The implicit hypergradient (4) at a given (x, y), from Hessian-vector products.

  Args:
    upper_fn: F(x, y) -> scalar, or F(x, y, batch) with ``upper_batch``.
    lower_fn: f(x, y) -> scalar, or f(x, y, batch) with ``lower_batch``; y
      should (approximately) minimize it, e.g. a network after training.
    x: upper variable: a pytree of float arrays, or an Equinox module.
    y: lower variable at (near) its optimum: a pytree, an Equinox module or
      Flax NNX state; only floating-point leaves are differentiated.
    adjoint: ``"cg"``, ``"neumann"`` or ``"darts"`` (an approximation; see
      the module docstring).
    v0: warm start for v (a tree like the float leaves of ``y``, e.g. the
      previous call's ``adjoint``); zeros by default. Ignored by darts.
    tol: relative residual of (2) below which the status is SUCCESS; CG
      also stops there.
    max_steps: CG or Neumann steps (static).
    neumann_lr: eta of the Neumann iteration, 0 < eta < 2 / L (required
      with ``adjoint="neumann"``).
    darts_lr: xi of the darts approximation H^{-1} ~ xi I, typically the
      lower learning rate (required with ``adjoint="darts"``).
    finite_difference: darts' step e is ``finite_difference / ||v||``.
    upper_batch: a batch passed to F as its third argument (any pytree).
    lower_batch: a batch passed to f as its third argument; every
      Hessian-vector product of the solve uses it.
    throw: raise `bilevel_jax.SolverError` when the status is not SUCCESS.

  Returns:
    `AdjointSolution` (value, grad, adjoint, info).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import implicit
    >>> F = lambda x, y: 0.5 * jnp.sum((y - 1.0) ** 2)
    >>> f = lambda x, y: 0.5 * jnp.sum(y ** 2) - x * jnp.sum(y)   # y*(x) = x
    >>> sol = implicit.hypergradient_at(F, f, 2.0, jnp.full(3, 2.0))
    >>> round(float(sol.grad), 6), int(sol.info.status)      # 3 (x - 1)
    (3.0, 0)
    >>> sol = implicit.hypergradient_at(F, f, 2.0, jnp.full(3, 2.0), adjoint="neumann",
    ...                                 neumann_lr=0.5, max_steps=40)
    >>> round(float(sol.grad), 6)
    3.0
  """
  if adjoint not in ADJOINTS:
    raise ValueError(f"`adjoint` must be one of {ADJOINTS}, got {adjoint!r}.")
  if adjoint == "neumann" and neumann_lr is None:
    raise ValueError(
      "`neumann_lr` is required with adjoint='neumann' (0 < eta < 2 / L, "
      "L the largest eigenvalue of the lower Hessian)."
    )
  if adjoint == "darts" and darts_lr is None:
    raise ValueError(
      "`darts_lr` is required with adjoint='darts' (xi of H^-1 ~ xi I, "
      "typically the lower learning rate)."
    )
  validation.check_positive_int("max_steps", max_steps)
  validation.check_positive("tol", tol)
  variables.check("x", x)
  variables.check("y", y)
  F = _with_batch(upper_fn, upper_batch)
  f = _with_batch(lower_fn, lower_batch)
  validation.check_scalar_output("upper_fn", F, x, y)
  validation.check_scalar_output("lower_fn", f, x, y)

  x_dyn, x_rest = variables.partition(x)
  y_dyn, y_rest = variables.partition(y)
  flat_y, unravel = ravel_pytree(y_dyn)
  F_flat = lambda xd, yv: F(variables.combine(xd, x_rest), variables.combine(unravel(yv), y_rest))
  f_flat = lambda xd, yv: f(variables.combine(xd, x_rest), variables.combine(unravel(yv), y_rest))

  value, (gx_F, b) = jax.value_and_grad(F_flat, argnums=(0, 1))(x_dyn, flat_y)
  grad_y_f = lambda yv: jax.grad(f_flat, argnums=1)(x_dyn, yv)
  lower_grad, hvp_lin = jax.linearize(grad_y_f, flat_y)
  hvp = lambda v: hvp_lin(v)
  b_norm = jnp.linalg.norm(b)
  start = jnp.zeros_like(b) if v0 is None else ravel_pytree(v0)[0].astype(b.dtype)

  if adjoint == "cg":
    # Warm started CG stops at ||b - H v|| <= tol ||b||: the tolerance stays
    # relative to b, so a good warm start saves steps (no product without one).
    v, steps, _, curvature = implicit_diff.cg(
      hvp, b, tol=tol, max_steps=max_steps, curvature=True, x0=None if v0 is None else start
    )
  elif adjoint == "neumann":
    eta = jnp.asarray(neumann_lr, b.dtype)
    v = jax.lax.fori_loop(0, max_steps, lambda _, v: v - eta * (hvp(v) - b), start)
    steps = jnp.asarray(max_steps, jnp.int32)
    curvature = jnp.asarray(jnp.inf, b.dtype)
  else:
    v = jnp.asarray(darts_lr, b.dtype) * b
    steps = jnp.asarray(1, jnp.int32)
    curvature = jnp.asarray(jnp.inf, b.dtype)
  hv = hvp(v)
  residual = jnp.linalg.norm(hv - b) / jnp.where(b_norm > 0, b_norm, 1.0)
  # The Rayleigh quotient along v (and CG's directions): <= 0 proves that the
  # lower Hessian is not positive definite, so (2) and (4) do not describe a
  # minimum (y is a saddle or a maximum of f).
  v_norm2 = jnp.vdot(v, v)
  curvature = jnp.minimum(
    curvature,
    jnp.where(v_norm2 > 0, jnp.vdot(v, hv) / jnp.where(v_norm2 > 0, v_norm2, 1.0), jnp.inf),
  )

  grad_x_f = lambda yv: jax.grad(f_flat, argnums=0)(x_dyn, yv)
  if adjoint == "darts":
    v_norm = jnp.linalg.norm(v)
    e = finite_difference / jnp.where(v_norm > 0, v_norm, 1.0)
    mixed = jax.tree_util.tree_map(
      lambda a, c: (a - c) / (2 * e), grad_x_f(flat_y + e * v), grad_x_f(flat_y - e * v)
    )
  else:
    _, vjp = jax.vjp(lambda xd: jax.grad(f_flat, argnums=1)(xd, flat_y), x_dyn)
    (mixed,) = vjp(v)
  grad = jax.tree_util.tree_map(lambda a, m: a - m, gx_F, mixed)

  finite = tree_lib.tree_all_finite((value, grad, v))
  status = jnp.where(
    ~finite,
    status_lib.NONFINITE,
    jnp.where(
      curvature <= 0,
      status_lib.NOT_CONVEX,
      jnp.where(residual <= tol, status_lib.SUCCESS, status_lib.INACCURATE),
    ),
  ).astype(jnp.int32)
  status_lib.raise_if_failed(status, throw=throw, where="implicit.hypergradient_at")
  info = AdjointInfo(
    num_steps=steps,
    status=status,
    residual=residual,
    lower_grad_norm=jnp.linalg.norm(lower_grad),
    approximate=jnp.asarray(adjoint == "darts"),
    curvature=curvature,
  )
  return AdjointSolution(value=value, grad=grad, adjoint=unravel(v), info=info)
