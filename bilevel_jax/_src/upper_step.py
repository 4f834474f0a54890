"""One upper step the user owns: ``init`` and ``step``, pure and jit-able, in Optax's style.

    stepper = upper.make_step(hypergradient_fn, optimizer)
    state = stepper.init(x0, y0)
    for t in range(T):                                  # the user's own loop
      state, info = step(state, **data_t)               # step = jax.jit(stepper.step)

One step is

    value, g, solution = hypergradient_fn(x, y0, **data)
    updates, opt_state = optimizer.update(g, opt_state, x)
    x = P_X(x + updates),

where ``data`` is whatever this step's hypergradient takes as keywords: the
upper batch, the lower batches or their sampler's key (``bda``'s
``upper_batches=``, ``lower_batches=``, ``key=``), new at every step without
recompiling as long as their shapes stay the same. ``y0`` is the state's
lower start: the initial one, or with ``warm_start=True`` the last lower
solution. With ``warm_start_adjoint=True`` the step also passes the last
adjoint v of hess_yy f v = grad_y F (``solution.adjoint``, zeros before the
first step) as ``hypergradient_fn(x, y0, v0=v, **data)``, so that the
adjoint solve starts close too (`bilevel_jax.implicit.hypergradient`). With
``extrapolate=p`` the next starts are the polynomial extrapolations of the
last p + 1 solutions s (y, and v): 2 s_t - s_{t-1} for p = 1,
3 s_t - 3 s_{t-1} + s_{t-2} for p = 2, predictions of y*(x_{t+1}) when
consecutive upper steps are alike.

The state is a pytree (`UpperState`), so the step composes with `jax.jit`,
`jax.vmap` (many tasks, each with its own x and optimizer state) and
`bilevel_jax.sharding`; the info (`UpperStepInfo`) carries the value, the
hypergradient's norm, the lower solve's status and residual, and the step's
own status: NONFINITE when the value or the hypergradient is not finite,
INNER_FAILED when the lower solve did not succeed, SUCCESS otherwise.
`upper.optimize` is a loop over this step that adds history, checkpoints,
logging and a data source.

For an Equinox module as x, whose non-array leaves (activation functions)
jax.jit cannot take, jit the step with ``equinox.filter_jit``.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import variables


class UpperState(NamedTuple):
  """What one upper step carries to the next.

  Attributes:
    x: the upper variable.
    opt_state: the Optax state of its floating-point leaves.
    y0: the lower start of the next step (None without a lower variable).
    y: the lower solution of the last step (``y0`` before the first).
    step: upper steps taken (int32).
    v0: with ``warm_start_adjoint=True``, the start of the next adjoint
      solve (zeros like the floating-point leaves of y0 before the first
      step); None otherwise.
    adjoint: with ``warm_start_adjoint=True``, the adjoint v of the last
      step (``v0`` before the first); None otherwise.
    history: with ``extrapolate=p``, ``(ys, vs)``: the p solutions (and
      adjoints) before ``y`` (and ``adjoint``), newest first; None otherwise.
  """

  x: Any
  opt_state: Any
  y0: Any
  y: Any
  step: Any
  v0: Any = None
  adjoint: Any = None
  history: Any = None


class UpperStepInfo(NamedTuple):
  """Diagnostics of one upper step (arrays).

  Attributes:
    value: phi(x) before the step.
    grad_norm: ||grad phi(x)||.
    lower_status: the lower solve's status (SUCCESS when the hypergradient
      reports none).
    lower_residual: the lower solve's residual (NaN when it reports none).
    status: NONFINITE, INNER_FAILED or SUCCESS (`bilevel_jax.Status`).
    metrics: ``metrics_fn(x, y)`` (an empty dict without one).
  """

  value: Any
  grad_norm: Any
  lower_status: Any
  lower_residual: Any
  status: Any
  metrics: Any


class UpperStep(NamedTuple):
  """``init(x0, y0=None) -> UpperState`` and ``step(state, **data) ->
  (UpperState, UpperStepInfo)``, both pure."""

  init: Callable
  step: Callable


def unpack(out, with_y: bool):
  """(value, grad, y, lower status or None, lower residual or None) of a
  hypergradient function's output ``(value, grad[, solution or y])``."""
  if hasattr(out, "_fields"):
    raise TypeError(
      "`hypergradient_fn` must return a plain tuple (value, grad) or "
      f"(value, grad, solution), got a {type(out).__name__} NamedTuple; "
      "pass a method's `make_hypergradient(...)`, not its `solve`."
    )
  if not isinstance(out, tuple) or len(out) not in (2, 3):
    raise TypeError(
      "`hypergradient_fn` must return (value, grad) or (value, grad, "
      f"solution), got {type(out).__name__} of length "
      f"{len(out) if isinstance(out, tuple) else '-'}."
    )
  if len(out) == 2:
    if with_y:
      raise TypeError(
        "with `y0`, `hypergradient_fn(x, y0)` must return (value, grad, "
        "solution) or (value, grad, y)."
      )
    return out[0], out[1], None, None, None
  value, grad, third = out
  info = getattr(third, "info", None)
  if info is not None and hasattr(info, "status"):
    return value, grad, getattr(third, "y", None), info.status, getattr(info, "residual", None)
  return value, grad, third, None, None


def canonical(tree):
  """Float leaves as JAX arrays of the default dtype (a Python float becomes
  float32 or float64 by ``jax_enable_x64``), not weakly typed: as they are
  after one step, so that the step is traced once."""

  def strong(v):
    v = jnp.asarray(v)
    return jnp.asarray(v, dtype=v.dtype)

  return jax.tree_util.tree_map(lambda v: strong(v) if variables.is_differentiable(v) else v, tree)


# Degree d through s_t, ..., s_{t-d} at equal spacing: (-1)^j C(d + 1, j + 1).
_EXTRAPOLATION_WEIGHTS = {1: (2.0, -1.0), 2: (3.0, -3.0, 1.0)}


def extrapolated(new, older, step_count, degree: int):
  """The start of the next solve: ``new`` (this step's solution s_t) for
  ``degree`` 0, else the polynomial extrapolation of degree
  min(degree, step_count) through s_t and the ``older`` solutions s_{t-1},
  s_{t-2}, ... (a tuple, newest first; entries beyond ``step_count`` are
  ignored), on the floating-point leaves: 2 s_t - s_{t-1}, or
  3 s_t - 3 s_{t-1} + s_{t-2}."""
  if not degree:
    return new

  def leaf(n, *olds):
    if not variables.is_differentiable(n):
      return n
    out = n
    for d in range(1, degree + 1):
      w = _EXTRAPOLATION_WEIGHTS[d]
      guess = w[0] * n + sum(c * o for c, o in zip(w[1:], olds[:d]))
      out = jnp.where(step_count >= d, guess, out)
    return out.astype(jnp.result_type(n))

  return jax.tree_util.tree_map(leaf, new, *older)


def make_step(
  hypergradient_fn: Callable,
  optimizer: optax.GradientTransformation,
  *,
  projection: Callable | None = None,
  warm_start: bool = False,
  metrics_fn: Callable | None = None,
  warm_start_adjoint: bool = False,
  extrapolate: int = 0,
) -> UpperStep:
  """One upper step as ``init`` and ``step`` pure functions, for a loop you own.

  Args:
    hypergradient_fn: ``fn(x, y0, **data) -> (value, grad, solution)`` (a
      method's ``make_hypergradient(..., jit=False)``: ``solution.y`` is the
      lower solution, ``solution.info.status`` its status), or ``(value,
      grad, y)``; without a lower variable, ``fn(x, **data) -> (value,
      grad)``.
    optimizer: any `optax.GradientTransformation` on the floating-point
      leaves of x.
    projection: ``P_X(x) -> x`` after each update (`bilevel_jax.projections`).
    warm_start: start each lower solve from the previous lower solution.
    metrics_fn: ``fn(x, y) -> dict of scalars``, computed inside the step
      into ``info.metrics``.
    warm_start_adjoint: start each adjoint solve from the previous
      adjoint: the step calls ``hypergradient_fn(x, y0, v0=v, **data)``
      with v the previous ``solution.adjoint`` (zeros at the first step),
      as `bilevel_jax.implicit.make_hypergradient` takes and returns it.
      The gradient is as accurate (CG stops at the same relative residual);
      only the adjoint iterations drop when x moves little.
    extrapolate: p = 0 (off), 1 or 2: with the warm starts above, start
      the next lower (and adjoint) solve from the extrapolation of degree p
      through the last p + 1 solutions instead of the last one s_t:
      2 s_t - s_{t-1} (p = 1) or 3 s_t - 3 s_{t-1} + s_{t-2} (p = 2), of
      lower degree while fewer solutions exist. For upper steps alike from
      one to the next (Adam, momentum, small learning rates) the solution
      path s(x_t) is smooth in t and these predict s(x_{t+1}) to
      O(|dx|^{p+1}) (plus the solves' tolerances). Only the starting point
      changes: the solves stop at the same tolerances.

  Returns:
    `UpperStep` ``(init, step)``: ``init(x0, y0=None)`` and
    ``step(state, **data) -> (state, info)``; ``data`` goes to
    ``hypergradient_fn`` as keywords.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from bilevel_jax import implicit, upper
    >>> f = lambda lam, y, target: 0.5 * jnp.sum((y - target) ** 2) + 0.5 * lam * jnp.sum(y ** 2)
    >>> F = lambda lam, y: 0.5 * jnp.sum((y - 0.25) ** 2)
    >>> def hg(lam, y0, target):   # a new lower target ("batch") every step
    ...   return implicit.hypergradient(F, lambda l, y: f(l, y, target), lam, y0,
    ...                                 return_info=True, solver="newton")
    >>> stepper = upper.make_step(hg, optax.sgd(20.0))
    >>> step = jax.jit(stepper.step)
    >>> state = stepper.init(1.0, jnp.zeros(2))
    >>> for t in range(200):
    ...   state, info = step(state, target=jnp.ones(2))
    >>> round(float(state.x), 3), int(info.status), int(state.step)
    (3.0, 0, 200)
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  for name, fn in (
    ("hypergradient_fn", hypergradient_fn),
    ("projection", projection),
    ("metrics_fn", metrics_fn),
  ):
    if fn is not None and not callable(fn):
      raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")
  for name, flag in (("warm_start", warm_start), ("warm_start_adjoint", warm_start_adjoint)):
    if not isinstance(flag, bool):
      raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
  if (
    not isinstance(extrapolate, int)
    or isinstance(extrapolate, bool)
    or extrapolate not in (0, 1, 2)
  ):
    raise ValueError(f"`extrapolate` must be 0, 1 or 2, got {extrapolate!r}.")
  if extrapolate and not (warm_start or warm_start_adjoint):
    raise ValueError("`extrapolate` needs `warm_start=True` or `warm_start_adjoint=True`.")

  def init(x0, y0=None) -> UpperState:
    variables.check("x0", x0)
    x0 = canonical(x0)
    if y0 is not None:
      y0 = variables.arrays_as_jax(y0)  # an Equinox module's functions stay
    elif warm_start or warm_start_adjoint:
      flag = "warm_start" if warm_start else "warm_start_adjoint"
      raise ValueError(f"`{flag}=True` needs `y0` in `init(x0, y0)`.")
    opt_state = optimizer.init(variables.partition(x0)[0])
    adjoint = None
    if warm_start_adjoint:
      adjoint = jax.tree_util.tree_map(jnp.zeros_like, canonical(variables.partition(y0)[0]))
    history = None
    if extrapolate:
      history = ((y0,) * extrapolate, None if adjoint is None else (adjoint,) * extrapolate)
    return UpperState(
      x=x0,
      opt_state=opt_state,
      y0=y0,
      y=y0,
      step=jnp.zeros((), jnp.int32),
      v0=adjoint,
      adjoint=adjoint,
      history=history,
    )

  def next_start(new, older, step_count):
    return extrapolated(new, older, step_count, extrapolate)

  def shift(history, last):
    """The p solutions before the next step's: ``last`` first."""
    return None if history is None else (last,) + history[:-1]

  def step(state: UpperState, **data):
    with_y = state.y0 is not None
    x_dyn, x_rest = variables.partition(state.x)
    as_x = lambda xd: variables.combine(xd, x_rest)
    if warm_start_adjoint:
      if state.v0 is None or state.adjoint is None:
        raise ValueError(
          "`warm_start_adjoint=True` needs the state of this stepper's `init` (no adjoint in it)."
        )
      data = {**data, "v0": state.v0}
    out = (
      hypergradient_fn(state.x, state.y0, **data) if with_y else hypergradient_fn(state.x, **data)
    )
    value, grad, y_next, lower_status, lower_residual = unpack(out, with_y)
    adjoint_next = None
    if warm_start_adjoint:
      adjoint_next = getattr(out[2], "adjoint", None)
      if adjoint_next is None:
        raise TypeError(
          "`warm_start_adjoint=True` needs a `hypergradient_fn` that takes `v0=` and returns "
          "its adjoint as `solution.adjoint` (implicit.make_hypergradient does)."
        )
      adjoint_next = tree_ops.tree_cast_like(adjoint_next, state.adjoint)
    updates, opt_state = optimizer.update(grad, state.opt_state, x_dyn)
    x_new = optax.apply_updates(x_dyn, updates)
    if projection is not None:
      x_new = variables.partition(projection(as_x(x_new)))[0]
    x_new = tree_ops.tree_cast_like(x_new, x_dyn)
    finite = tree_ops.tree_all_finite((value, grad))
    lower_ok = True if lower_status is None else lower_status == status_lib.SUCCESS
    status = jnp.where(
      ~finite,
      status_lib.NONFINITE,
      jnp.where(lower_ok, status_lib.SUCCESS, status_lib.INNER_FAILED),
    )
    metrics = {} if metrics_fn is None else dict(metrics_fn(state.x, y_next))
    info = UpperStepInfo(
      value=value,
      grad_norm=tree_ops.tree_norm(grad),
      lower_status=(
        jnp.asarray(status_lib.SUCCESS, jnp.int32)
        if lower_status is None
        else jnp.asarray(lower_status, jnp.int32)
      ),
      lower_residual=(
        jnp.asarray(jnp.nan, jnp.result_type(value)) if lower_residual is None else lower_residual
      ),
      status=status.astype(jnp.int32),
      metrics=metrics,
    )
    ys, vs = state.history if extrapolate else (None, None)
    y_older = shift(ys, state.y)
    v_older = shift(vs, state.adjoint)
    y0_next = next_start(y_next, y_older, state.step) if (warm_start and with_y) else state.y0
    v0_next = None if adjoint_next is None else next_start(adjoint_next, v_older, state.step)
    new_state = UpperState(
      x=as_x(x_new),
      opt_state=opt_state,
      y0=y0_next,
      y=y_next if with_y else None,
      step=state.step + 1,
      v0=v0_next,
      adjoint=adjoint_next,
      history=(y_older, v_older) if extrapolate else None,
    )
    return new_state, info

  return UpperStep(init=init, step=step)
