"""Gradient sampling with evolving regularization (Solla & Royset, Section 5).

`gradient_sampling` is Algorithm 1 and `sqp_gradient_sampling` Algorithm 2, as
written in the paper, each one `jax.lax.while_loop`: the whole run compiles
once, and many instances (random restarts, data sets) run in one vmapped call.

The objective is handed over as ``fun(x, alpha, beta)``, the regularized
hyper-objective f(x, Y_{alpha,beta}(x)), differentiable in x (for example
through `bilevel_jax.composite.solve`).  Gradients at the N_sam sampled points
are one vmapped `jax.value_and_grad` call.  Choices the paper leaves open are
documented on each argument.

Warm starts: with ``state0``, ``fun(x, alpha, beta, state) -> (value,
state)`` carries a state (typically the lower-level solution) from call to
call.  f at the iterate is evaluated from the state of the last accepted
point (after a move that is the solution there, so the solve is nearly
free); the sampled points and the line-search trials start from the
iterate's state.  The state is never differentiated, and a state that comes
back with a non-finite value is dropped.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import minnorm
from bilevel_jax._src import validation

SUCCESS = 0          # the stopping rule of the algorithm was met
MAX_ITER = 1         # max_iter reached first
NONFINITE = 2        # a non-finite value or gradient at the iterate
STATUS_MESSAGES = {SUCCESS: "stopping rule met", MAX_ITER: "max_iter reached",
                   NONFINITE: "non-finite objective or gradient"}


class GSInfo(NamedTuple):
  """Diagnostics of a gradient-sampling run.

  Attributes:
    iterations: iterations nu taken.
    status: SUCCESS, MAX_ITER or NONFINITE.
    stationarity: |w^nu| (Algorithm 1) or Delta q (Algorithm 2) at the end.
    eps, alpha, beta: sampling radius and regularization at the end.
    eta: stationarity target at the end (Algorithm 1); rho for Algorithm 2.
    target_hits: iterations in Lambda (a stationarity target was met).
    linesearch_failures: iterations where no step in {1, gamma, ...} up to
      max_backtracks decreased f enough (null steps: x unchanged).
    history: per-iteration arrays (length max_iter, NaN past the end): value
      f(x^nu), stationarity, eps, alpha, step t.
  """
  iterations: Any
  status: Any
  stationarity: Any
  eps: Any
  alpha: Any
  beta: Any
  eta: Any
  target_hits: Any
  linesearch_failures: Any
  history: Any


class GSResult(NamedTuple):
  x: Any
  value: Any
  info: GSInfo


def _sample_ball(key, center, radius, num):
  """num points uniform in the Euclidean ball B(center, radius)."""
  n = center.shape[0]
  k1, k2 = jax.random.split(key)
  direction = jax.random.normal(k1, (num, n), center.dtype)
  direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
  radii = radius * jax.random.uniform(k2, (num, 1), center.dtype) ** (1.0 / n)
  return center[None, :] + radii * direction


def _line_search(f, x, fx, d, decrease, gamma, max_backtracks, state, active):
  """Largest t in {1, gamma, gamma^2, ...} with f(x + t d) < f(x) - t decrease,
  where ``active`` (no trial otherwise); f(x, state) -> (value, state), each
  trial started from ``state``.  Returns (t, ok, state of the accepted trial)."""
  def cond(c):
    t, k, ok, _ = c
    return active & (~ok) & (k < max_backtracks)

  def body(c):
    t, k, _, _ = c
    value, trial_state = f(x + t * d, state)
    ok = value < fx - t * decrease
    return jnp.where(ok, t, gamma * t), k + 1, ok, trial_state

  one = jnp.ones((), x.dtype)
  t, _, ok, new_state = jax.lax.while_loop(cond, body, (one, 0, jnp.array(False), state))
  return t, ok, new_state


def _stateful(fun, unravel, state0):
  """fun as f(x_flat, alpha, beta, state) -> (value, state); without a state0
  the state is empty and fun(x, alpha, beta) -> value."""
  if state0 is None:
    return (lambda xf, a, b, st: (fun(unravel(xf), a, b), st)), ()
  def f(xf, a, b, st):
    out = fun(unravel(xf), a, b, st)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError("with `state0`, `fun(x, alpha, beta, state)` must return (value, "
                      f"state), got {type(out).__name__}.")
    value, new = out
    finite = jnp.isfinite(value) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(new)] or
        [jnp.array(True)]))
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, st)
    return value, new
  return f, state0


BATCHINGS = ("vmap", "map")


def _batched_value_and_grad(f, batching):
  """(values, grads) of f(., alpha, beta, state) at each row of points, all
  started from the same state: one vmapped call, or one after another in a
  `lax.map` (on a CPU, where a vmapped solve runs every lane until the
  slowest converges, the sequential map costs the sum of the lanes' work
  instead of N_sam times the worst)."""
  vg = jax.value_and_grad(f, has_aux=True)

  def call(points, a, b, st):
    if batching == "vmap":
      (values, _), grads = jax.vmap(vg, in_axes=(0, None, None, None))(points, a, b, st)
    else:
      (values, _), grads = jax.lax.map(lambda pt: vg(pt, a, b, st), points)
    return values, grads
  return call


def _check_common(num_samples, n, gamma, delta, max_iter, mus, batching):
  validation.check_positive_int("num_samples", num_samples)
  validation.check_one_of("batching", batching, BATCHINGS)
  validation.check_positive_int("max_iter", max_iter)
  if num_samples < n + 1:
    raise ValueError(f"`num_samples` must be >= n + 1 = {n + 1} (Algorithm 1 and 2 "
                     f"require N_sam >= n + 1), got {num_samples}.")
  for name, value in (("gamma", gamma), ("delta", delta)) + tuple(mus.items()):
    concrete = validation.concrete_value(value)
    if concrete is not None and not (0 < float(concrete) < 1):
      raise ValueError(f"`{name}` must lie in (0, 1), got {value!r}.")


def _history(max_iter, dtype, names):
  return {name: jnp.full((max_iter,), jnp.nan, dtype) for name in names}


def _result(s, f, unravel, last):
  """The GSResult of a finished loop state; ``last`` names the state entry
  reported as info.eta (eta for Algorithm 1, rho for Algorithm 2)."""
  status = jnp.where(s["status"] < 0, MAX_ITER, s["status"]).astype(jnp.int32)
  value, _ = f(s["x"], s["alpha"], s["beta"], s["state"])
  info = GSInfo(s["k"], status, s["stationarity"], s["eps"], s["alpha"], s["beta"],
                s[last], s["hits"], s["failures"], s["history"])
  return GSResult(unravel(s["x"]), value, info)


def _record(history, k, **values):
  """Writes this iteration's values into the per-iteration history arrays."""
  return {name: history[name].at[k].set(value) for name, value in values.items()}


def gradient_sampling(fun: Callable, x0, *, key, num_samples: int,
                      eps0=1.0, eps_opt=1e-5, alpha0=1.0, alpha_opt=1e-5,
                      beta0=1.0, beta_opt=1e-5, eta0=1.0, eta_opt=1e-5,
                      mu_eps=0.5, mu_alpha=0.5, mu_beta=0.5, mu_eta=0.5,
                      delta=1e-4, gamma=0.5, max_iter: int = 1000,
                      max_backtracks: int = 30, early_stop: bool = False,
                      state0=None, batching: str = "vmap") -> GSResult:
  """Algorithm 1: gradient sampling on f(x, Y_{alpha,beta}(x)), unconstrained.

  Each iteration samples N_sam points uniformly in B(x, eps), takes the
  hypergradients w_i there (one vmapped call), and the minimum-norm element w
  of their convex hull (Wolfe's method).  If |w| <= eta, the target is met:
  eta, eps, alpha, beta shrink by their mu and x stays.  Otherwise
  d = -w/|w| and x moves by the Armijo step t = max{t in {1, gamma, ...} :
  f(x + t d) < f(x) - delta t |w|}.  The run stops when |w| <= eta_opt,
  eps <= eps_opt, alpha <= alpha_opt and beta <= beta_opt.

  Args:
    fun: fun(x, alpha, beta) -> scalar, the regularized hyper-objective.
    x0: starting point (array or pytree).
    key: a jax.random key for the samples.
    num_samples: N_sam >= n + 1.
    eps0, eps_opt, alpha0, alpha_opt, beta0, beta_opt, eta0, eta_opt,
      mu_eps, mu_alpha, mu_beta, mu_eta, delta, gamma: as in Algorithm 1.
      The paper's experiments do not state eta0 or eta_opt; the defaults
      (1 and 1e-5, with mu_eta = 0.5) mirror the other parameters.
    max_iter: iterations at most (the paper's experiments use 1000).
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

  Returns:
    GSResult(x, value=f(x, Y_{alpha,beta}(x)) at the final alpha, beta, info).
  """
  flat0, unravel = ravel_pytree(x0)
  n = flat0.shape[0]
  _check_common(num_samples, n, gamma, delta, max_iter,
                {"mu_eps": mu_eps, "mu_alpha": mu_alpha, "mu_beta": mu_beta, "mu_eta": mu_eta},
                batching)
  for name, value in (("eps0", eps0), ("alpha0", alpha0), ("beta0", beta0), ("eta0", eta0)):
    validation.check_positive(name, value)
  dtype = flat0.dtype
  f, fun_state0 = _stateful(fun, unravel, state0)
  value_and_grad = _batched_value_and_grad(f, batching)
  c = lambda v: jnp.asarray(v, dtype)

  def cond(state):
    return (state["status"] < 0) & (state["k"] < max_iter)

  def body(s):
    key, sample_key = jax.random.split(s["key"])
    fx, center_state = f(s["x"], s["alpha"], s["beta"], s["state"])
    points = _sample_ball(sample_key, s["x"], s["eps"], num_samples)
    _, grads = value_and_grad(points, s["alpha"], s["beta"], center_state)
    w = minnorm.min_norm_hull(grads).point
    norm_w = jnp.linalg.norm(w)
    stop = (norm_w <= eta_opt) & (s["eps"] <= eps_opt) & (s["alpha"] <= alpha_opt) & \
        (s["beta"] <= beta_opt)
    hit = norm_w <= s["eta"]
    stop = stop | (early_stop & hit)
    finite = jnp.isfinite(fx) & jnp.all(jnp.isfinite(grads))

    d = -w / jnp.where(norm_w > 0, norm_w, 1)
    t, ok, trial_state = _line_search(
        lambda xx, st: f(xx, s["alpha"], s["beta"], st), s["x"], fx, d, delta * norm_w,
        gamma, max_backtracks, center_state, (~hit) & (~stop) & finite)
    move = (~hit) & (~stop) & ok & finite
    shrink = hit & (~stop)
    k = s["k"]
    hist = _record(s["history"], k, value=fx, stationarity=norm_w, eps=s["eps"],
                   alpha=s["alpha"], step=jnp.where(move, t, 0))
    status = jnp.where(~finite, NONFINITE, jnp.where(stop, SUCCESS, -1))
    return {
        "x": jnp.where(move, s["x"] + t * d, s["x"]),
        "state": jax.tree_util.tree_map(lambda a, b: jnp.where(move, a, b), trial_state,
                                        center_state),
        "key": key, "k": k + 1, "status": status,
        "eps": jnp.where(shrink, mu_eps * s["eps"], s["eps"]),
        "alpha": jnp.where(shrink, mu_alpha * s["alpha"], s["alpha"]),
        "beta": jnp.where(shrink, mu_beta * s["beta"], s["beta"]),
        "eta": jnp.where(shrink, mu_eta * s["eta"], s["eta"]),
        "stationarity": norm_w,
        "hits": s["hits"] + shrink.astype(jnp.int32),
        "failures": s["failures"] + ((~hit) & (~stop) & (~ok)).astype(jnp.int32),
        "history": hist,
    }

  init = {"x": flat0, "state": fun_state0, "key": key, "k": 0, "status": jnp.array(-1),
          "eps": c(eps0), "alpha": c(alpha0), "beta": c(beta0), "eta": c(eta0),
          "stationarity": c(jnp.inf), "hits": jnp.array(0, jnp.int32),
          "failures": jnp.array(0, jnp.int32),
          "history": _history(max_iter, dtype, ("value", "stationarity", "eps", "alpha", "step"))}
  return _result(jax.lax.while_loop(cond, body, init), f, unravel, "eta")


def sqp_gradient_sampling(fun: Callable, constraints: Callable, x0, *, key,
                          num_samples: int, eps0=0.1, eps_opt=1e-4, alpha0=0.01,
                          alpha_opt=1e-6, beta0=0.01, beta_opt=1e-6, rho0=0.1,
                          theta0=1e-4, eta=30.0, mu_eps=0.8, mu_alpha=0.2,
                          mu_beta=0.2, mu_rho=0.5, mu_theta=0.5, delta=1e-4,
                          gamma=0.5, max_iter: int = 1000, max_backtracks: int = 30,
                          qp_max_steps: int = 5000, state0=None,
                          batching: str = "vmap") -> GSResult:
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

  Args:
    fun: fun(x, alpha, beta) -> scalar (the regularized hyper-objective).
    constraints: c(x) -> (r,) array (smooth), feasible where c(x) <= 0.
    x0, key, num_samples (>= n + 1): as in `gradient_sampling`.
    Remaining parameters: as in Algorithm 2; the defaults are the paper's
      data-poisoning settings (Section 6.2).  mu_rho and mu_theta are not
      given in the paper; 0.5 is our choice.
    qp_max_steps: iterations of the dual solver of (5.5).
    state0, batching: as in `gradient_sampling`.

  Returns:
    GSResult; info.stationarity holds Delta q, info.eta holds rho.
  """
  flat0, unravel = ravel_pytree(x0)
  n = flat0.shape[0]
  _check_common(num_samples, n, gamma, delta, max_iter,
                {"mu_eps": mu_eps, "mu_alpha": mu_alpha, "mu_beta": mu_beta,
                 "mu_rho": mu_rho, "mu_theta": mu_theta}, batching)
  for name, value in (("eps0", eps0), ("alpha0", alpha0), ("beta0", beta0),
                      ("rho0", rho0), ("theta0", theta0), ("eta", eta)):
    validation.check_positive(name, value)
  dtype = flat0.dtype
  f, fun_state0 = _stateful(fun, unravel, state0)
  cons = lambda xf: jnp.atleast_1d(constraints(unravel(xf)))
  try:
    r = jax.eval_shape(cons, flat0).shape
  except Exception as err:
    raise TypeError(f"`constraints` failed when called on x0: {err}") from err
  if len(r) != 1:
    raise ValueError(f"`constraints` must return a vector, got shape {r}.")
  r = r[0]
  value_and_grad = _batched_value_and_grad(f, batching)
  c = lambda v: jnp.asarray(v, dtype)

  def penalty(xf, rho, a, b, st):
    value, st = f(xf, a, b, st)
    return rho * value + jnp.sum(jnp.maximum(cons(xf), 0)), st

  def cond(state):
    return (state["status"] < 0) & (state["k"] < max_iter)

  def body(s):
    key, kf, kc = jax.random.split(s["key"], 3)
    points = _sample_ball(kf, s["x"], s["eps"], num_samples)
    fx, center_state = f(s["x"], s["alpha"], s["beta"], s["state"])
    _, grads = value_and_grad(points, s["alpha"], s["beta"], center_state)
    c_points = _sample_ball(kc, s["x"], s["eps"], num_samples * r).reshape(r, num_samples, n)
    c_grads = jax.vmap(lambda k, pts: jax.vmap(jax.grad(lambda xx: cons(xx)[k]))(pts))(
        jnp.arange(r), c_points)                                       # (r, N, n)
    cx = cons(s["x"])
    qp = minnorm.sqp_direction(fx, grads, cx, c_grads, s["rho"], max_steps=qp_max_steps)
    phi = s["rho"] * fx + jnp.sum(jnp.maximum(cx, 0))
    dq = jnp.maximum(phi - qp.model_value, 0)
    target = dq <= eta * s["eps"] ** 2
    stop = target & (s["eps"] <= eps_opt) & (s["alpha"] <= alpha_opt) & (s["beta"] <= beta_opt)
    finite = jnp.isfinite(fx) & jnp.all(jnp.isfinite(grads)) & jnp.all(jnp.isfinite(qp.direction))
    infeasible = jnp.sum(jnp.maximum(cx, 0))
    shrink = target & (~stop)
    feasible_enough = infeasible <= s["theta"]
    t, ok, trial_state = _line_search(
        lambda xx, st: penalty(xx, s["rho"], s["alpha"], s["beta"], st), s["x"], phi,
        qp.direction, delta * dq, gamma, max_backtracks, center_state, (~target) & finite)
    move = (~target) & ok & finite
    k = s["k"]
    hist = _record(s["history"], k, value=fx, stationarity=dq, eps=s["eps"],
                   alpha=s["alpha"], step=jnp.where(move, t, 0), infeasibility=infeasible)
    status = jnp.where(~finite, NONFINITE, jnp.where(stop, SUCCESS, -1))
    return {
        "x": jnp.where(move, s["x"] + t * qp.direction, s["x"]),
        "state": jax.tree_util.tree_map(lambda a, b: jnp.where(move, a, b), trial_state,
                                        center_state),
        "key": key, "k": k + 1, "status": status,
        "eps": jnp.where(shrink, mu_eps * s["eps"], s["eps"]),
        "alpha": jnp.where(shrink, mu_alpha * s["alpha"], s["alpha"]),
        "beta": jnp.where(shrink, mu_beta * s["beta"], s["beta"]),
        "rho": jnp.where(shrink & ~feasible_enough, mu_rho * s["rho"], s["rho"]),
        "theta": jnp.where(shrink & feasible_enough, mu_theta * s["theta"], s["theta"]),
        "stationarity": dq,
        "hits": s["hits"] + shrink.astype(jnp.int32),
        "failures": s["failures"] + ((~target) & (~ok)).astype(jnp.int32),
        "history": hist,
    }

  init = {"x": flat0, "state": fun_state0, "key": key, "k": 0, "status": jnp.array(-1),
          "eps": c(eps0), "alpha": c(alpha0), "beta": c(beta0), "rho": c(rho0),
          "theta": c(theta0), "stationarity": c(jnp.inf),
          "hits": jnp.array(0, jnp.int32), "failures": jnp.array(0, jnp.int32),
          "history": _history(max_iter, dtype, ("value", "stationarity", "eps", "alpha",
                                                "step", "infeasibility"))}
  return _result(jax.lax.while_loop(cond, body, init), f, unravel, "rho")
