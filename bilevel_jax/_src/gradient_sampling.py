"""Gradient sampling with evolving regularization (Solla & Royset, Section 5).

`gradient_sampling` is Algorithm 1 and `sqp_gradient_sampling` Algorithm 2, as
written in the paper, each one `jax.lax.while_loop`: the whole run compiles
once, and many instances (random restarts, data sets) run in one vmapped call.

The objective is handed over as ``fun(x, alpha, beta)``, the regularized
hyper-objective f(x, Y_{alpha,beta}(x)), differentiable in x (for example
through `bilevel_jax.composite.solve`).  Gradients at the N_sam sampled points
are one vmapped `jax.value_and_grad` call.  Choices the paper leaves open are
documented on each argument.

Inner solves.  ``fun`` may return the value alone, or ``(value, aux)``; when
``aux`` is a solution (it has ``aux.info.status``, as a `composite.solve`
result does) its status is the status of the inner solve at that point.
The minimum-norm element of Algorithm 1 (`minnorm.min_norm_hull`) and the
subproblem (5.5) of Algorithm 2 (`minnorm.sqp_direction`) are inner solves
too.  Each iteration records the first failed inner status among its calls
(``info.history.inner_status``); ``info.inner_status`` is the first of the
run, ``info.inner_failures`` the number of iterations (and final evaluation)
with one, and ``info.status`` is INNER_FAILED when the stopping rule was met
but an inner solve failed on the way (`bilevel_jax.Status`).

Warm starts: with ``state0``, ``fun(x, alpha, beta, state) -> (value,
state)`` carries a state (typically the lower-level solution) from call to
call.  f at the iterate is evaluated from the state of the last accepted
point (after a move that is the solution there, so the solve is nearly
free); the sampled points and the line-search trials start from the
iterate's state.  The state is never differentiated, and a state that comes
back with a non-finite value is dropped.  The state may itself be a
solution (``fun`` returns ``(value, solution)`` and starts its solve from
``state.y``): its ``info.status`` is then read as above, and its ``info``
is not checked for finiteness.

Compile time.  fun's forward program is traced once into the compiled
loop, plus once with its gradient for the samples: f at the next iterate
(which the next iteration needs first, and which after the last iteration
is the solution's value) is the last pass of the line search's
`jax.lax.while_loop`, and f at x0 the loop's first pass.  The sequence of
evaluations is that of the algorithm as written (f at the iterate, the
samples, the trials).
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import minnorm
from bilevel_jax._src import sampling
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation
from bilevel_jax._src import variables

BATCHINGS = ("vmap", "map")


def _named_tuple(name: str, doc: str, *groups):
  """A NamedTuple class from groups of field names (the two algorithms share
  most of their fields; each adds its own)."""
  cls = NamedTuple(name, [(field, Any) for group in groups for field in group])  # type: ignore[misc]
  cls.__doc__ = doc
  cls.__module__ = __name__
  return cls


_HISTORY = ("value", "stationarity", "eps", "alpha", "step")
_INFO = ("num_steps", "status", "stationarity", "eps", "alpha", "beta")
_COUNTS = ("target_hits", "linesearch_failures", "inner_status", "inner_failures", "history")

GradientSamplingHistory = _named_tuple(
  "GradientSamplingHistory",
  """\
Per-iteration arrays of Algorithm 1 (length max_steps; NaN, and -1 for
inner_status, past the last iteration).

Attributes:
  value: f(x^nu) at the iterate.
  stationarity: |w^nu|.
  eps, alpha: sampling radius and Moreau parameter of the iteration.
  step: the accepted step t (0 for a target hit or a null step).
  inner_status: the first failed inner status of the iteration (SUCCESS if
    none; see GradientSamplingInfo.inner_status).
""",
  _HISTORY,
  ("inner_status",),
)

SQPGradientSamplingHistory = _named_tuple(
  "SQPGradientSamplingHistory",
  """\
Per-iteration arrays of Algorithm 2, as `GradientSamplingHistory` with
stationarity = Delta q and infeasibility = sum_k max(c_k(x^nu), 0).
""",
  _HISTORY,
  ("infeasibility", "inner_status"),
)

GradientSamplingInfo = _named_tuple(
  "GradientSamplingInfo",
  """\
Diagnostics of `gradient_sampling` (Algorithm 1); all arrays.

Attributes:
  num_steps: iterations nu taken.
  status: a `bilevel_jax.Status` code: SUCCESS (the stopping rule was met),
    MAX_STEPS, NONFINITE (a non-finite value or gradient at the iterate),
    INNER_FAILED (the stopping rule was met, but an inner solve failed on
    the way; see inner_status), or INVALID_INPUT (a traced parameter out of
    range: eps0, alpha0, beta0, eta0 (rho0, theta0, eta) not > 0, or mu_*,
    delta, gamma not in (0, 1) (mu_eps of Algorithm 1: not in (0, 1]); no
    iteration is run).
  stationarity: |w^nu| at the end.
  eps, alpha, beta: sampling radius and regularization at the end.
  eta: stationarity target at the end.
  target_hits: iterations in Lambda (|w^nu| <= eta: eps, alpha, beta, eta
    shrink).
  linesearch_failures: iterations where no step in {1, gamma, ...} up to
    max_backtracks decreased f enough (null steps: x unchanged).
  inner_status: the first non-SUCCESS status of an inner solve (fun's
    solution at the iterate, a sample or a line-search trial, the min-norm
    QP, the final evaluation), SUCCESS if none.
  inner_failures: iterations (and the final evaluation) with a failed inner
    solve.
  history: `GradientSamplingHistory`.
""",
  _INFO,
  ("eta",),
  _COUNTS,
)

SQPGradientSamplingInfo = _named_tuple(
  "SQPGradientSamplingInfo",
  """\
Diagnostics of `sqp_gradient_sampling` (Algorithm 2); all arrays.

As `GradientSamplingInfo`, with stationarity = Delta q, the penalty weight
``rho`` and the infeasibility threshold ``theta`` at the end in place of eta,
the subproblem (5.5) among the inner solves, and history a
`SQPGradientSamplingHistory`.
""",
  _INFO,
  ("rho", "theta"),
  _COUNTS,
)


class GradientSamplingSolution(NamedTuple):
  """x at the end, f(x, Y_{alpha,beta}(x)) there (final alpha, beta), info."""

  x: Any
  value: Any
  info: Any


class _Alg1(NamedTuple):
  eta: Any


class _Alg2(NamedTuple):
  rho: Any
  theta: Any


class _Loop(NamedTuple):
  """The while-loop state of both algorithms (``params``: _Alg1 or _Alg2)."""

  x: Any
  state: Any  # fun's state at x, alpha, beta (warm starts), () without state0
  key: Any
  k: Any
  status: Any  # < 0 while running
  eps: Any
  alpha: Any
  beta: Any
  params: Any
  stationarity: Any
  hits: Any
  failures: Any
  inner_status: Any
  inner_failures: Any
  history: Any
  fx: Any  # f at x, alpha, beta (evaluated at the end of the previous iteration)
  center_status: Any  # the inner status of that evaluation
  have_center: Any  # False before the first pass, which evaluates f at x0 only


# ------------------------------------------------------------------ pieces


def _first_of(statuses):
  """The first non-SUCCESS code of an array of statuses, SUCCESS if none."""
  failed = statuses != status_lib.SUCCESS
  return jnp.where(
    jnp.any(failed), statuses.ravel()[jnp.argmax(failed.ravel())], status_lib.SUCCESS
  ).astype(jnp.int32)


def _status_of(aux):
  """``aux.info.status`` when aux is a solution, else SUCCESS."""
  info = getattr(aux, "info", None)
  if info is not None and hasattr(info, "status"):
    return jnp.asarray(info.status, jnp.int32)
  return jnp.asarray(status_lib.SUCCESS, jnp.int32)


def _all_finite(value, state):
  """value and the floating leaves of state are finite (a solution's info,
  whose fields may be NaN by design, is not checked)."""
  if hasattr(state, "info") and hasattr(state, "_replace"):
    state = state._replace(info=None)
  return jnp.isfinite(value) & tree_ops.tree_all_finite(state)


def _wrap(fun, unravel, stateful: bool):
  """fun as f(x_flat, alpha, beta, state) -> (value, (state, inner status))."""
  if not stateful:

    def f(xf, a, b, st):
      out = fun(unravel(xf), a, b)
      if isinstance(out, tuple):
        if len(out) != 2:
          raise TypeError(
            "`fun(x, alpha, beta)` must return a value or (value, aux), "
            f"got a tuple of length {len(out)}."
          )
        return out[0], (st, _status_of(out[1]))
      return out, (st, _status_of(None))

    return f

  def f(xf, a, b, st):  # type: ignore[no-redef]
    out = fun(unravel(xf), a, b, st)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(
        "with `state0`, `fun(x, alpha, beta, state)` must return (value, "
        f"state), got {type(out).__name__}."
      )
    value, new = out
    keep = _all_finite(value, new)
    return value, (
      jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new, st),
      _status_of(new),
    )

  return f


def _batched_value_and_grad(f, batching):
  """(values, grads, first failed inner status) of f(., alpha, beta, state)
  at each row of points, all started from the same state: one vmapped call,
  or one after another in a `lax.map` (on a CPU, where a vmapped solve runs
  every lane until the slowest converges, the sequential map costs the sum
  of the lanes' work instead of N_sam times the worst)."""
  vg = jax.value_and_grad(f, has_aux=True)

  def call(points, a, b, st):
    if batching == "vmap":
      (values, (_, statuses)), grads = jax.vmap(vg, in_axes=(0, None, None, None))(points, a, b, st)
    else:
      (values, (_, statuses)), grads = jax.lax.map(lambda pt: vg(pt, a, b, st), points)
    return values, grads, _first_of(statuses)

  return call


def _search_then_evaluate(f, merit, x, fx, state, d, decrease, gamma, max_backtracks, active, ab):
  """The Armijo line search of an iteration, then f at the next iterate; one
  `jax.lax.while_loop` whose body calls f once, so that f's forward program
  is traced once for both.

  Where ``active``, trial j evaluates f(x + t d) at the iterate's (alpha,
  beta) from ``state`` (the iterate's), t in {1, gamma, gamma^2, ...}, until
  ``merit(value, point) < fx - t decrease`` or ``max_backtracks`` trials.
  The last pass evaluates f at the next iterate (x + t d after an accepted
  trial, from its state; x otherwise, from ``state``) at the next (alpha,
  beta): the value the next iteration needs at its start, and the run's
  final value.  ``f(point, alpha, beta, state) -> (value, (state,
  status))``; ``ab = ((alpha, beta), (alpha_next, beta_next))``.

  Returns (t, ok, first failed inner status of the trials, next x, f there,
  its state, its inner status)."""
  (alpha, beta), (alpha_next, beta_next) = ab
  success = jnp.asarray(status_lib.SUCCESS, jnp.int32)

  def cond(c):
    return ~c[-1]

  def body(c):
    j, t, ok, trial_state, inner, value_next, state_next, status_next, _ = c
    trial = active & (~ok) & (j < max_backtracks)
    point = jnp.where(trial | ok, x + t * d, x)
    start = jax.tree_util.tree_map(lambda a, b: jnp.where(ok & ~trial, a, b), trial_state, state)
    value, (new_state, status) = f(
      point,
      jnp.where(trial, alpha, alpha_next),
      jnp.where(trial, beta, beta_next),
      start,
    )
    accepted = trial & (merit(value, point) < fx - t * decrease)
    when = lambda flag: lambda n, o: jnp.where(flag, n, o)
    return (
      j + trial.astype(jnp.int32),
      jnp.where(trial & ~accepted, gamma * t, t),
      ok | accepted,
      jax.tree_util.tree_map(when(trial), new_state, trial_state),
      jnp.where(trial, status_lib.first_failure(inner, status), inner),
      jnp.where(trial, value_next, value),
      jax.tree_util.tree_map(when(trial), state_next, new_state),
      jnp.where(trial, status_next, status),
      ~trial,
    )

  one = jnp.ones((), x.dtype)
  init = (
    jnp.array(0, jnp.int32),
    one,
    jnp.array(False),
    state,
    success,
    fx,
    state,
    success,
    jnp.array(False),
  )
  _, t, ok, _, inner, value_next, state_next, status_next, _ = jax.lax.while_loop(cond, body, init)
  x_next = jnp.where(ok, x + t * d, x)
  return t, ok, inner, x_next, value_next, state_next, status_next


class _Setup(NamedTuple):
  flat0: Any
  unravel: Any
  f: Any
  state0: Any
  value_and_grad: Any
  valid: Any  # the run-time check of the (possibly traced) parameters
  value: Any  # jax.ShapeDtypeStruct of fun's value


def _setup(
  fun,
  x0,
  key,
  state0,
  num_samples,
  gamma,
  delta,
  max_steps,
  mus,
  positives,
  batching,
  alpha0,
  beta0,
  closed=(),
) -> _Setup:
  """Checks the arguments shared by both algorithms; wraps fun.  ``mus``
  (and gamma, delta) must lie in (0, 1), those named in ``closed`` in
  (0, 1] (mu_eps = 1 of Theorem 5.7)."""
  if not callable(fun):
    raise TypeError(f"`fun` must be callable, got {type(fun).__name__}.")
  validation.check_prng_key("key", key)
  variables.check("x0", x0)
  if variables.has_rest(x0):
    raise TypeError(
      "`x0` must hold floating-point arrays only (the variables that gradient sampling moves)."
    )
  flat0, unravel = ravel_pytree(x0)
  n = flat0.shape[0]
  validation.check_positive_int("num_samples", num_samples)
  validation.check_one_of("batching", batching, BATCHINGS)
  validation.check_positive_int("max_steps", max_steps)
  if num_samples < n + 1:
    raise ValueError(
      f"`num_samples` must be >= n + 1 = {n + 1} (Algorithm 1 and 2 "
      f"require N_sam >= n + 1), got {num_samples}."
    )
  valid = jnp.array(True)
  for name, value in (("gamma", gamma), ("delta", delta)) + tuple(mus.items()):
    one = name in closed
    concrete = validation.concrete_value(value)
    if concrete is not None and not (0 < float(concrete) < 1 or (one and float(concrete) == 1)):
      raise ValueError(f"`{name}` must lie in {'(0, 1]' if one else '(0, 1)'}, got {value!r}.")
    below = (jnp.asarray(value) <= 1) if one else (jnp.asarray(value) < 1)
    valid = valid & (jnp.asarray(value) > 0) & below
  for name, value in positives.items():
    validation.check_positive(name, value)
    valid = valid & validation.is_positive(value)
  f = _wrap(fun, unravel, state0 is not None)
  st0 = () if state0 is None else state0
  dtype = flat0.dtype
  call = (
    ("as fun(x0, alpha0, beta0, state0)" if state0 is not None else "as fun(x0, alpha0, beta0)")
    + "; does it take (x, alpha, beta"
    + (", state)" if state0 is not None else ")")
    + " and accept `x0`?"
  )
  value = validation.check_scalar_output(
    "fun",
    lambda xf: f(xf, jnp.asarray(alpha0, dtype), jnp.asarray(beta0, dtype), st0)[0],
    flat0,
    call=call,
  )
  return _Setup(flat0, unravel, f, st0, _batched_value_and_grad(f, batching), valid, value)


def _sampled_grads(setup, running, points, alpha, beta, state):
  """The hypergradients at the sampled points, all started from ``state``,
  and their first failed inner status; skipped (zeros, SUCCESS) in the
  loop's first pass, which only evaluates f at x0."""

  def sample():
    _, grads, status = setup.value_and_grad(points, alpha, beta, state)
    return grads, status

  def skip():
    return jnp.zeros_like(points), jnp.asarray(status_lib.SUCCESS, jnp.int32)

  return jax.lax.cond(running, sample, skip)


def _advance(
  s,
  *,
  key,
  evaluated,
  shrink,
  mu_eps,
  alpha,
  beta,
  status,
  stationarity,
  null_step,
  params,
  inner,
  history,
) -> _Loop:
  """The next loop state, shared by both algorithms; ``evaluated`` is what
  `_search_then_evaluate` returns after (t, ok, inner): the next x, f
  there, its state and its inner status."""
  x_next, fx_next, state_next, status_next = evaluated
  return _Loop(
    x=x_next,
    state=state_next,
    key=key,
    k=s.k + 1,
    status=status,
    eps=jnp.where(shrink, mu_eps * s.eps, s.eps),
    alpha=alpha,
    beta=beta,
    params=params,
    stationarity=stationarity,
    hits=s.hits + shrink.astype(jnp.int32),
    failures=s.failures + null_step.astype(jnp.int32),
    inner_status=status_lib.first_failure(s.inner_status, inner),
    inner_failures=s.inner_failures + (inner != status_lib.SUCCESS).astype(jnp.int32),
    history=history,
    fx=fx_next,
    center_status=status_next,
    have_center=s.have_center,
  )


def _record(history, k, **values):
  """Writes this iteration's values into the per-iteration history arrays
  (nothing where k is out of range: the loop's last pass)."""
  return history._replace(
    **{name: getattr(history, name).at[k].set(value, mode="drop") for name, value in values.items()}
  )


def _run(
  setup, body, *, key, eps0, alpha0, beta0, params, history_cls, info_cls, max_steps, where, throw
) -> GradientSamplingSolution:
  """The while loop of either algorithm from its first state, and the info:
  the own status combined with the inner one (``params``' fields are
  info_cls's extra fields, in order).

  ``body(s, running, index)`` is one iteration: from f at the iterate
  (``s.fx``, evaluated at the end of the previous iteration) to the next
  loop state, f at the next iterate included.  The loop's first pass
  (``running`` False: no samples, no line search, no history at
  ``index``) only evaluates f at x0; f after the last iteration is the
  solution's value.  So f's forward program is traced once, inside the
  line search's loop (`_search_then_evaluate`), not also before and after
  it."""
  dtype = setup.flat0.dtype
  c = lambda v: jnp.asarray(v, dtype)
  zero = jnp.array(0, jnp.int32)
  success = jnp.asarray(status_lib.SUCCESS, jnp.int32)
  history = history_cls(
    **{
      name: jnp.full((max_steps,), jnp.nan, dtype)
      for name in history_cls._fields
      if name != "inner_status"
    },
    inner_status=jnp.full((max_steps,), -1, jnp.int32),
  )
  # An invalid traced parameter: no iteration runs and the status says so.
  first = jnp.where(setup.valid, -1, status_lib.INVALID_INPUT)
  init = _Loop(
    setup.flat0,
    setup.state0,
    key,
    zero,
    first,
    c(eps0),
    c(alpha0),
    c(beta0),
    type(params)(*map(c, params)),
    c(jnp.inf),
    zero,
    zero,
    success,
    zero,
    history,
    jnp.full((), jnp.nan, setup.value.dtype),
    success,
    jnp.array(False),
  )
  more = lambda s: (s.status < 0) & (s.k < max_steps)

  def step(s):
    running = s.have_center & more(s)
    nxt = body(s, running, jnp.where(running, s.k, max_steps))
    at_x0 = s._replace(
      state=nxt.state, fx=nxt.fx, center_status=nxt.center_status, have_center=jnp.array(True)
    )
    out = jax.tree_util.tree_map(
      lambda a, b: jnp.where(running, a, b), nxt._replace(history=()), at_x0._replace(history=())
    )
    return out._replace(history=nxt.history)

  s = jax.lax.while_loop(lambda s: (~s.have_center) | more(s), step, init)
  value, final_status = s.fx, s.center_status
  own = jnp.where(s.status < 0, status_lib.MAX_STEPS, s.status).astype(jnp.int32)
  inner = status_lib.first_failure(s.inner_status, final_status)
  failures = s.inner_failures + (final_status != status_lib.SUCCESS).astype(jnp.int32)
  info = info_cls(
    jnp.asarray(s.k, jnp.int32),
    status_lib.with_inner(own, inner),
    s.stationarity,
    s.eps,
    s.alpha,
    s.beta,
    *s.params,
    s.hits,
    s.failures,
    inner,
    failures,
    s.history,
  )
  status_lib.raise_if_failed(info.status, throw=throw, where=where)
  return GradientSamplingSolution(setup.unravel(s.x), value, info)


def _own_status(finite, stop):
  return jnp.where(~finite, status_lib.NONFINITE, jnp.where(stop, status_lib.SUCCESS, -1))


# -------------------------------------------------------------- Algorithm 1


def gradient_sampling(
  fun: Callable,
  x0,
  *,
  key,
  num_samples: int,
  eps0=1.0,
  eps_opt=1e-5,
  alpha0=1.0,
  alpha_opt=1e-5,
  beta0=1.0,
  beta_opt=1e-5,
  eta0=1.0,
  eta_opt=1e-5,
  mu_eps=0.5,
  mu_alpha=0.5,
  mu_beta=0.5,
  mu_eta=0.5,
  delta=1e-4,
  gamma=0.5,
  max_steps: int = 1000,
  max_backtracks: int = 30,
  early_stop: bool = False,
  state0=None,
  batching: str = "vmap",
  throw: bool = False,
) -> GradientSamplingSolution:
  """Algorithm 1: gradient sampling on f(x, Y_{alpha,beta}(x)), unconstrained.

  Each iteration samples N_sam points uniformly in B(x, eps), takes the
  hypergradients w_i there (one vmapped call), and the minimum-norm element w
  of their convex hull (Wolfe's method).  If |w| <= eta, the target is met:
  eta, eps, alpha, beta shrink by their mu and x stays.  Otherwise
  d = -w/|w| and x moves by the Armijo step t = max{t in {1, gamma, ...} :
  f(x + t d) < f(x) - delta t |w|}.  The run stops when |w| <= eta_opt,
  eps <= eps_opt, alpha <= alpha_opt and beta <= beta_opt.

  Fixed radius (Theorem 5.7).  With ``mu_eps=1`` eps stays at eps0 while
  eta, alpha and beta shrink as above.  Theorem 5.7 takes eps0 = eps_opt =
  eps with 0 < eps < eps* (the radius of Assumption 5.4 within which (SOSC)
  holds) and alpha_opt = beta_opt = eta_opt = 0: with probability 1 the
  run then never stops, and every cluster point x of the iterates in Lambda
  (the iterations with |w| <= eta) is eps-stationary, 0 in the convex hull
  of the Clarke subdifferentials of f(., Y(.)) over B(x, eps) (Clarke
  stationarity of Theorem 5.6 needs eps -> 0).  With positive targets, as
  run here, the eps part of the stopping rule holds from the start only
  when eps_opt >= eps0 (pass eps_opt = eps0, as the theorem does); the run
  then stops at the first |w| <= eta_opt once alpha <= alpha_opt and beta <=
  beta_opt.  With eps_opt < eps0 and mu_eps = 1 the rule can never hold
  and the run ends at max_steps with MAX_STEPS.

  Args:
    fun: fun(x, alpha, beta) -> scalar, the regularized hyper-objective, or
      -> (scalar, aux) with aux a solution whose ``info.status`` is read
      (see the module docstring).
    x0: starting point (array or pytree of float arrays).
    key: a jax.random key for the samples.
    num_samples: N_sam >= n + 1.
    eps0: initial sampling radius epsilon^0 (Algorithm 1).
    eps_opt: target sampling radius.
    alpha0: initial dual regularization alpha^0.
    alpha_opt: target alpha.
    beta0: initial primal regularization beta^0.
    beta_opt: target beta.
    eta0: initial stationarity target eta^0 (not stated in the paper's
      experiments; the default 1, with ``eta_opt`` = 1e-5 and ``mu_eta`` =
      0.5, mirrors the other parameters).
    eta_opt: target stationarity.
    mu_eps: shrink factor of eps when the target is met, in (0, 1]; 1
      keeps eps = eps0 throughout, the fixed-radius variant of Theorem 5.7
      (see below).
    mu_alpha: shrink factor of alpha.
    mu_beta: shrink factor of beta.
    mu_eta: shrink factor of eta.
    delta: Armijo constant.
    gamma: Armijo backtracking factor.
    max_steps: iterations at most (the paper's experiments use 1000).
    max_backtracks: if no step in {1, ..., gamma^(max_backtracks-1)} gives
      the decrease, the iteration is a null step (x unchanged; counted in
      info.linesearch_failures) and the next one samples afresh.
    early_stop: stop the first time |w| <= eta (the paper's "1E").
    state0: None, or the first state of a stateful ``fun(x, alpha, beta,
      state) -> (value, state)`` (warm starts; see the module docstring).
    batching: how the N_sam sampled hypergradients are evaluated: "vmap"
      (one batched call; best on accelerators) or "map" (`lax.map`, one
      after another; best on a CPU when fun's cost varies between points,
      as a warm-started solve's does).
    throw: raise `bilevel_jax.SolverError` when ``info.status`` is not
      SUCCESS (see `bilevel_jax.Status`).

  Returns:
    `GradientSamplingSolution(x, value, info)`: value = f(x, Y_{alpha,beta}(x))
    at the final alpha, beta; info a `GradientSamplingInfo`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import upper
    >>> fun = lambda x, alpha, beta: jnp.abs(x[0] - 1.0) + 0.1 * x[0] ** 2
    >>> sol = upper.gradient_sampling(fun, jnp.array([3.0]), key=jax.random.PRNGKey(0),
    ...                               num_samples=2, max_steps=300)
    >>> round(float(sol.x[0]), 3), int(sol.info.status)
    (1.0, 0)
  """
  setup = _setup(
    fun,
    x0,
    key,
    state0,
    num_samples,
    gamma,
    delta,
    max_steps,
    {"mu_eps": mu_eps, "mu_alpha": mu_alpha, "mu_beta": mu_beta, "mu_eta": mu_eta},
    {"eps0": eps0, "alpha0": alpha0, "beta0": beta0, "eta0": eta0},
    batching,
    alpha0,
    beta0,
    closed=("mu_eps",),
  )

  def body(s, running, index):
    key, sample_key = jax.random.split(s.key)
    points = sampling.ball(sample_key, s.x, s.eps, num_samples)
    grads, sample_status = _sampled_grads(setup, running, points, s.alpha, s.beta, s.state)
    hull = minnorm.min_norm_hull(grads)
    inner = status_lib.first_failure(s.center_status, sample_status)
    inner = status_lib.first_failure(inner, hull.info.status)
    w = hull.point
    norm_w = jnp.linalg.norm(w)
    stop = (norm_w <= eta_opt) & (s.eps <= eps_opt) & (s.alpha <= alpha_opt) & (s.beta <= beta_opt)
    hit = norm_w <= s.params.eta
    stop = stop | (early_stop & hit)
    finite = jnp.isfinite(s.fx) & jnp.all(jnp.isfinite(grads))
    active = running & (~hit) & (~stop) & finite
    shrink = running & hit & (~stop)
    alpha = jnp.where(shrink, mu_alpha * s.alpha, s.alpha)
    beta = jnp.where(shrink, mu_beta * s.beta, s.beta)
    d = -w / jnp.where(norm_w > 0, norm_w, 1)
    t, ok, ls_inner, *evaluated = _search_then_evaluate(
      setup.f,
      lambda value, _: value,
      s.x,
      s.fx,
      s.state,
      d,
      delta * norm_w,
      gamma,
      max_backtracks,
      active,
      ((s.alpha, s.beta), (alpha, beta)),
    )
    inner = status_lib.first_failure(inner, ls_inner)
    history = _record(
      s.history,
      index,
      value=s.fx,
      stationarity=norm_w,
      eps=s.eps,
      alpha=s.alpha,
      step=jnp.where(active & ok, t, 0),
      inner_status=inner,
    )
    return _advance(
      s,
      key=key,
      evaluated=evaluated,
      shrink=shrink,
      mu_eps=mu_eps,
      alpha=alpha,
      beta=beta,
      status=_own_status(finite, stop),
      stationarity=norm_w,
      null_step=running & (~hit) & (~stop) & (~ok),
      params=_Alg1(jnp.where(shrink, mu_eta * s.params.eta, s.params.eta)),
      inner=inner,
      history=history,
    )

  return _run(
    setup,
    body,
    key=key,
    eps0=eps0,
    alpha0=alpha0,
    beta0=beta0,
    params=_Alg1(eta0),
    history_cls=GradientSamplingHistory,
    info_cls=GradientSamplingInfo,
    max_steps=max_steps,
    where="upper.gradient_sampling",
    throw=throw,
  )


# -------------------------------------------------------------- Algorithm 2


def sqp_gradient_sampling(
  fun: Callable,
  constraints: Callable,
  x0,
  *,
  key,
  num_samples: int,
  eps0=0.1,
  eps_opt=1e-4,
  alpha0=0.01,
  alpha_opt=1e-6,
  beta0=0.01,
  beta_opt=1e-6,
  rho0=0.1,
  theta0=1e-4,
  eta=30.0,
  mu_eps=0.8,
  mu_alpha=0.2,
  mu_beta=0.2,
  mu_rho=0.5,
  mu_theta=0.5,
  delta=1e-4,
  gamma=0.5,
  max_steps: int = 1000,
  max_backtracks: int = 30,
  qp_max_steps: int = 5000,
  state0=None,
  batching: str = "vmap",
  throw: bool = False,
) -> GradientSamplingSolution:
  """Algorithm 2: SQP gradient sampling for min f(x, Y(x)) s.t. c(x) <= 0.

  Penalty (5.4): phi(x) = rho f(x, Y_{alpha,beta}(x)) + sum_k max(c_k(x), 0).
  Each iteration samples N_sam points for f and N_sam for each c_k in
  B(x, eps), solves the subproblem (5.5) for d (through its dual, in JAX),
  and measures Delta q = phi(x) - q(d).  If Delta q <= eta eps^2: the
  infeasibility decides between theta <- mu_theta theta (feasible enough) and
  rho <- mu_rho rho; eps, alpha, beta shrink; x stays.  Otherwise x moves by
  the largest t in {1, gamma, ...} with phi(x + t d) < phi(x) - delta t
  Delta q.  The run stops when Delta q <= eta eps^2 with eps, alpha, beta at
  their targets.

  The parameters not listed below (eps0, ..., mu_rho, mu_theta) are those of
  Algorithm 2; the defaults are the paper's data-poisoning settings (Section
  6.2). mu_rho and mu_theta are not given in the paper; 0.5 is our choice.

  Args:
    fun: fun(x, alpha, beta) -> scalar (the regularized hyper-objective), or
      -> (scalar, aux) as in `gradient_sampling`.
    constraints: c(x) -> (r,) array (smooth), feasible where c(x) <= 0.
    x0: starting point, as in `gradient_sampling`.
    key: a jax.random key for the samples.
    num_samples: N_sam >= n + 1.
    max_steps: iterations at most.
    qp_max_steps: iterations of the dual solver of (5.5) (an inner solve:
      MAX_STEPS when its duality gap is still above tolerance).
    state0: as in `gradient_sampling`.
    batching: as in `gradient_sampling`.
    throw: as in `gradient_sampling`.

  Returns:
    `GradientSamplingSolution(x, value, info)` with info a
    `SQPGradientSamplingInfo`: info.stationarity holds Delta q, info.rho
    and info.theta the final penalty weight and infeasibility threshold.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import upper
    >>> fun = lambda x, alpha, beta: -x[0]               # max x s.t. x <= 1
    >>> sol = upper.sqp_gradient_sampling(fun, lambda x: x - 1.0, jnp.array([0.0]),
    ...                                   key=jax.random.PRNGKey(0), num_samples=2,
    ...                                   rho0=0.5, max_steps=300)
    >>> round(float(sol.x[0]), 3), int(sol.info.status)
    (1.0, 0)
  """
  setup = _setup(
    fun,
    x0,
    key,
    state0,
    num_samples,
    gamma,
    delta,
    max_steps,
    {
      "mu_eps": mu_eps,
      "mu_alpha": mu_alpha,
      "mu_beta": mu_beta,
      "mu_rho": mu_rho,
      "mu_theta": mu_theta,
    },
    {"eps0": eps0, "alpha0": alpha0, "beta0": beta0, "rho0": rho0, "theta0": theta0, "eta": eta},
    batching,
    alpha0,
    beta0,
  )
  flat0, unravel = setup.flat0, setup.unravel
  n = flat0.shape[0]
  if not callable(constraints):
    raise TypeError(f"`constraints` must be callable, got {type(constraints).__name__}.")
  cons = lambda xf: jnp.atleast_1d(constraints(unravel(xf)))
  try:
    r = jax.eval_shape(cons, flat0).shape
  except Exception as err:
    raise TypeError(f"`constraints` failed when called on x0: {err}") from err
  if len(r) != 1:
    raise ValueError(f"`constraints` must return a vector, got shape {r}.")
  r = r[0]

  def body(s, running, index):
    rho, theta = s.params
    key, kf, kc = jax.random.split(s.key, 3)
    points = sampling.ball(kf, s.x, s.eps, num_samples)
    grads, sample_status = _sampled_grads(setup, running, points, s.alpha, s.beta, s.state)
    inner = status_lib.first_failure(s.center_status, sample_status)
    c_points = sampling.ball(kc, s.x, s.eps, num_samples * r).reshape(r, num_samples, n)
    c_grads = jax.vmap(lambda k, pts: jax.vmap(jax.grad(lambda xx: cons(xx)[k]))(pts))(
      jnp.arange(r), c_points
    )  # (r, N, n)
    cx = cons(s.x)
    fx = jnp.where(running, s.fx, 0)  # (the first pass has no f yet; its QP is not used)
    qp = minnorm.sqp_direction(fx, grads, cx, c_grads, rho, max_steps=qp_max_steps)
    inner = status_lib.first_failure(inner, qp.info.status)
    phi = rho * fx + jnp.sum(jnp.maximum(cx, 0))
    dq = jnp.maximum(phi - qp.model_value, 0)
    target = dq <= eta * s.eps**2
    stop = target & (s.eps <= eps_opt) & (s.alpha <= alpha_opt) & (s.beta <= beta_opt)
    finite = jnp.isfinite(fx) & jnp.all(jnp.isfinite(grads)) & jnp.all(jnp.isfinite(qp.direction))
    infeasible = jnp.sum(jnp.maximum(cx, 0))
    active = running & (~target) & finite
    shrink = running & target & (~stop)
    alpha = jnp.where(shrink, mu_alpha * s.alpha, s.alpha)
    beta = jnp.where(shrink, mu_beta * s.beta, s.beta)
    feasible_enough = infeasible <= theta
    t, ok, ls_inner, *evaluated = _search_then_evaluate(
      setup.f,
      lambda value, xx: rho * value + jnp.sum(jnp.maximum(cons(xx), 0)),  # the penalty (5.4)
      s.x,
      phi,
      s.state,
      qp.direction,
      delta * dq,
      gamma,
      max_backtracks,
      active,
      ((s.alpha, s.beta), (alpha, beta)),
    )
    inner = status_lib.first_failure(inner, ls_inner)
    history = _record(
      s.history,
      index,
      value=fx,
      stationarity=dq,
      eps=s.eps,
      alpha=s.alpha,
      step=jnp.where(active & ok, t, 0),
      infeasibility=infeasible,
      inner_status=inner,
    )
    params = _Alg2(
      jnp.where(shrink & ~feasible_enough, mu_rho * rho, rho),
      jnp.where(shrink & feasible_enough, mu_theta * theta, theta),
    )
    return _advance(
      s,
      key=key,
      evaluated=evaluated,
      shrink=shrink,
      mu_eps=mu_eps,
      alpha=alpha,
      beta=beta,
      status=_own_status(finite, stop),
      stationarity=dq,
      null_step=running & (~target) & (~ok),
      params=params,
      inner=inner,
      history=history,
    )

  return _run(
    setup,
    body,
    key=key,
    eps0=eps0,
    alpha0=alpha0,
    beta0=beta0,
    params=_Alg2(rho0, theta0),
    history_cls=SQPGradientSamplingHistory,
    info_cls=SQPGradientSamplingInfo,
    max_steps=max_steps,
    where="upper.sqp_gradient_sampling",
    throw=throw,
  )
