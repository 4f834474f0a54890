"""The upper-level loop: any `optax.GradientTransformation` on x, with an
optional projection onto X, warm starts of y0, history, progress and
resumable checkpoints.

Each upper step is one jitted call

    value, g, solution = hypergradient_fn(x, y0)
    updates, opt_state = optimizer.update(g, opt_state, x)
    x = P_X(x + updates),

where ``y0`` is the initial lower iterate (or the lower solution of the
previous step with ``warm_start=True``). The step is compiled once; the
Python loop around it times each step, records the lower solve's status and
residual, prints progress and saves checkpoints.

No inner failure is hidden: the history has the lower status of every step,
``info.inner_failures`` counts the steps whose lower solve failed,
``info.status`` is INNER_FAILED when any did (and the upper loop itself did
not fail), and ``stop_on_inner_failure=True`` stops at the first one.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import optax

from bilevel_jax._src import checkpointing
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation
from bilevel_jax._src import variables


class OptimizeInfo(NamedTuple):
  """Diagnostics of `optimize` (NumPy scalars).

  Attributes:
    num_steps: upper steps completed (including resumed ones).
    status: SUCCESS; NONFINITE (a non-finite value or hypergradient);
      INNER_FAILED (some lower solve did not succeed; see ``inner_status``).
    inner_status: the first non-SUCCESS lower status seen (SUCCESS if none).
    inner_failures: number of upper steps whose lower solve failed.
    resumed_from: step the run resumed from (0 if fresh).
    compile_time: seconds spent compiling the step (first call).
  """
  num_steps: np.ndarray
  status: np.ndarray
  inner_status: np.ndarray
  inner_failures: np.ndarray
  resumed_from: np.ndarray
  compile_time: np.ndarray


class OptimizeSolution(NamedTuple):
  """Final x, the last lower solution y, optimizer state, and a history.

  ``history`` maps names to NumPy arrays with one entry per upper step:
  ``value`` (phi(x_t)), ``grad_norm``, ``step_time`` (seconds, after
  `block_until_ready`, excluding compilation), ``lower_status`` and, when
  the method reports one, ``lower_residual``, and every metric returned by
  ``metrics_fn``. A run stopped on a failure keeps that step's entry, so its
  history has ``info.num_steps + 1`` entries.
  """
  x: Any
  y: Any
  opt_state: Any
  history: dict
  info: OptimizeInfo


def _unpack(out, with_y: bool):
  """(value, grad, y, lower status or None, lower residual or None) of the
  hypergradient function's output."""
  if not isinstance(out, tuple) or len(out) not in (2, 3):
    raise TypeError("`hypergradient_fn` must return (value, grad) or (value, grad, "
                    f"solution), got {type(out).__name__} of length "
                    f"{len(out) if isinstance(out, tuple) else '-'}.")
  if len(out) == 2:
    if with_y:
      raise TypeError("with `y0`, `hypergradient_fn(x, y0)` must return (value, grad, "
                      "solution) or (value, grad, y).")
    return out[0], out[1], None, None, None
  value, grad, third = out
  info = getattr(third, "info", None)
  if info is not None and hasattr(info, "status"):
    return value, grad, getattr(third, "y", None), info.status, getattr(info, "residual", None)
  return value, grad, third, None, None


def optimize(hypergradient_fn: Callable, x0, optimizer: optax.GradientTransformation,
             *, steps: int, y0=None, warm_start: bool = False,
             projection: Optional[Callable] = None,
             metrics_fn: Optional[Callable] = None,
             checkpoint_path: Optional[str] = None, checkpoint_every: int = 100,
             resume: bool = True, log_every: int = 0, stop_on_nonfinite: bool = True,
             stop_on_inner_failure: bool = False, throw: bool = False,
             log=None) -> OptimizeSolution:
  """Minimizes phi(x) with hypergradients and an Optax optimizer.

  Args:
    hypergradient_fn: ``fn(x, y0) -> (value, grad, solution)`` (from a
      method's ``make_hypergradient``: ``solution.y`` is the lower solution,
      ``solution.info.status`` its status), or ``fn(x, y0) -> (value, grad,
      y)``; without ``y0``, ``fn(x) -> (value, grad)`` or ``(value, grad,
      solution)``.
    x0: initial upper variable (pytree; an Equinox module's non-float leaves
      are carried along, the optimizer sees the floating-point leaves).
    optimizer: any `optax.GradientTransformation`.
    steps: number of upper iterations.
    y0: initial lower iterate, passed to ``hypergradient_fn``.
    warm_start: feed the lower solution of each step back as the next y0.
    projection: ``P_X(x) -> x`` applied after each update (see
      `bilevel_jax.projections`).
    metrics_fn: ``fn(x, y) -> dict of scalars`` recorded every step, inside
      the jitted step (y is None when there is none).
    checkpoint_path: save (x, y0, opt_state, history) every
      ``checkpoint_every`` steps and on interruption; with ``resume=True`` an
      existing file there is loaded and the run continues from it.
    log_every: print a progress line every this many steps (0: never).
    stop_on_nonfinite: stop when the value or gradient is not finite;
      ``info.status`` says so either way.
    stop_on_inner_failure: stop at the first step whose lower solve did not
      succeed; ``info`` and the history record it either way.
    throw: raise `bilevel_jax.SolverError` at the end when ``info.status``
      is not SUCCESS.
    log: a file-like object for progress (default stderr).

  Returns:
    `OptimizeSolution`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bilevel_jax import implicit, upper
    >>> f = lambda lam, y: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * lam * jnp.sum(y ** 2)
    >>> F = lambda lam, y: 0.5 * jnp.sum((y - 0.25) ** 2)   # best lam = 3
    >>> hg = implicit.make_hypergradient(F, f, solver="newton")
    >>> sol = upper.optimize(hg, 1.0, optax.sgd(20.0), steps=200, y0=jnp.zeros(2))
    >>> round(float(sol.x), 3), int(sol.info.status), int(sol.history["lower_status"].max())
    (3.0, 0, 0)
  """
  steps = validation.check_positive_int("steps", steps)
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError("`optimizer` must be an optax.GradientTransformation, got "
                    f"{type(optimizer).__name__}.")
  if not callable(hypergradient_fn):
    raise TypeError("`hypergradient_fn` must be callable.")
  if warm_start and y0 is None:
    raise ValueError("`warm_start=True` needs `y0`.")
  if checkpoint_path is not None:
    validation.check_positive_int("checkpoint_every", checkpoint_every)
  variables.check("x0", x0)
  log = sys.stderr if log is None else log
  with_y = y0 is not None
  x0_dyn, x_rest = variables.partition(x0)
  as_x = lambda xd: variables.combine(xd, x_rest)

  def step_fn(x_dyn, opt_state, y):
    x = as_x(x_dyn)
    out = hypergradient_fn(x, y) if with_y else hypergradient_fn(x)
    value, grad, y_next, lower_status, lower_residual = _unpack(out, with_y)
    updates, opt_state = optimizer.update(grad, opt_state, x_dyn)
    x_new = optax.apply_updates(x_dyn, updates)
    if projection is not None:
      x_new = variables.partition(projection(as_x(x_new)))[0]
    x_new = tree_ops.tree_cast_like(x_new, x_dyn)
    metrics = {"value": value, "grad_norm": tree_ops.tree_norm(grad)}
    if lower_status is not None:
      metrics["lower_status"] = lower_status
    if lower_residual is not None:
      metrics["lower_residual"] = lower_residual
    if metrics_fn is not None:
      metrics.update(metrics_fn(x, y_next))
    y_carry = y_next if warm_start else y
    return x_new, opt_state, y_carry, y_next, metrics

  step_jit = jax.jit(step_fn)
  opt_state = optimizer.init(x0_dyn)
  history: dict[str, list] = {}
  # Everything the loop carries, replaced as one object after each step, so an
  # interruption never sees x from step t+1 with the step count of t.
  # (x, opt_state, y0 of the next step, y of the last step, steps completed)
  state = (x0_dyn, opt_state, y0, y0, 0)

  if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
    templates = {"x": x0_dyn, "opt_state": opt_state}
    if with_y:
      templates["y"] = y0
      templates["y_last"] = y0
    trees, meta = checkpointing.load(checkpoint_path, templates)
    done = int(meta.pop("step"))
    if done > steps:
      raise ValueError(f"checkpoint {checkpoint_path!r} is at step {done}, beyond "
                       f"`steps` = {steps}; raise `steps` or use another path.")
    state = (trees["x"], trees["opt_state"], trees.get("y", y0), trees.get("y_last", y0), done)
    history = {k[len("history."):]: list(v) for k, v in meta.items()
               if k.startswith("history.")}
  resumed_from = state[4]

  def save(state):
    if checkpoint_path is None:
      return
    x, opt_state, y, y_last, completed = state
    trees = {"x": x, "opt_state": opt_state}
    if with_y:
      trees["y"] = y
      trees["y_last"] = y_last
    meta = {"step": completed}
    meta.update({f"history.{k}": np.asarray(v[:completed]) for k, v in history.items()})
    checkpointing.save(checkpoint_path, trees, meta)

  compile_start = time.perf_counter()
  compiled = step_jit.lower(state[0], state[1], state[2]).compile()
  compile_time = time.perf_counter() - compile_start

  lower_codes = np.asarray(history.get("lower_status", []), dtype=np.int64)
  inner_failures = int(np.sum(lower_codes != status_lib.SUCCESS))
  failed_codes = lower_codes[lower_codes != status_lib.SUCCESS]
  inner_status = int(failed_codes[0]) if failed_codes.size else status_lib.SUCCESS
  nonfinite = False
  try:
    for t in range(state[4], steps):
      tic = time.perf_counter()
      x_new, opt_state_new, y_new, y_next, metrics = compiled(*state[:3])
      jax.block_until_ready((x_new, metrics))
      elapsed = time.perf_counter() - tic
      metrics = {k: (int(v) if k == "lower_status" else float(v)) for k, v in metrics.items()}
      metrics["step_time"] = elapsed
      for key, value in metrics.items():
        history.setdefault(key, []).append(value)
      inner_failed = metrics.get("lower_status", status_lib.SUCCESS) != status_lib.SUCCESS
      if inner_failed:
        inner_failures += 1
        if inner_status == status_lib.SUCCESS:
          inner_status = metrics["lower_status"]
      if not (np.isfinite(metrics["value"]) and np.isfinite(metrics["grad_norm"])):
        nonfinite = True
        if stop_on_nonfinite:
          break
      if inner_failed and stop_on_inner_failure:
        break
      state = (x_new, opt_state_new, y_new, y_next, t + 1)
      if log_every and ((t + 1) % log_every == 0 or t + 1 == steps):
        lower = ""
        if "lower_status" in metrics:
          lower = f"  lower: {status_lib.Status(metrics['lower_status']).name}"
        print(f"  upper step {t + 1:>6d}/{steps}  phi={metrics['value']:.6g}  "
              f"|grad|={metrics['grad_norm']:.3g}  {1e3 * elapsed:.2f} ms/step{lower}",
              file=log, flush=True)
      if checkpoint_path is not None and (t + 1) % checkpoint_every == 0:
        save(state)
  except KeyboardInterrupt:
    save(state)
    raise
  save(state)
  x_dyn, opt_state, y, y_last, completed = state
  status = status_lib.NONFINITE if nonfinite else (
      status_lib.INNER_FAILED if inner_failures else status_lib.SUCCESS)
  history_arrays = {k: np.asarray(v) for k, v in history.items()}
  info = OptimizeInfo(num_steps=np.asarray(completed), status=np.asarray(status, np.int32),
                      inner_status=np.asarray(inner_status, np.int32),
                      inner_failures=np.asarray(inner_failures),
                      resumed_from=np.asarray(resumed_from),
                      compile_time=np.asarray(compile_time))
  status_lib.raise_if_failed(info.status, throw=throw, where="upper.optimize")
  return OptimizeSolution(x=as_x(x_dyn), y=y_last, opt_state=opt_state,
                          history=history_arrays, info=info)
