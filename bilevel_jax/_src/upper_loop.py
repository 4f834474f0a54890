"""The upper-level loop: any `optax.GradientTransformation` on x, with an
optional projection onto X, warm starts of y0, history, progress and
resumable checkpoints.

Each upper step is one jitted call

    value, g, y_K = hypergradient_fn(x, y0)
    updates, opt_state = optimizer.update(g, opt_state, x)
    x = P_X(x + updates),

where ``y0`` is the initial lower iterate (or y_K of the previous step with
``warm_start=True``). The step is compiled once; the Python loop around it
times each step, prints progress and saves checkpoints.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel_jax._src import checkpointing
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation

SUCCESS = 0
NONFINITE = 1
STATUS_MESSAGES = {SUCCESS: "success", NONFINITE: "stopped: non-finite objective or hypergradient"}


class OptimizeInfo(NamedTuple):
  steps: int          # upper steps completed (including resumed ones)
  status: int         # SUCCESS or NONFINITE
  message: str
  resumed_from: int   # step the run resumed from (0 if fresh)
  compile_time: float  # seconds spent compiling the step (first call)


class OptimizeResult(NamedTuple):
  """Final x, the last y_K, optimizer state, and a history of arrays.

  ``history`` maps names to NumPy arrays with one entry per upper step:
  ``value`` (phi_K(x_t)), ``grad_norm``, ``step_time`` (seconds, after
  `block_until_ready`, excluding compilation) and every metric returned by
  ``metrics_fn``. A run stopped on a non-finite value keeps that step's
  entry, so its history has ``info.steps + 1`` entries.
  """
  x: Any
  y: Any
  opt_state: Any
  history: dict
  info: OptimizeInfo


def optimize(hypergradient_fn: Callable, x0, optimizer: optax.GradientTransformation,
             *, steps: int, y0=None, warm_start: bool = False,
             projection: Optional[Callable] = None,
             metrics_fn: Optional[Callable] = None,
             checkpoint_path: Optional[str] = None, checkpoint_every: int = 100,
             resume: bool = True, log_every: int = 0, stop_on_nonfinite: bool = True,
             log=None) -> OptimizeResult:
  """Minimizes phi(x) with hypergradients and an Optax optimizer.

  Args:
    hypergradient_fn: ``fn(x) -> (value, grad)`` when ``y0`` is None, else
      ``fn(x, y0) -> (value, grad, y_K)`` (see `bda.make_hypergradient`).
    x0: initial upper variable (pytree).
    optimizer: any `optax.GradientTransformation`.
    steps: number of upper iterations.
    y0: initial lower iterate, passed to ``hypergradient_fn``.
    warm_start: feed y_K of each step back as the next y0.
    projection: ``P_X(x) -> x`` applied after each update (see
      `bilevel_jax.projections`).
    metrics_fn: ``fn(x, y_K) -> dict of scalars`` recorded every step, inside
      the jitted step (y_K is None when ``y0`` is None).
    checkpoint_path: save (x, y0, opt_state, history) every
      ``checkpoint_every`` steps and on interruption; with ``resume=True`` an
      existing file there is loaded and the run continues from it.
    log_every: print a progress line every this many steps (0: never).
    stop_on_nonfinite: stop when the value or gradient is not finite;
      ``info.status`` says so either way.
    log: a file-like object for progress (default stderr).

  Returns:
    `OptimizeResult`.
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
  validation.check_float_leaves("x0", x0)
  log = sys.stderr if log is None else log
  with_y = y0 is not None

  def step_fn(x, opt_state, y):
    if with_y:
      value, grad, y_next = hypergradient_fn(x, y)
    else:
      value, grad = hypergradient_fn(x)
      y_next = None
    updates, opt_state = optimizer.update(grad, opt_state, x)
    x_new = optax.apply_updates(x, updates)
    if projection is not None:
      x_new = projection(x_new)
    x_new = tree_ops.tree_cast_like(x_new, x)
    metrics = {"value": value, "grad_norm": tree_ops.tree_norm(grad)}
    if metrics_fn is not None:
      metrics.update(metrics_fn(x, y_next))
    y_carry = y_next if warm_start else y
    return x_new, opt_state, y_carry, y_next, metrics

  step_jit = jax.jit(step_fn)
  opt_state = optimizer.init(x0)
  history: dict[str, list] = {}
  # Everything the loop carries, replaced as one object after each step, so an
  # interruption never sees x from step t+1 with the step count of t.
  # (x, opt_state, y0 of the next step, y_K of the last step, steps completed)
  state = (x0, opt_state, y0, y0, 0)

  if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
    templates = {"x": x0, "opt_state": opt_state}
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

  status = SUCCESS
  try:
    for t in range(state[4], steps):
      tic = time.perf_counter()
      x_new, opt_state_new, y_new, y_next, metrics = compiled(*state[:3])
      jax.block_until_ready((x_new, metrics))
      elapsed = time.perf_counter() - tic
      metrics = {k: float(v) for k, v in metrics.items()}
      metrics["step_time"] = elapsed
      for key, value in metrics.items():
        history.setdefault(key, []).append(value)
      if not (np.isfinite(metrics["value"]) and np.isfinite(metrics["grad_norm"])):
        status = NONFINITE
        if stop_on_nonfinite:
          break
      state = (x_new, opt_state_new, y_new, y_next, t + 1)
      if log_every and ((t + 1) % log_every == 0 or t + 1 == steps):
        print(f"  upper step {t + 1:>6d}/{steps}  phi={metrics['value']:.6g}  "
              f"|grad|={metrics['grad_norm']:.3g}  {1e3 * elapsed:.2f} ms/step",
              file=log, flush=True)
      if checkpoint_path is not None and (t + 1) % checkpoint_every == 0:
        save(state)
  except KeyboardInterrupt:
    save(state)
    raise
  save(state)
  x, opt_state, y, y_last, completed = state
  history_arrays = {k: np.asarray(v) for k, v in history.items()}
  info = OptimizeInfo(steps=completed, status=status, message=STATUS_MESSAGES[status],
                      resumed_from=resumed_from, compile_time=compile_time)
  return OptimizeResult(x=x, y=y_last, opt_state=opt_state, history=history_arrays,
                        info=info)
