"""BDA, RHG and truncated RHG: unrolled lower iterations differentiated in
reverse mode (Liu, Mu, Yuan, Zeng, Zhang, ICML 2020).

Bilevel problem (eq. 1-2): min_{x in X} F(x, y) s.t. y in argmin_y f(x, y).

The lower iterations (eq. 10) aggregate the two descent directions

    d_k^F = s_u grad_y F(x, y_k),   d_k^f = s_l grad_y f(x, y_k),
    y_{k+1} = y_k - (alpha_{k+1} d_k^F + (1 - alpha_{k+1}) d_k^f),

for k = 0, ..., K-1, and phi_K(x) = F(x, y_K(x)) (eq. 9) is differentiated by
reverse-mode autodiff through `lax.scan`. ``alpha = 0`` is RHG (eq. 4).

With a nonsmooth lower level f + g (Supplement D.2, eq. 12-13) the lower
direction becomes the proximal-gradient step

    d_k^h = y_k - prox_{s_l g(x, .)}(y_k - s_l grad_y f(x, y_k)),
    y_{k+1} = y_k - (alpha_{k+1} d_k^F + (1 - alpha_{k+1}) d_k^h).

Eq. (13) in the supplement prints the weights the other way round (alpha_k on
d^h); with alpha_k -> 0 that would drop the lower direction, contradicting
Proposition 6, so we keep the convention of eq. (10): alpha weights the
upper direction, and alpha = 0 is plain proximal gradient.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilevel_jax._src import hypergradient as hypergradient_lib
from bilevel_jax._src import schedules
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation
from bilevel_jax._src import variables

Objective = Callable[[Any, Any], jax.Array]
Checkpoint = Union[bool, str, int]
# `steps` at most: the loop scans over (and may record) arrays of length K.
MAX_UNROLL = 2 ** 24


class BDAInfo(NamedTuple):
  """Diagnostics of one unrolled solve. All fields are arrays.

  Attributes:
    num_steps: K, the number of lower iterations run.
    status: a `Status` code (a fixed unroll has no tolerance to miss):
      INVALID_INPUT when a traced step size is not > 0 or an alpha_k lies
      outside [0, 1]; NONFINITE when an iterate y_1..y_K, F(x, y_K),
      f(x, y_K), the residual or (from `hypergradient`) the gradient had a
      NaN or infinity; DIVERGED when the lower iterations did not settle
      (K >= 2; from y_0 to y_K the lower residual did not shrink, and f does
      not curve up between them: a lower level unbounded below, such as
      f = sum(y) or f = -|y|^2 / 2); SUCCESS otherwise.
    residual: norm of the lower gradient mapping at y_K,
      ||y_K - prox(y_K - s_l grad_y f)|| / s_l (= ||grad_y f|| without prox).
    upper_value: F(x, y_K).
    lower_value: f(x, y_K) (without the nonsmooth part g).
    upper_history: F(x, y_k) for k = 0..K-1 when ``record_history``, else None.
    lower_history: f(x, y_k) for k = 0..K-1 when ``record_history``, else None.
  """
  num_steps: jax.Array
  status: jax.Array
  residual: jax.Array
  upper_value: jax.Array
  lower_value: jax.Array
  upper_history: Optional[jax.Array] = None
  lower_history: Optional[jax.Array] = None


class BDASolution(NamedTuple):
  """Result of `solve`: ``y`` is y_K(x), differentiable in x."""
  y: Any
  info: BDAInfo


def _segment_length(checkpoint: Checkpoint, steps: int) -> int:
  """Steps per rematerialized segment: 1 for per-step, ~sqrt(K) for 'sqrt'."""
  if checkpoint is True or (isinstance(checkpoint, str) and checkpoint == "step"):
    return 1
  if isinstance(checkpoint, str) and checkpoint == "sqrt":
    return max(1, int(round(math.sqrt(steps))))
  if (isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool)
      and checkpoint > 0):
    return int(checkpoint)
  raise ValueError("`checkpoint` must be False, True/'step', 'sqrt' or a "
                   f"positive int segment length, got {checkpoint!r}.")


def _scan(step, carry, ks, checkpoint: Checkpoint, unroll: Union[int, bool] = 1):
  """`lax.scan` over ``ks``, optionally rematerializing the backward pass.

  With segments of length S, reverse mode stores one carry per segment and
  recomputes the segment's S steps, so memory goes from O(K) step residuals
  to O(K / S + S). ``unroll`` is `lax.scan`'s (inside each segment).
  """
  if checkpoint is False or checkpoint is None:
    return lax.scan(step, carry, ks, unroll=unroll)
  steps = ks.shape[0]
  seg = _segment_length(checkpoint, steps)
  if seg == 1:
    return lax.scan(jax.checkpoint(step), carry, ks, unroll=unroll)
  n_full = steps // seg

  @jax.checkpoint
  def segment(c, ks_seg):
    return lax.scan(step, c, ks_seg, unroll=unroll)

  carry, out = lax.scan(segment, carry, ks[: n_full * seg].reshape(n_full, seg))
  out = jax.tree_util.tree_map(lambda o: o.reshape((n_full * seg,) + o.shape[2:]), out)
  if n_full * seg < steps:
    carry, rest = segment(carry, ks[n_full * seg:])
    out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, rest)
  return carry, out


def _validate(upper_fn, lower_fn, x, y0, steps, upper_lr, lower_lr, truncate, prox):
  """Checks the arguments; ``upper_fn`` and ``lower_fn`` take (x, the
  differentiable part of y), ``prox`` too (see `solve`)."""
  steps = validation.check_positive_int(
      "steps", steps, MAX_UNROLL, "the unrolled loop keeps arrays of length K")
  if not callable(upper_fn):
    raise TypeError(f"`upper_fn` must be callable, got {type(upper_fn).__name__}.")
  if not callable(lower_fn):
    raise TypeError(f"`lower_fn` must be callable, got {type(lower_fn).__name__}.")
  variables.check("x", x)
  variables.check("y0", y0)
  for name, lr in (("upper_lr", upper_lr), ("lower_lr", lower_lr)):
    validation.check_positive(name, lr)
    _check_step_shape(name, lr, y0)
  x_dyn, x_rest = variables.partition(x)
  as_x = lambda xd: variables.combine(xd, x_rest)
  validation.check_scalar_output("upper_fn", lambda xd, yy: upper_fn(as_x(xd), yy), x_dyn, y0)
  validation.check_scalar_output("lower_fn", lambda xd, yy: lower_fn(as_x(xd), yy), x_dyn, y0)
  if truncate is not None:
    truncate = validation.check_positive_int("truncate", truncate)
    if truncate > steps:
      raise ValueError(f"`truncate` ({truncate}) cannot exceed `steps` ({steps}).")
  if prox is not None:
    if not callable(prox):
      raise TypeError(f"`prox` must be a callable (x, y, step) -> y, got "
                      f"{type(prox).__name__}.")
    try:
      out = jax.eval_shape(lambda xd, yy: prox(as_x(xd), yy, lower_lr), x_dyn, y0)
    except Exception as err:  # re-raised with the argument's name
      raise TypeError(f"`prox` failed when called as prox(x, y0, lower_lr); it must "
                      f"take (x, y, step) and return y: {err}") from err
    validation.check_same_structure("prox", y0, out, "prox(x, y0, lower_lr)")
  return steps, truncate


def _check_step_shape(name: str, lr, y0) -> None:
  """A step size is a scalar, or an array that broadcasts to each leaf of y
  without changing its shape (a per-coordinate step)."""
  shape = jnp.shape(lr)
  if shape == ():
    return
  for leaf in jax.tree_util.tree_leaves(y0):
    try:
      ok = jnp.broadcast_shapes(shape, jnp.shape(leaf)) == jnp.shape(leaf)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"`{name}` must be a scalar or broadcast to each leaf of `y0` "
                       f"(a per-coordinate step), got shape {shape} for a leaf of "
                       f"shape {jnp.shape(leaf)}.")


def _check_schedule_range(schedule, steps: int) -> None:
  """Checks alpha_1..alpha_K lie in [0, 1] when the schedule is concrete."""
  ks = jnp.arange(1, steps + 1)
  try:
    with jax.ensure_compile_time_eval():
      values = schedule(ks)
  except Exception as err:  # noqa: BLE001
    raise TypeError(f"`alpha` schedule failed on k = 1..{steps}: {err}") from err
  if jnp.shape(values) not in ((steps,), ()):
    raise ValueError(f"`alpha` schedule must map k (shape ({steps},)) to an "
                     f"array of the same shape or a scalar, got shape {jnp.shape(values)}.")
  concrete = validation.concrete_value(values)
  if concrete is not None:
    concrete = np.broadcast_to(concrete, (steps,))
    bad = np.flatnonzero(~((concrete >= 0) & (concrete <= 1)))
    if bad.size:
      raise ValueError(f"`alpha` schedule must return values in [0, 1], got "
                       f"alpha_{bad[0] + 1} = {concrete[bad[0]]}.")


def _diverged(lower_grad, lower_step, y0, y_final, grad_final, residual):
  """True when the lower iterations did not settle: the lower residual
  r = |d| (d = grad_y f, or the gradient mapping) did not shrink from y_0 to
  y_K (r_K >= r_0 up to sqrt(eps), r_K > 0), y moved, and f has no positive
  secant curvature between them, (grad f(y_K) - grad f(y_0))' (y_K - y_0)
  <= 0: f keeps decreasing along the path with nothing bending it back, as
  for a lower level unbounded below (f = sum(y): 0; f = -|y|^2 / 2:
  -|y_K - y_0|^2). A run that converges shrinks r; a strictly convex f has a
  positive secant curvature (so BDA settling at a compromise between F and
  f, with r_K > 0 by design, is not flagged). Costs one gradient at y_0 (the
  status is never differentiated)."""
  grad0 = lower_grad(y0)
  residual0 = tree_ops.tree_norm(lower_step(y0, grad0))
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  moved = tree_ops.tree_sub(y_final, y0)
  secant = sum(jnp.vdot(gk - g0, m) for gk, g0, m in
               zip(leaves(grad_final), leaves(grad0), leaves(moved)))
  rtol = 1 - jnp.sqrt(jnp.finfo(jnp.result_type(residual)).eps)
  return ((residual >= rtol * residual0) & (residual > 0)
          & (tree_ops.tree_norm(moved) > 0) & (secant <= 0))


def solve(upper_fn: Objective, lower_fn: Objective, x, y0, *, steps: int,
          upper_lr, lower_lr, alpha, truncate: Optional[int] = None,
          prox=None, checkpoint: Checkpoint = False,
          record_history: bool = False, unroll: Union[int, bool] = 1,
          throw: bool = False) -> BDASolution:
  """Runs K aggregated lower iterations (BDA eq. 10, or eq. 13 with ``prox``).

  Args:
    upper_fn: F(x, y) -> scalar, the upper objective.
    lower_fn: f(x, y) -> scalar, the smooth part of the lower objective.
    x: upper variable: any pytree with floating-point leaves, e.g. an
      Equinox module (see `bilevel_jax._src.variables`).
    y0: initial lower iterate: any pytree with floating-point leaves, an
      Equinox module, or Flax NNX state (``nnx.split(model)[1]``). Only the
      floating-point leaves are iterated; integer, boolean and key leaves
      and non-array fields are carried along untouched.
    steps: K, number of lower iterations (static).
    upper_lr: s_u > 0, step on grad_y F inside the lower iterations.
    lower_lr: s_l > 0, step on grad_y f.
    alpha: aggregation weight: a number in [0, 1] (``0`` is RHG) or a
      schedule ``k -> alpha_k`` from `bilevel_jax.schedules`.
    truncate: if set to M, the gradient flows only through the last M steps
      (truncated RHG/BDA); the first K - M steps are treated as constants.
    prox: optional ``prox(x, y, step)`` of the nonsmooth lower part g.
    checkpoint: ``False``; ``True``/``'step'`` to rematerialize each step;
      ``'sqrt'`` or an int S to rematerialize segments of ~sqrt(K) or S steps.
    record_history: also return F(x, y_k) and f(x, y_k) for every k in info.
    unroll: `lax.scan`'s unroll factor for the K steps (static). ``True``
      unrolls the whole loop: more compile time, fewer loop iterations, which
      can pay on a GPU where each iteration launches kernels. Results are the
      same up to rounding.
    throw: raise `bilevel_jax.SolverError` when ``info.status`` is not
      SUCCESS (eagerly at once, under jit when the program runs; see
      `bilevel_jax.Status`). Default False: the status is reported only.

  Returns:
    `BDASolution` with ``y`` = y_K(x), differentiable in ``x`` (and in the step
    sizes, alpha and any data the objectives close over), and ``info``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import bda
    >>> F = lambda x, y: 0.5 * (x - y[1]) ** 2 + 0.5 * (y[0] - 1.0) ** 2
    >>> f = lambda x, y: 0.5 * y[0] ** 2 - x * y[0]
    >>> sol = bda.solve(F, f, 1.0, jnp.array([2.0, 2.0]), steps=64,
    ...                 upper_lr=0.7, lower_lr=0.2, alpha=0.5)
    >>> [round(float(v), 3) for v in sol.y]
    [1.0, 1.0]
    >>> int(sol.info.status)
    0
  """
  variables.check("y0", y0)
  y0_dyn, y_rest = variables.partition(y0)
  as_y = lambda yd: variables.combine(yd, y_rest)
  user_upper, user_lower, user_prox = upper_fn, lower_fn, prox
  upper_fn = lambda xx, yd: user_upper(xx, as_y(yd))
  lower_fn = lambda xx, yd: user_lower(xx, as_y(yd))
  if user_prox is not None and callable(user_prox):
    prox = lambda xx, yd, s: variables.partition(user_prox(xx, as_y(yd), s))[0]
  if not callable(user_upper) or not callable(user_lower):
    upper_fn, lower_fn = user_upper, user_lower  # _validate names the bad one
  steps, truncate = _validate(upper_fn, lower_fn, x, y0_dyn, steps, upper_lr,
                              lower_lr, truncate, prox)
  if not isinstance(throw, (bool, np.bool_)):
    raise TypeError(f"`throw` must be a bool, got {throw!r}.")
  if not (isinstance(unroll, (bool, np.bool_)) or (
      isinstance(unroll, (int, np.integer)) and unroll >= 1)):
    raise ValueError(f"`unroll` must be a positive int or a bool, got {unroll!r}.")
  schedule, rhg = schedules.as_schedule(alpha)
  if callable(alpha):
    _check_schedule_range(schedule, steps)

  def direction(x, y, a, s_u, s_l):
    """alpha s_u grad F + (1 - alpha) d^f (or d^h with a prox)."""
    if prox is None:
      if rhg:
        return tree_ops.tree_scale(s_l, jax.grad(lower_fn, argnums=1)(x, y))
      # One backward pass for both directions.
      combined = lambda yy: a * s_u * upper_fn(x, yy) + (1 - a) * s_l * lower_fn(x, yy)
      return jax.grad(combined)(y)
    g_f = jax.grad(lower_fn, argnums=1)(x, y)
    d_h = tree_ops.tree_sub(y, prox(x, tree_ops.tree_axpy(-s_l, g_f, y), s_l))
    if rhg:
      return d_h
    g_F = jax.grad(upper_fn, argnums=1)(x, y)
    return jax.tree_util.tree_map(lambda gF, dh: a * s_u * gF + (1 - a) * dh, g_F, d_h)

  def make_step(x, s_u, s_l):
    def step(carry, k):
      y, finite = carry
      a = schedule(k)
      y_next = tree_ops.tree_cast_like(
          tree_ops.tree_sub(y, direction(x, y, a, s_u, s_l)), y)
      finite = jnp.logical_and(finite, tree_ops.tree_all_finite(y_next))
      if record_history:
        out = (upper_fn(x, y), lower_fn(x, y))
      else:
        out = None
      return (y_next, finite), out
    return step

  ks = jnp.arange(1, steps + 1)
  carry = (y0_dyn, jnp.asarray(True))
  if truncate is not None and truncate < steps:
    head = steps - truncate
    sg = lax.stop_gradient
    x_dyn, x_rest = variables.partition(x)
    x_const = variables.combine(sg(x_dyn), x_rest)
    carry, head_out = _scan(make_step(x_const, sg(upper_lr), sg(lower_lr)),
                            sg(carry), ks[:head], False, unroll)
    carry = sg(carry)
    carry, tail_out = _scan(make_step(x, upper_lr, lower_lr), carry, ks[head:],
                            checkpoint, unroll)
    history = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]),
                                     head_out, tail_out)
  else:
    carry, history = _scan(make_step(x, upper_lr, lower_lr), carry, ks, checkpoint, unroll)
  y_final, finite = carry

  def lower_step(y, g_f):
    """grad_y f, or the gradient mapping (y - prox(y - s_l grad_y f)) / s_l."""
    if prox is None:
      return g_f
    moved = prox(x, tree_ops.tree_axpy(-lower_lr, g_f, y), lower_lr)
    return tree_ops.tree_scale(1 / lower_lr, tree_ops.tree_sub(y, moved))

  grad_final = jax.grad(lower_fn, argnums=1)(x, y_final)
  residual = tree_ops.tree_norm(lower_step(y_final, grad_final))
  upper_value, lower_value = upper_fn(x, y_final), lower_fn(x, y_final)
  finite = finite & jnp.isfinite(upper_value) & jnp.isfinite(lower_value) & jnp.isfinite(
      residual)
  status = jnp.where(finite, status_lib.SUCCESS, status_lib.NONFINITE)
  if steps >= 2:
    status = jnp.where((status == status_lib.SUCCESS) & _diverged(
        lambda y: jax.grad(lower_fn, argnums=1)(x, y), lower_step, y0_dyn, y_final,
        grad_final, residual), status_lib.DIVERGED, status)
  valid = (validation.is_positive(upper_lr) & validation.is_positive(lower_lr)
           & validation.in_unit_interval(schedule(ks)))
  status = status_lib.unless_invalid(valid, status)
  info = BDAInfo(
      num_steps=jnp.asarray(steps, jnp.int32),
      status=status,
      residual=residual,
      upper_value=upper_value,
      lower_value=lower_value,
      upper_history=history[0] if record_history else None,
      lower_history=history[1] if record_history else None,
  )
  status_lib.raise_if_failed(status, throw=throw, where="bda.solve")
  return BDASolution(y=as_y(y_final), info=info)


def hypergradient(upper_fn: Objective, lower_fn: Objective, x, y0, *,
                  return_info: bool = False, throw: bool = False, **kwargs):
  """phi_K(x) = F(x, y_K(x)) and its gradient in x by reverse mode (eq. 9).

  Takes the keyword arguments of `solve`. Returns ``(value, grad)``, or
  ``(value, grad, solution)`` with ``return_info=True``; ``grad`` has the
  structure of ``x`` (``None`` at leaves that are not floating point, as
  `equinox.filter_grad` returns). ``throw``: as in `solve`.

  Example:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import bda
    >>> F = lambda x, y: 0.5 * jnp.sum((y - 1.0) ** 2)
    >>> f = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)    # y_K -> x
    >>> value, grad = bda.hypergradient(F, f, jnp.array([3.0]), jnp.zeros(1),
    ...                                 steps=50, upper_lr=0.5, lower_lr=0.5, alpha=0.0)
    >>> round(float(value), 4), round(float(grad[0]), 4)
    (2.0, 2.0)
  """
  variables.check("x", x)
  x_dyn, x_rest = variables.partition(x)

  def phi(xd):
    solution = solve(upper_fn, lower_fn, variables.combine(xd, x_rest), y0, **kwargs)
    return solution.info.upper_value, solution  # F(x, y_K(x)), computed once

  (value, solution), grad = jax.value_and_grad(phi, has_aux=True)(x_dyn)
  status = solution.info.status
  status = jnp.where((status == status_lib.SUCCESS) & ~tree_ops.tree_all_finite(grad),
                     status_lib.NONFINITE, status).astype(jnp.int32)
  solution = solution._replace(info=solution.info._replace(status=status))
  status_lib.raise_if_failed(solution.info.status, throw=throw, where="bda.hypergradient")
  if return_info:
    return value, grad, solution
  return value, grad


def make_hypergradient(upper_fn: Objective, lower_fn: Objective, *, jit: bool = True,
                       **kwargs):
  """Builds ``fn(x, y0) -> (value, grad, solution)`` for `bilevel_jax.upper.optimize`.

  ``solution.info.status`` tells the driver whether the lower iterations
  stayed finite. The driver passes the same y0 every time, or y_K of the
  previous upper step with ``warm_start=True``. ``kwargs`` are those of
  `solve`; the builder is `bilevel_jax._src.hypergradient.make`.
  """
  return hypergradient_lib.make(hypergradient, upper_fn, lower_fn, jit=jit, **kwargs)
