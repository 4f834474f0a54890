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

Any Optax transformation as the lower iteration (ours). The paper's framework
aggregates two descent directions and lets the lower one be any descent
scheme (Remark 2; Supplement D.2 swaps d^f for the proximal d^h). With
``lower_optimizer`` = T, a `optax.GradientTransformation` with state S_k,
the transformation supplies the lower direction and the upper one stays
eq. (10)'s:

    (u_k, S_{k+1}) = T.update(grad_y f(x, y_k), S_k, y_k),   d_k^T = -u_k,
    y_{k+1} = y_k - (alpha_{k+1} s_u grad_y F(x, y_k) + (1 - alpha_{k+1}) d_k^T),

with S_0 = T.init(y_0), and (y_k, S_k) the carry of the unrolled loop, so
reverse mode differentiates through the transformation's state (momentum,
Adam's moments, the hyperparameters of `optax.inject_hyperparams`). The
transformation sees grad_y f only; alpha_k and s_u keep their meaning, and the
transformation's own learning rate replaces s_l. For ``optax.sgd(s)``,
u_k = -s grad_y f(x, y_k), so d_k^T = s grad_y f(x, y_k) = d_k^f with
s_l = s, and the iteration is eq. (10) exactly (tested to rounding). With a
prox, the transformed step is the forward step of eq. (12):
d_k^h = y_k - prox_{t g(x, .)}(y_k + u_k), t = ``lower_lr`` (for
``optax.sgd(s)`` and t = s this is eq. (12-13) exactly). We do not feed the
aggregated gradient alpha s_u/s_l grad F + (1 - alpha) grad f to T instead:
an adaptive T (Adam) has no s_l to divide by, and T's statistics would mix
the two objectives.

Stochastic lower (and upper) levels (ours). With ``lower_batches`` the lower
objective is f(x, y; b_k) and step k uses grad_y f(x, y_k; b_k), b_k the
batch of step k (k = 0..K-1); ``upper_batches`` does the same for F in the
d^F term. Values reported at y_K (``info.upper_value`` = phi_K, the residual,
``info.lower_value``) use the last batch, b_{K-1}.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bilevel_jax._src import hypergradient as hypergradient_lib
from bilevel_jax._src import schedules
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation
from bilevel_jax._src import variables

Objective = Callable[..., jax.Array]  # F(x, y) or F(x, y, batch)
Checkpoint = bool | str | int
# `steps` at most: the loop scans over (and may record) arrays of length K.
MAX_UNROLL = 2**24


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
      f = sum(y) or f = -|y|^2 / 2), or blew up through too large a lower
      step (the residual did not shrink and the secant curvature of f
      between y_0 and y_K exceeds the stability limit 2 / s_l of gradient
      descent, so s_l > 2 / L_f; e.g. s_l = 1e4 on a convex quadratic);
      SUCCESS otherwise.
    residual: norm of the lower gradient mapping at y_K,
      ||y_K - prox(y_K - s_l grad_y f)|| / s_l (= ||grad_y f|| without prox).
    upper_value: F(x, y_K).
    lower_value: f(x, y_K) (without the nonsmooth part g).
    upper_history: F(x, y_k) for k = 0..K-1 when ``record_history``, else None.
    lower_history: f(x, y_k) for k = 0..K-1 when ``record_history``, else None.
    lower_lr_exceeds_bound: with ``smoothness`` = L_f given, the boolean
      s_l > 1 / L_f (any coordinate of a per-coordinate s_l): the lower step
      is outside the range s_l <= 1 / L_f that Theorem 2 (and the descent
      lemma behind eq. 10) assume, so the run carries no convergence
      guarantee (it may still converge: L_f is often a loose bound). None
      when ``smoothness`` is not given.
  """

  num_steps: jax.Array
  status: jax.Array
  residual: jax.Array
  upper_value: jax.Array
  lower_value: jax.Array
  upper_history: jax.Array | None = None
  lower_history: jax.Array | None = None
  lower_lr_exceeds_bound: jax.Array | None = None


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
  if (
    isinstance(checkpoint, (int, np.integer))
    and not isinstance(checkpoint, bool)
    and checkpoint > 0
  ):
    return int(checkpoint)
  raise ValueError(
    "`checkpoint` must be False, True/'step', 'sqrt' or a "
    f"positive int segment length, got {checkpoint!r}."
  )


def _scan(step, carry, xs, checkpoint: Checkpoint, unroll: int | bool = 1):
  """`lax.scan` over ``xs`` (a pytree, leading axis K), optionally
  rematerializing the backward pass.

  With segments of length S, reverse mode stores one carry per segment and
  recomputes the segment's S steps, so memory goes from O(K) step residuals
  to O(K / S + S). ``unroll`` is `lax.scan`'s (inside each segment).
  """
  if checkpoint is False or checkpoint is None:
    return lax.scan(step, carry, xs, unroll=unroll)
  steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
  seg = _segment_length(checkpoint, steps)
  if seg == 1:
    return lax.scan(jax.checkpoint(step), carry, xs, unroll=unroll)
  n_full = steps // seg
  tmap = jax.tree_util.tree_map

  @jax.checkpoint
  def segment(c, xs_seg):
    return lax.scan(step, c, xs_seg, unroll=unroll)

  carry, out = lax.scan(
    segment, carry, tmap(lambda v: v[: n_full * seg].reshape((n_full, seg) + v.shape[1:]), xs)
  )
  out = tmap(lambda o: o.reshape((n_full * seg,) + o.shape[2:]), out)
  if n_full * seg < steps:
    carry, rest = segment(carry, tmap(lambda v: v[n_full * seg :], xs))
    out = tmap(lambda a, b: jnp.concatenate([a, b]), out, rest)
  return carry, out


class _Batches(NamedTuple):
  """Where the batch of step k comes from: ``xs`` (leading axis K, scanned
  over), ``sample(k, key_k)``, or neither (the objective takes no batch)."""

  xs: Any = None
  sample: Callable | None = None
  stream: int = 0  # 0: the lower sampler's keys, 1: the upper sampler's
  fixed: Any = None  # one batch for every step (``upper_batch``)

  def at(self, k, xs_k, key):
    """The batch of step k (0-based); ``xs_k`` is the scanned slice."""
    if self.fixed is not None:
      return self.fixed
    if self.sample is None:
      return xs_k
    key_k = jax.random.fold_in(key, k)
    return self.sample(k, key_k if self.stream == 0 else jax.random.fold_in(key_k, 1))

  def last(self, steps: int, key):
    """The batch of the last step, b_{K-1}, used for the values at y_K."""
    if self.fixed is not None:
      return self.fixed
    if self.xs is not None:
      return jax.tree_util.tree_map(lambda v: v[-1], self.xs)
    return self.at(steps - 1, None, key) if self.sample is not None else None


class _OneBatch(NamedTuple):
  """``upper_batch``: the same batch at every step."""

  batch: Any


def _as_batches(name: str, batches, steps: int, key, stream: int) -> _Batches:
  """Checks ``lower_batches``/``upper_batches``: a callable (k, key) -> batch
  (which needs ``key``) or a pytree whose leaves have leading axis ``steps``."""
  if batches is None:
    return _Batches()
  if isinstance(batches, _OneBatch):
    return _Batches(fixed=batches.batch, stream=stream)
  if callable(batches):
    if key is None:
      raise ValueError(
        f"`{name}` is a sampler (k, key) -> batch, which needs `key` "
        f"(a PRNG key; step k gets jax.random.fold_in(key, k))."
      )
    return _Batches(sample=batches, stream=stream)
  leaves = jax.tree_util.tree_leaves(batches)
  if not leaves:
    raise ValueError(f"`{name}` has no array leaves.")
  shapes = [jnp.shape(leaf) for leaf in leaves]
  bad = [shape for shape in shapes if not shape or shape[0] != steps]
  if bad:
    raise ValueError(
      f"`{name}` must be a pytree whose leaves all have a leading "
      f"axis of length `steps` ({steps}), one batch per lower step, "
      f"or a callable (k, key) -> batch; got leaves of shapes {shapes}."
    )
  return _Batches(xs=batches, stream=stream)


def _as_optimizer(lower_optimizer, x):
  """``lower_optimizer`` or ``lower_optimizer(x)`` as a GradientTransformation."""
  opt = lower_optimizer
  if getattr(opt, "__module__", "").startswith("optax") and not isinstance(
    opt, optax.GradientTransformation
  ):
    raise TypeError(
      f"`lower_optimizer` is the optax factory "
      f"{getattr(opt, '__name__', opt)!r}, not a GradientTransformation: "
      "call it (optax.adam(1e-3)), or pass a function x -> "
      "GradientTransformation whose hyperparameters depend on x."
    )
  if not isinstance(opt, optax.GradientTransformation) and callable(opt):
    opt = opt(x)
  if not isinstance(opt, optax.GradientTransformation):
    raise TypeError(
      "`lower_optimizer` must be an optax.GradientTransformation or a "
      "function x -> optax.GradientTransformation, got "
      f"{type(opt).__name__}."
    )
  return opt


def _validate(
  upper_fn,
  lower_fn,
  x,
  y0,
  steps,
  upper_lr,
  lower_lr,
  truncate,
  prox,
  lower_optimizer=None,
  batches=(None, None),
  key=None,
):
  """Checks the arguments; ``upper_fn`` and ``lower_fn`` take (x, the
  differentiable part of y, batch), ``prox`` (x, y, step) (see `solve`);
  ``batches`` are the raw ``(upper_batches, lower_batches)``. Returns
  ``steps, truncate, upper_batches, lower_batches`` (as `_Batches`)."""
  steps = validation.check_positive_int(
    "steps", steps, MAX_UNROLL, "the unrolled loop keeps arrays of length K"
  )
  if not callable(upper_fn):
    raise TypeError(f"`upper_fn` must be callable, got {type(upper_fn).__name__}.")
  if not callable(lower_fn):
    raise TypeError(f"`lower_fn` must be callable, got {type(lower_fn).__name__}.")
  variables.check("x", x)
  variables.check("y0", y0)
  validation.check_positive("upper_lr", upper_lr)
  _check_step_shape("upper_lr", upper_lr, y0)
  if lower_optimizer is None and lower_lr is None:
    raise ValueError(
      "`lower_lr` (s_l, the lower step size) is required unless a "
      "`lower_optimizer` makes the lower step."
    )
  if lower_optimizer is not None and lower_lr is not None and prox is None:
    raise ValueError(
      "give `lower_lr` or `lower_optimizer`, not both: the "
      "transformation's own learning rate is the lower step (with a "
      "`prox`, `lower_lr` is the prox's step t)."
    )
  if lower_optimizer is not None and prox is not None and lower_lr is None:
    raise ValueError(
      "`lower_lr` is required with `prox` and `lower_optimizer`: it is "
      "the step t of prox_{t g} after the transformation's step."
    )
  if lower_lr is not None:
    validation.check_positive("lower_lr", lower_lr)
    _check_step_shape("lower_lr", lower_lr, y0)
  if key is not None:
    try:
      jax.eval_shape(jax.random.fold_in, key, 0)
    except Exception as err:
      raise TypeError(
        f"`key` must be a PRNG key (jax.random.key or PRNGKey), got {key!r}: {err}"
      ) from err
  upper_b = _as_batches("upper_batches", batches[0], steps, key, stream=1)
  lower_b = _as_batches("lower_batches", batches[1], steps, key, stream=0)
  if key is not None and upper_b.sample is None and lower_b.sample is None:
    raise ValueError(
      "`key` is only used by a sampler `lower_batches`/`upper_batches` "
      "(k, key) -> batch; pass one, or drop `key` (a batch pytree can "
      "carry its own keys)."
    )
  for name, b in (("upper_batches", upper_b), ("lower_batches", lower_b)):
    if b.sample is not None:
      try:
        jax.eval_shape(b.sample, 0, jax.random.fold_in(key, 0))
      except Exception as err:
        raise TypeError(f"`{name}` failed when called as {name}(0, key): {err}") from err

  def first(b):  # the batch of step 0 (abstract inside eval_shape)
    return b.at(0, jax.tree_util.tree_map(lambda v: v[0], b.xs), key)

  x_dyn, x_rest = variables.partition(x)
  as_x = lambda xd: variables.combine(xd, x_rest)
  validation.check_scalar_output(
    "upper_fn", lambda xd, yy: upper_fn(as_x(xd), yy, first(upper_b)), x_dyn, y0
  )
  validation.check_scalar_output(
    "lower_fn", lambda xd, yy: lower_fn(as_x(xd), yy, first(lower_b)), x_dyn, y0
  )
  if truncate is not None:
    truncate = validation.check_positive_int("truncate", truncate)
    if truncate > steps:
      raise ValueError(f"`truncate` ({truncate}) cannot exceed `steps` ({steps}).")
  if prox is not None:
    if not callable(prox):
      raise TypeError(f"`prox` must be a callable (x, y, step) -> y, got {type(prox).__name__}.")
    try:
      out = jax.eval_shape(lambda xd, yy: prox(as_x(xd), yy, lower_lr), x_dyn, y0)
    except Exception as err:  # re-raised with the argument's name
      raise TypeError(
        f"`prox` failed when called as prox(x, y0, lower_lr); it must "
        f"take (x, y, step) and return y: {err}"
      ) from err
    validation.check_same_structure("prox", y0, out, "prox(x, y0, lower_lr)")
  if lower_optimizer is not None:
    opt = _as_optimizer(lower_optimizer, x)
    try:
      jax.eval_shape(lambda yy: opt.update(yy, opt.init(yy), yy), y0)
    except Exception as err:
      raise TypeError(f"`lower_optimizer` failed on a gradient shaped like `y0`: {err}") from err
  return steps, truncate, upper_b, lower_b


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
      raise ValueError(
        f"`{name}` must be a scalar or broadcast to each leaf of `y0` "
        f"(a per-coordinate step), got shape {shape} for a leaf of "
        f"shape {jnp.shape(leaf)}."
      )


def _check_schedule_range(schedule, steps: int) -> None:
  """Checks alpha_1..alpha_K lie in [0, 1] when the schedule is concrete."""
  ks = jnp.arange(1, steps + 1)
  try:
    with jax.ensure_compile_time_eval():
      values = schedule(ks)
  except Exception as err:
    raise TypeError(f"`alpha` schedule failed on k = 1..{steps}: {err}") from err
  if jnp.shape(values) not in ((steps,), ()):
    raise ValueError(
      f"`alpha` schedule must map k (shape ({steps},)) to an "
      f"array of the same shape or a scalar, got shape {jnp.shape(values)}."
    )
  concrete = validation.concrete_value(values)
  if concrete is not None:
    concrete = np.broadcast_to(concrete, (steps,))
    bad = np.flatnonzero(~((concrete >= 0) & (concrete <= 1)))
    if bad.size:
      raise ValueError(
        f"`alpha` schedule must return values in [0, 1], got "
        f"alpha_{bad[0] + 1} = {concrete[bad[0]]}."
      )


def _diverged(lower_grad, lower_step, y0, y_final, grad_final, residual, lower_lr=None):
  """True when the lower iterations did not settle: the lower residual
  r = |d| (d = grad_y f, or the gradient mapping) did not shrink from y_0 to
  y_K (r_K >= r_0 up to sqrt(eps), r_K > 0), y moved, and f has no positive
  secant curvature between them, (grad f(y_K) - grad f(y_0))' (y_K - y_0)
  <= 0: f keeps decreasing along the path with nothing bending it back, as
  for a lower level unbounded below (f = sum(y): 0; f = -|y|^2 / 2:
  -|y_K - y_0|^2). A run that converges shrinks r; a strictly convex f has a
  positive secant curvature (so BDA settling at a compromise between F and
  f, with r_K > 0 by design, is not flagged).

  With ``lower_lr`` = s_l (plain gradient steps), a residual that did not
  shrink is also flagged when the secant curvature exceeds the stability
  limit of gradient descent, (grad f(y_K) - grad f(y_0))' (y_K - y_0) >
  2 sum_i (y_K - y_0)_i^2 / s_l,i: the secant curvature is an average of the
  Hessian along the segment, so it is <= L_f and the test implies
  s_l > 2 / L_f, where gradient descent on a quadratic blows up
  geometrically (|1 - s_l L_f| > 1). Within s_l <= 1 / L_f it never fires.
  Costs one gradient at y_0 (the status is never differentiated)."""
  grad0 = lower_grad(y0)
  residual0 = tree_ops.tree_norm(lower_step(y0, grad0))
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  moved = tree_ops.tree_sub(y_final, y0)
  secant = sum(
    jnp.vdot(gk - g0, m) for gk, g0, m in zip(leaves(grad_final), leaves(grad0), leaves(moved))
  )
  rtol = 1 - jnp.sqrt(jnp.finfo(jnp.result_type(residual)).eps)
  unstable = secant <= 0
  if lower_lr is not None:
    metric = sum(jnp.sum(jnp.broadcast_to(m**2 / lower_lr, jnp.shape(m))) for m in leaves(moved))
    unstable = unstable | (secant > 2 * metric)
  return (
    (residual >= rtol * residual0) & (residual > 0) & (tree_ops.tree_norm(moved) > 0) & unstable
  )


def solve(
  upper_fn: Objective,
  lower_fn: Objective,
  x,
  y0,
  *,
  steps: int,
  upper_lr,
  lower_lr=None,
  alpha,
  truncate: int | None = None,
  prox=None,
  checkpoint: Checkpoint = False,
  record_history: bool = False,
  unroll: int | bool = 1,
  throw: bool = False,
  lower_optimizer=None,
  lower_batches=None,
  upper_batches=None,
  upper_batch=None,
  key=None,
  smoothness=None,
) -> BDASolution:
  """Runs K aggregated lower iterations (BDA eq. 10, or eq. 13 with ``prox``).

  Args:
    upper_fn: F(x, y) -> scalar, the upper objective; F(x, y, batch) with
      ``upper_batches``.
    lower_fn: f(x, y) -> scalar, the smooth part of the lower objective;
      f(x, y, batch) with ``lower_batches``.
    x: upper variable: any pytree with floating-point leaves, e.g. an
      Equinox module (see `bilevel_jax._src.variables`).
    y0: initial lower iterate: any pytree with floating-point leaves, an
      Equinox module, or Flax NNX state (``nnx.split(model)[1]``). Only the
      floating-point leaves are iterated; integer, boolean and key leaves
      and non-array fields are carried along untouched.
    steps: K, number of lower iterations (static).
    upper_lr: s_u > 0, step on grad_y F inside the lower iterations.
    lower_lr: s_l > 0, step on grad_y f. With ``lower_optimizer`` it is not
      given (a ValueError names both), except with ``prox``, where it is the
      prox's step t.
    alpha: aggregation weight: a number in [0, 1] (``0`` is RHG) or a
      schedule ``k -> alpha_k`` from `bilevel_jax.schedules`.
    truncate: if set to M, the gradient flows only through the last M steps
      (truncated RHG/BDA); the first K - M steps are treated as constants
      (y_{K-M} and the transformation's state S_{K-M}; the part of S_0 that
      ``lower_optimizer(x)`` makes a function of x, such as an injected
      learning rate, keeps its derivative).
    prox: optional ``prox(x, y, step)`` of the nonsmooth lower part g.
    checkpoint: ``False``; ``True``/``'step'`` to rematerialize each step;
      ``'sqrt'`` or an int S to rematerialize segments of ~sqrt(K) or S steps.
    record_history: also return F(x, y_k) and f(x, y_k) for every k in info
      (on the batch of step k when batches are given).
    unroll: `lax.scan`'s unroll factor for the K steps (static). ``True``
      unrolls the whole loop: more compile time, fewer loop iterations, which
      can pay on a GPU where each iteration launches kernels. Results are the
      same up to rounding.
    throw: raise `bilevel_jax.SolverError` when ``info.status`` is not
      SUCCESS (eagerly at once, under jit when the program runs; see
      `bilevel_jax.Status`). Default False: the status is reported only.
    lower_optimizer: an `optax.GradientTransformation` T that makes the lower
      step from grad_y f (module docstring: y_{k+1} = y_k - (alpha s_u grad_y F
      + (1 - alpha) (-u_k)), (u_k, S_{k+1}) = T.update(grad_y f, S_k, y_k));
      its state is part of the unrolled carry and is differentiated through.
      Or a function ``x -> GradientTransformation`` (static), so that its
      hyperparameters can be the upper variable, e.g. ``lambda x:
      optax.inject_hyperparams(optax.sgd)(learning_rate=x["lr"])``.
      ``optax.sgd(s)`` reproduces ``lower_lr=s`` (eq. 10). To differentiate
      through Adam give ``eps_root > 0`` (``optax.adam(lr, eps_root=1e-12)``):
      with 0, a coordinate with an exactly zero gradient makes the
      derivative of sqrt(nu) infinite and the hypergradient NaN.
    lower_batches: batches for f: a pytree whose leaves have a leading axis of
      length ``steps`` (step k gets slice k), or a sampler ``(k, key_k) ->
      batch`` (static) called inside the loop for k = 0..K-1 with
      key_k = ``jax.random.fold_in(key, k)``, so the K batches are never
      materialized. A batch is any pytree (it may carry a PRNG key for
      dropout).
    upper_batches: the same for F in the d^F term; a sampler gets
      ``jax.random.fold_in(key_k, 1)``, a stream apart from the lower one.
    upper_batch: one batch for F at every step, F(x, y, upper_batch) (e.g.
      the validation minibatch of this upper step); not with
      ``upper_batches``.
    key: the PRNG key for the samplers (traced: may be vmapped over).
    smoothness: optional L_f > 0, a Lipschitz constant of grad_y f(x, .)
      that the problem supplies (may be traced). Theorem 2 assumes
      s_l <= 1 / L_f; ``info.lower_lr_exceeds_bound`` reports
      s_l > 1 / L_f. It changes nothing else.

  Returns:
    `BDASolution` with ``y`` = y_K(x), differentiable in ``x`` (and in the step
    sizes, alpha and any data the objectives close over), and ``info``. With
    batches, ``info.upper_value``, ``info.lower_value`` and ``info.residual``
    are evaluated on the last batch b_{K-1}: the residual is then the norm of a
    minibatch gradient (mapping) at y_K, a noisy estimate of stationarity that
    does not go to zero with a constant step; status is still SUCCESS or
    NONFINITE.

  Examples:
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

    Minibatch ridge regression as the lower level, with Adam and a sampler:

    >>> import optax
    >>> A = jax.random.normal(jax.random.PRNGKey(0), (100, 3))
    >>> b = A @ jnp.array([1.0, -2.0, 0.5])
    >>> def sample(k, key):                      # 10 rows drawn at step k
    ...   idx = jax.random.choice(key, 100, (10,))
    ...   return A[idx], b[idx]
    >>> f = lambda lam, w, batch: (jnp.mean((batch[0] @ w - batch[1]) ** 2)
    ...                            + lam * jnp.sum(w ** 2))
    >>> F = lambda lam, w: jnp.sum((w - jnp.array([1.0, -2.0, 0.5])) ** 2)
    >>> sol = bda.solve(F, f, 1e-3, jnp.zeros(3), steps=300, upper_lr=0.1,
    ...                 alpha=0.0, lower_optimizer=optax.adam(0.05),
    ...                 lower_batches=sample, key=jax.random.PRNGKey(1))
    >>> bool(F(1e-3, sol.y) < 1e-2)
    True
  """
  variables.check("y0", y0)
  y0_dyn, y_rest = variables.partition(y0)
  as_y = lambda yd: variables.combine(yd, y_rest)
  user_upper, user_lower, user_prox = upper_fn, lower_fn, prox
  if upper_batch is not None:
    if upper_batches is not None:
      raise ValueError(
        "pass `upper_batch` (one batch for every step) or `upper_batches` (one per step), not both."
      )
    upper_batches = _OneBatch(upper_batch)
  if upper_batches is None:
    upper_fn = lambda xx, yd, b: user_upper(xx, as_y(yd))
  else:
    upper_fn = lambda xx, yd, b: user_upper(xx, as_y(yd), b)
  if lower_batches is None:
    lower_fn = lambda xx, yd, b: user_lower(xx, as_y(yd))
  else:
    lower_fn = lambda xx, yd, b: user_lower(xx, as_y(yd), b)
  if user_prox is not None and callable(user_prox):
    prox = lambda xx, yd, s: variables.partition(user_prox(xx, as_y(yd), s))[0]
  if not callable(user_upper) or not callable(user_lower):
    upper_fn, lower_fn = user_upper, user_lower  # _validate names the bad one
  steps, truncate, upper_b, lower_b = _validate(
    upper_fn,
    lower_fn,
    x,
    y0_dyn,
    steps,
    upper_lr,
    lower_lr,
    truncate,
    prox,
    lower_optimizer,
    (upper_batches, lower_batches),
    key,
  )
  if not isinstance(throw, (bool, np.bool_)):
    raise TypeError(f"`throw` must be a bool, got {throw!r}.")
  if smoothness is not None:
    if lower_optimizer is not None:
      raise ValueError(
        "`smoothness` bounds the gradient step s_l = `lower_lr`; a "
        "`lower_optimizer` makes the lower step instead: drop `smoothness`."
      )
    validation.check_positive("smoothness", smoothness)
    if jnp.shape(smoothness) != ():
      raise ValueError(f"`smoothness` must be a scalar, got shape {jnp.shape(smoothness)}.")
  if not (
    isinstance(unroll, (bool, np.bool_)) or (isinstance(unroll, (int, np.integer)) and unroll >= 1)
  ):
    raise ValueError(f"`unroll` must be a positive int or a bool, got {unroll!r}.")
  schedule, rhg = schedules.as_schedule(alpha)
  if callable(alpha):
    _check_schedule_range(schedule, steps)

  def direction(x, y, a, s_u, s_l, batch_F, batch_f, opt, state):
    """alpha s_u grad F + (1 - alpha) d^f (d^h with a prox, -u with an
    optimizer), and the optimizer's next state."""
    if prox is None and opt is None:
      if rhg:
        return tree_ops.tree_scale(s_l, jax.grad(lower_fn, argnums=1)(x, y, batch_f)), state
      if jnp.ndim(s_u) == 0 and jnp.ndim(s_l) == 0:
        # One backward pass for both directions.
        combined = lambda yy: (
          a * s_u * upper_fn(x, yy, batch_F) + (1 - a) * s_l * lower_fn(x, yy, batch_f)
        )
        return jax.grad(combined)(y), state
      # Per-coordinate steps: scale each gradient before aggregating.
      g_F = jax.grad(upper_fn, argnums=1)(x, y, batch_F)
      g_f = jax.grad(lower_fn, argnums=1)(x, y, batch_f)
      return jax.tree_util.tree_map(
        lambda gF, gf: a * s_u * gF + (1 - a) * s_l * gf, g_F, g_f
      ), state
    g_f = jax.grad(lower_fn, argnums=1)(x, y, batch_f)
    if opt is None:
      forward = tree_ops.tree_axpy(-s_l, g_f, y)
    else:
      u, new_state = opt.update(g_f, state, y)
      state = tree_ops.tree_cast_like(new_state, state)
      forward = jax.tree_util.tree_map(jnp.add, y, u)
    if prox is None:
      d_f = jax.tree_util.tree_map(jnp.negative, u)
    else:
      d_f = tree_ops.tree_sub(y, prox(x, forward, s_l))
    if rhg:
      return d_f, state
    g_F = jax.grad(upper_fn, argnums=1)(x, y, batch_F)
    return jax.tree_util.tree_map(lambda gF, d: a * s_u * gF + (1 - a) * d, g_F, d_f), state

  def make_step(x, s_u, s_l, opt):
    def step(carry, xs):
      y, state, finite = carry
      k, xs_f, xs_F = xs
      a = schedule(k)
      batch_f = lower_b.at(k - 1, xs_f, key)
      batch_F = upper_b.at(k - 1, xs_F, key) if (record_history or not rhg) else None
      d, state = direction(x, y, a, s_u, s_l, batch_F, batch_f, opt, state)
      y_next = tree_ops.tree_cast_like(tree_ops.tree_sub(y, d), y)
      finite = jnp.logical_and(finite, tree_ops.tree_all_finite(y_next))
      if record_history:
        out = (upper_fn(x, y, batch_F), lower_fn(x, y, batch_f))
      else:
        out = None
      return (y_next, state, finite), out

    return step

  xs = (jnp.arange(1, steps + 1), lower_b.xs, upper_b.xs)
  opt = None if lower_optimizer is None else _as_optimizer(lower_optimizer, x)
  state0 = () if opt is None else opt.init(y0_dyn)
  carry = (y0_dyn, state0, jnp.asarray(True))
  if truncate is not None and truncate < steps:
    head = steps - truncate
    sg = lax.stop_gradient
    x_dyn, x_rest = variables.partition(x)
    x_const = variables.combine(sg(x_dyn), x_rest)
    opt_const = None if opt is None else _as_optimizer(lower_optimizer, x_const)
    split = lambda lo, hi: jax.tree_util.tree_map(lambda v: v[lo:hi], xs)
    carry, head_out = _scan(
      make_step(x_const, sg(upper_lr), sg(lower_lr), opt_const),
      sg(carry),
      split(0, head),
      False,
      unroll,
    )
    y_head, state_head, finite = sg(carry)
    # S_{K-M} is a constant, except for the tangent that S_0 = T.init(y0)
    # gets from x (an injected hyperparameter): value S_{K-M}, derivative dS_0.
    state_head = jax.tree_util.tree_map(
      lambda h, i: h + (i - sg(i)) if variables.is_differentiable(i) else h, state_head, state0
    )
    carry, tail_out = _scan(
      make_step(x, upper_lr, lower_lr, opt),
      (y_head, state_head, finite),
      split(head, steps),
      checkpoint,
      unroll,
    )
    history = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), head_out, tail_out)
  else:
    carry, history = _scan(make_step(x, upper_lr, lower_lr, opt), carry, xs, checkpoint, unroll)
  y_final, _, finite = carry

  batch_F, batch_f = upper_b.last(steps, key), lower_b.last(steps, key)
  lower_grad = lambda y: jax.grad(lower_fn, argnums=1)(x, y, batch_f)

  def lower_step(y, g_f):
    """grad_y f, or the gradient mapping (y - prox(y - s_l grad_y f)) / s_l."""
    if prox is None:
      return g_f
    moved = prox(x, tree_ops.tree_axpy(-lower_lr, g_f, y), lower_lr)
    return tree_ops.tree_scale(1 / lower_lr, tree_ops.tree_sub(y, moved))

  grad_final = lower_grad(y_final)
  residual = tree_ops.tree_norm(lower_step(y_final, grad_final))
  upper_value, lower_value = upper_fn(x, y_final, batch_F), lower_fn(x, y_final, batch_f)
  finite = finite & jnp.isfinite(upper_value) & jnp.isfinite(lower_value) & jnp.isfinite(residual)
  status = jnp.where(finite, status_lib.SUCCESS, status_lib.NONFINITE)
  if steps >= 2:  # on the last batch at y_0 and y_K alike
    status = jnp.where(
      (status == status_lib.SUCCESS)
      & _diverged(
        lower_grad,
        lower_step,
        y0_dyn,
        y_final,
        grad_final,
        residual,
        lower_lr if opt is None else None,
      ),
      status_lib.DIVERGED,
      status,
    )
  valid = validation.is_positive(upper_lr) & validation.in_unit_interval(schedule(xs[0]))
  if lower_lr is not None:
    valid = valid & validation.is_positive(lower_lr)
  status = status_lib.unless_invalid(valid, status)
  exceeds = None
  if smoothness is not None and opt is None:
    exceeds = jnp.any(jnp.asarray(lower_lr) * jnp.asarray(smoothness) > 1)
  info = BDAInfo(
    num_steps=jnp.asarray(steps, jnp.int32),
    status=status,
    residual=residual,
    upper_value=upper_value,
    lower_value=lower_value,
    upper_history=history[0] if record_history else None,
    lower_history=history[1] if record_history else None,
    lower_lr_exceeds_bound=exceeds,
  )
  status_lib.raise_if_failed(status, throw=throw, where="bda.solve")
  return BDASolution(y=as_y(y_final), info=info)


def hypergradient(
  upper_fn: Objective,
  lower_fn: Objective,
  x,
  y0,
  *,
  return_info: bool = False,
  throw: bool = False,
  **kwargs,
):
  """phi_K(x) = F(x, y_K(x)) and its gradient in x by reverse mode (eq. 9).

  Takes the keyword arguments of `solve`. Returns ``(value, grad)``, or
  ``(value, grad, solution)`` with ``return_info=True``; ``grad`` has the
  structure of ``x`` (``None`` at leaves that are not floating point, as
  `equinox.filter_grad` returns). ``throw``: as in `solve`.

  Examples:
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
  status = jnp.where(
    (status == status_lib.SUCCESS) & ~tree_ops.tree_all_finite(grad), status_lib.NONFINITE, status
  ).astype(jnp.int32)
  solution = solution._replace(info=solution.info._replace(status=status))
  status_lib.raise_if_failed(solution.info.status, throw=throw, where="bda.hypergradient")
  if return_info:
    return value, grad, solution
  return value, grad


def make_hypergradient(upper_fn: Objective, lower_fn: Objective, *, jit: bool = True, **kwargs):
  """Builds ``fn(x, y0) -> (value, grad, solution)`` for `bilevel_jax.upper.optimize`.

  ``solution.info.status`` tells the driver whether the lower iterations
  stayed finite. The driver passes the same y0 every time, or y_K of the
  previous upper step with ``warm_start=True``. ``kwargs`` are those of
  `solve`; the builder is `bilevel_jax._src.hypergradient.make`. Per-call
  data (``lower_batches``, ``upper_batch``, ``key``) may also be passed to
  ``fn`` as keywords, new at every upper step.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from bilevel_jax import bda, schedules, upper
    >>> F = lambda x, y: 0.5 * (x - y[1]) ** 2 + 0.5 * (y[0] - 1.0) ** 2
    >>> f = lambda x, y: 0.5 * y[0] ** 2 - x * y[0]
    >>> hg = bda.make_hypergradient(F, f, steps=64, upper_lr=0.7, lower_lr=0.2,
    ...                             alpha=schedules.harmonic(0.9))
    >>> value, grad, sol = hg(0.5, jnp.array([2.0, 2.0]))
    >>> int(sol.info.status), sol.y.shape
    (0, (2,))
    >>> result = upper.optimize(hg, 0.0, optax.sgd(0.5), steps=100, y0=jnp.array([2.0, 2.0]))
    >>> round(float(result.x), 1)      # x* = 1 (Example 1 of the BDA paper)
    1.0
  """
  return hypergradient_lib.make(hypergradient, upper_fn, lower_fn, jit=jit, **kwargs)
