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

Practical choices (ours):
  * Before any work, ``hypergradient_fn``, ``metrics_fn`` and ``projection``
    are evaluated abstractly (`jax.eval_shape`, nothing runs) on the initial
    point: a wrong arity, output count, shape, tree structure or dtype is a
    TypeError/ValueError naming the function, never a broadcast or a cast
    inside the step (a scalar gradient for a vector x would otherwise be
    broadcast by optax).
  * ``steps`` is bounded up front: at most 2**31 - 1 (optax's step counters
    are int32 and stop advancing there), and the history it implies (8 bytes
    per step and recorded name, kept in NumPy chunks of 4096 steps allocated
    as the run goes) must fit in the machine's memory.
  * Checkpoints (`checkpointing`) are written atomically with SIGINT/SIGTERM
    held until the file is in place, the path is checked writable before the
    first step, stale temporaries of killed runs are removed, and a file that
    does not fit this run (dtype, structure, step) is refused by name.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel_jax._src import checkpointing
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import upper_step
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


# Reserved history names; a metric may not replace them.
_RESERVED = ("value", "grad_norm", "lower_status", "lower_residual", "step_time")


def _arrays_only(tree):
  """``tree`` with ``None`` for leaves that are not arrays or numbers (an
  Equinox module's functions), which `jax.eval_shape` cannot return."""
  return jax.tree_util.tree_map(lambda v: v if variables.is_array_like(v) else None, tree)


def _eval_shape(name: str, call: str, fn, *args):
  """``jax.eval_shape(fn, *args)``; a failure is re-raised naming ``name``."""
  try:
    return jax.eval_shape(fn, *args)
  except Exception as err:  # re-raised with the argument's name
    kind = ValueError if isinstance(err, ValueError) else TypeError
    raise kind(
      f"`{name}` failed when called as {call} on the initial point: {type(err).__name__}: {err}"
    ) from err


def _check_like(name: str, what: str, reference, candidate, dtypes: bool = True) -> None:
  """Raises naming ``name`` unless ``candidate`` (abstract) has the tree
  structure, shapes and (with ``dtypes``) dtypes of ``reference``."""
  ref_def = jax.tree_util.tree_structure(reference)
  cand_def = jax.tree_util.tree_structure(candidate)
  if ref_def != cand_def:  # type: ignore[operator]
    raise TypeError(f"`{name}`: {what} has tree structure {cand_def}, expected {ref_def}.")
  for i, (ref, cand) in enumerate(
    zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(candidate))
  ):
    if jnp.shape(ref) != cand.shape:
      raise ValueError(
        f"`{name}`: {what} has a leaf ({i}) of shape {cand.shape}, "
        f"expected {jnp.shape(ref)} (no broadcasting)."
      )
    if dtypes and jnp.result_type(ref) != cand.dtype:
      raise TypeError(
        f"`{name}`: {what} has a leaf ({i}) of dtype {cand.dtype}, "
        f"expected {jnp.result_type(ref)} (no silent cast)."
      )


def _check_scalar(name: str, what: str, out, kinds) -> None:
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"`{name}`: {what} must be a scalar, got shape {shape}.")
  if not any(jnp.issubdtype(out.dtype, kind) for kind in kinds):
    raise TypeError(
      f"`{name}`: {what} must be a real scalar of kind "
      f"{[k.__name__ for k in kinds]}, got dtype {out.dtype}."
    )


def _check_functions(
  hypergradient_fn, x0, x_dyn, as_x, y0, with_y, metrics_fn, projection, data
) -> tuple[bool, bool, tuple]:
  """Evaluates the user's functions abstractly on the initial point and checks
  their outputs, so that a wrong arity, output count, shape, structure or
  dtype is an error naming the function instead of a failure inside optax or
  JAX (or a silent broadcast or cast).

  Returns:
    ``(has_status, has_residual, metric_names)``.
  """
  keywords = "".join(f", {k}=..." for k in data)
  call = (
    f"hypergradient_fn(x0, y0{keywords})"
    if with_y
    else f"hypergradient_fn(x0{keywords}) (no `y0` given)"
  )
  y_dyn, y_rest = variables.partition(y0) if with_y else (None, None)
  as_y = lambda yd: variables.combine(yd, y_rest)
  out = _eval_shape(
    "hypergradient_fn",
    call,
    lambda xd, yd, d: _arrays_only(
      hypergradient_fn(as_x(xd), as_y(yd), **d) if with_y else hypergradient_fn(as_x(xd), **d)
    ),
    x_dyn,
    y_dyn,
    data,
  )
  value, grad, y_next, lower_status, lower_residual = upper_step.unpack(out, with_y)
  _check_scalar("hypergradient_fn", "its first output (the value phi(x))", value, (jnp.floating,))
  _check_like("hypergradient_fn", "its second output (the gradient in x)", x_dyn, grad)
  if lower_status is not None:
    _check_scalar("hypergradient_fn", "`solution.info.status`", lower_status, (jnp.integer,))
  if lower_residual is not None:
    _check_scalar("hypergradient_fn", "`solution.info.residual`", lower_residual, (jnp.floating,))
  if with_y:
    _check_like(
      "hypergradient_fn",
      "the lower solution y it returns (third output, or `solution.y`), which must be like `y0`,",
      _arrays_only(y0),
      y_next,
    )
  metric_names = ()
  if metrics_fn is not None:
    metrics = _eval_shape(
      "metrics_fn",
      "metrics_fn(x0, y)",
      lambda xd, yd: metrics_fn(as_x(xd), None if yd is None else as_y(yd)),
      x_dyn,
      y_next,
    )
    if not isinstance(metrics, dict):
      raise TypeError(
        f"`metrics_fn` must return a dict of named scalars, got {type(metrics).__name__}."
      )
    for key, val in metrics.items():
      if not isinstance(key, str):
        raise TypeError(f"`metrics_fn` must return a dict with str keys, got key {key!r}.")
      if key in _RESERVED:
        raise ValueError(
          f"`metrics_fn` returned the key {key!r}, which the history "
          f"already records; the reserved names are {_RESERVED}."
        )
      _check_scalar("metrics_fn", f"entry {key!r}", val, (jnp.floating, jnp.integer, jnp.bool_))
    metric_names = tuple(metrics)
  if projection is not None:
    if not callable(projection):
      raise TypeError(f"`projection` must be callable, got {type(projection).__name__}.")
    structure = []

    def project(xd):
      projected = projection(as_x(xd))
      structure.append(jax.tree_util.tree_structure(projected))
      return variables.partition(projected)[0]

    projected = _eval_shape("projection", "projection(x0)", project, x_dyn)
    expected = jax.tree_util.tree_structure(x0)
    if structure[0] != expected:
      raise TypeError(
        f"`projection` must return x with the structure of `x0`, got "
        f"{structure[0]}, expected {expected}."
      )
    _check_like("projection", "its output", x_dyn, projected, dtypes=False)
  return lower_status is not None, lower_residual is not None, metric_names


class _History:
  """Per-step records in NumPy chunks: 8 bytes an entry and key (a list of
  Python floats takes 32), allocated as steps complete."""

  CHUNK = 4096

  def __init__(self, dtypes: dict):
    self.dtypes = dtypes
    self.done: dict[str, list] = {k: [] for k in dtypes}
    self.tail = {k: np.empty(self.CHUNK, dtype) for k, dtype in dtypes.items()}
    self.fill = 0
    self.length = 0

  def extend(self, arrays: dict) -> None:
    n = {v.shape[0] for v in arrays.values()}
    assert set(arrays) == set(self.dtypes) and len(n) == 1 and self.fill == 0
    for k, v in arrays.items():
      self.done[k].append(np.asarray(v, self.dtypes[k]))
    self.length += n.pop()

  def append(self, record: dict) -> None:
    for k, v in record.items():
      self.tail[k][self.fill] = v
    self.fill += 1
    self.length += 1
    if self.fill == self.CHUNK:
      for k in self.tail:
        self.done[k].append(self.tail[k])
        self.tail[k] = np.empty(self.CHUNK, self.dtypes[k])
      self.fill = 0

  def arrays(self, n: int | None = None) -> dict:
    n = self.length if n is None else n
    return {k: np.concatenate(self.done[k] + [self.tail[k][: self.fill]])[:n] for k in self.dtypes}


def _physical_memory() -> int | None:
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def _check_steps(steps: int, num_keys: int) -> None:
  """Bounds ``steps`` by the history (``num_keys`` entries of 8 bytes per
  step) against the memory. The int32 bound (optax's step counters saturate
  at 2**31 - 1) is `validation.check_positive_int`'s, checked first."""
  needed, memory = 8 * steps * num_keys, _physical_memory()
  if memory is not None and needed > memory:
    raise ValueError(
      f"`steps` = {steps} needs {needed / 2**30:.1f} GiB for the history "
      f"({num_keys} entries of 8 bytes per step), more than this machine's "
      f"{memory / 2**30:.1f} GiB of memory. Run fewer steps per call "
      "(resume with `checkpoint_path` to go on)."
    )


def _load_history(path: str, meta: dict, done: int, dtypes: dict) -> dict:
  """The history arrays of a checkpoint, checked against this run's names."""
  stored = {k[len("history.") :]: v for k, v in meta.items() if k.startswith("history.")}
  if not stored and done == 0:
    return {k: np.zeros(0, dtype) for k, dtype in dtypes.items()}
  if set(stored) != set(dtypes):
    raise checkpointing.not_this_run(
      path,
      f"its history records {sorted(stored)}, this run records {sorted(dtypes)} "
      "(another method or `metrics_fn`)",
    )
  for k, v in stored.items():
    if v.shape != (done,) or not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
      raise checkpointing.not_this_run(
        path,
        f"its history {k!r} has shape {v.shape} and dtype {v.dtype}, expected "
        f"{done} numbers (one per completed step)",
      )
  return stored


def _data_source(data, key) -> Callable[[int], dict]:
  """``t -> dict of keywords`` for the step t hypergradient, from `optimize`'s ``data``."""
  if data is None:
    if key is not None:
      raise ValueError("`key` is only used with a sampler `data=(t, key) -> dict`.")
    return lambda t: {}
  if isinstance(data, dict):
    return lambda t: data
  if callable(data):
    if key is None:
      raise ValueError("a sampler `data=(t, key) -> dict` needs `key=` (a PRNG key).")

    def sample(t):
      out = data(t, jax.random.fold_in(key, t))
      if not isinstance(out, dict):
        raise TypeError(
          f"`data(t, key)` must return a dict of keywords for "
          f"`hypergradient_fn`, got {type(out).__name__} at step {t}."
        )
      return out

    return sample
  if hasattr(data, "__iter__") or hasattr(data, "__next__"):
    iterator = iter(data)

    def next_item(t):
      try:
        out = next(iterator)
      except StopIteration:
        raise ValueError(f"`data` ran out of items at upper step {t}.") from None
      if not isinstance(out, dict):
        raise TypeError(
          f"`data` must yield dicts of keywords for `hypergradient_fn`, "
          f"got {type(out).__name__} at step {t}."
        )
      return out

    return next_item
  raise TypeError(
    "`data` must be a dict, a sampler (t, key) -> dict or an iterator of "
    f"dicts, got {type(data).__name__}."
  )


class _ProgressBar:
  """A one-line text bar on ``log``, redrawn at most twice a second."""

  def __init__(self, total: int, log):
    self.total, self.log, self.start, self.drawn = total, log, time.perf_counter(), 0.0

  def update(self, done: int, value: float) -> None:
    now = time.perf_counter()
    if now - self.drawn < 0.5 and done < self.total:
      return
    self.drawn = now
    filled = int(30 * done / self.total)
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    print(
      f"\r  [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}  phi={value:.4g}"
      f"  {rate:.1f} steps/s  eta {eta:.0f} s",
      end="",
      file=self.log,
      flush=True,
    )

  def close(self) -> None:
    print(file=self.log, flush=True)


def optimize(
  hypergradient_fn: Callable,
  x0,
  optimizer: optax.GradientTransformation,
  *,
  steps: int,
  y0=None,
  warm_start: bool = False,
  warm_start_adjoint: bool = False,
  extrapolate: int = 0,
  projection: Callable | None = None,
  metrics_fn: Callable | None = None,
  data=None,
  key=None,
  callback: Callable | None = None,
  callback_every: int = 1,
  checkpoint_path: str | None = None,
  checkpoint_every: int = 100,
  resume: bool = True,
  log_every: int = 0,
  progress: bool = False,
  stop_on_nonfinite: bool = True,
  stop_on_inner_failure: bool = False,
  throw: bool = False,
  log=None,
) -> OptimizeSolution:
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
    warm_start_adjoint: as in `bilevel_jax.upper.make_step`: start each
      adjoint solve from the previous adjoint (a ``hypergradient_fn`` that
      takes ``v0=`` and returns ``solution.adjoint``, as
      `bilevel_jax.implicit.make_hypergradient` does). A resumed run
      restarts it from zeros.
    extrapolate: as in `bilevel_jax.upper.make_step`: 0, 1 or 2; start the
      lower (and adjoint) solves from the polynomial extrapolation of that
      degree of the last solutions. It changes the starting points only; a
      resumed run restarts it from the restored lower solution.
    projection: ``P_X(x) -> x`` applied after each update (see
      `bilevel_jax.projections`).
    metrics_fn: ``fn(x, y) -> dict of scalars`` recorded every step, inside
      the jitted step (y is None when there is none).
    data: what each step's ``hypergradient_fn`` takes besides (x, y0), as
      keywords: a dict (the same every step), a sampler ``(t, key) -> dict``
      called on the host at step t with ``jax.random.fold_in(key, t)`` (so a
      resumed run draws the same data), or an iterator of dicts (e.g. a data
      loader; a resumed run continues with its next item). Arrays may change
      from step to step, their shapes may not (the step is compiled once).
    key: PRNG key of a sampler ``data``.
    callback: ``callback(t, state, info)`` on the host after every
      ``callback_every``-th step: t steps done, the `UpperState` and the
      `UpperStepInfo` of step t (for the user's logger).
    callback_every: steps between callbacks.
    checkpoint_path: save (x, y0, opt_state, history) every
      ``checkpoint_every`` steps, at the end and on Ctrl-C (a Ctrl-C during a
      save is delivered once the file is complete); with ``resume=True`` an
      existing file there is loaded and the run continues from it. The path
      must be writable (checked before the first step).
    log_every: print a progress line every this many steps (0: never).
    progress: draw a one-line progress bar (updated at most twice a second)
      on ``log``.
    stop_on_nonfinite: stop when the value or gradient is not finite;
      ``info.status`` says so either way.
    stop_on_inner_failure: stop at the first step whose lower solve did not
      succeed; ``info`` and the history record it either way.
    throw: raise `bilevel_jax.SolverError` at the end when ``info.status``
      is not SUCCESS.
    log: a file-like object for progress (default stderr).

  Returns:
    `OptimizeSolution`.

  Raises:
    TypeError, ValueError: a bad argument, named: ``hypergradient_fn`` not
      returning (value, grad[, solution]) with a real scalar value and a
      gradient of exactly x's structure, shapes and dtypes (and, with
      ``y0``, a lower solution like ``y0``); ``metrics_fn`` not returning a
      dict of scalars (or reusing a history name); ``projection`` changing
      x's structure or shapes; ``steps`` beyond the bound above; an
      unwritable ``checkpoint_path``.
    bilevel_jax.CheckpointError: (a ValueError) the file
      at ``checkpoint_path`` is not a checkpoint of this run (unreadable,
      truncated, foreign, another structure or dtype, a negative step).
    SolverError: with ``throw=True``, when ``info.status`` is not SUCCESS.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from bilevel_jax import implicit, upper
    >>> f = lambda lam, y: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * lam * jnp.sum(y ** 2)
    >>> F = lambda lam, y: 0.5 * jnp.sum((y - 0.25) ** 2)   # best lam = 3
    >>> hg = implicit.make_hypergradient(F, f, solver="newton")
    >>> sol = upper.optimize(hg, 1.0, optax.sgd(20.0), steps=200, y0=jnp.zeros(2))
    >>> round(float(sol.x), 3), int(sol.info.status), int(sol.history["lower_status"].max())
    (3.0, 0, 0)
  """
  steps = validation.check_positive_int(
    "steps", steps, why="optax's step counters are int32 and stop advancing there"
  )
  if not callable(hypergradient_fn):
    raise TypeError("`hypergradient_fn` must be callable.")
  for name, flag in (
    ("warm_start", warm_start),
    ("warm_start_adjoint", warm_start_adjoint),
    ("resume", resume),
    ("progress", progress),
    ("stop_on_nonfinite", stop_on_nonfinite),
    ("stop_on_inner_failure", stop_on_inner_failure),
    ("throw", throw),
  ):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
  if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)):
    raise TypeError(
      f"`log_every` must be an int >= 0 (0: no progress lines), got "
      f"{log_every!r} of type {type(log_every).__name__}."
    )
  if log_every < 0:
    raise ValueError(f"`log_every` must be >= 0 (0: no progress lines), got {log_every}.")
  if callback is not None:
    if not callable(callback):
      raise TypeError(f"`callback` must be callable, got {type(callback).__name__}.")
    validation.check_positive_int("callback_every", callback_every)
  for name, flag in (("warm_start", warm_start), ("warm_start_adjoint", warm_start_adjoint)):
    if flag and y0 is None:
      raise ValueError(f"`{name}=True` needs `y0`.")
  if checkpoint_path is not None:
    validation.check_positive_int("checkpoint_every", checkpoint_every)
  variables.check("x0", x0)
  stepper = upper_step.make_step(
    hypergradient_fn,
    optimizer,
    projection=projection,
    warm_start=bool(warm_start),
    metrics_fn=metrics_fn,
    warm_start_adjoint=bool(warm_start_adjoint),
    extrapolate=extrapolate,
  )
  draw = _data_source(data, key)
  log = sys.stderr if log is None else log
  with_y = y0 is not None
  x0 = upper_step.canonical(x0)
  if with_y:
    try:
      y0 = variables.arrays_as_jax(y0)  # an Equinox module's functions stay
    except TypeError as err:
      raise TypeError(f"`y0` must be a pytree of arrays: {err}") from err
  y_rest = variables.partition(y0)[1] if with_y else None
  as_y = lambda yd: None if yd is None else variables.combine(yd, y_rest)
  y_dyn = lambda y: None if y is None else variables.partition(y)[0]
  x0_dyn, x_rest = variables.partition(x0)
  as_x = lambda xd: variables.combine(xd, x_rest)
  state = stepper.init(x0, y0)
  if checkpoint_path is not None:
    checkpointing.check_writable(checkpoint_path)
    checkpointing.remove_stale_temporaries(checkpoint_path)
  meta = None
  if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
    templates = {"x": x0_dyn, "opt_state": state.opt_state}
    if with_y:
      templates["y"] = y_dyn(y0)
      templates["y_last"] = y_dyn(y0)
    trees, meta = checkpointing.load(checkpoint_path, templates)
    if meta["step"] > steps:
      raise ValueError(
        f"checkpoint {checkpoint_path!r} is at step {meta['step']}, beyond "
        f"`steps` = {steps}; raise `steps` or use another path."
      )
    # The adjoint and extrapolation history are starting points only: they
    # restart from the restored lower solution, not from the checkpoint.
    state = stepper.init(x0, as_y(trees["y"]) if with_y else None)._replace(
      x=as_x(trees["x"]),
      opt_state=trees["opt_state"],
      y=as_y(trees["y_last"]) if with_y else None,
      step=jnp.asarray(meta["step"], jnp.int32),
    )
  first_step = int(state.step)
  pending = draw(first_step) if first_step < steps else {}
  has_status, has_residual, metric_names = _check_functions(
    hypergradient_fn, x0, x0_dyn, as_x, y0, with_y, metrics_fn, projection, pending
  )
  history_dtypes: dict[str, Any] = {"value": np.float64, "grad_norm": np.float64}
  if has_status:
    history_dtypes["lower_status"] = np.int64
  if has_residual:
    history_dtypes["lower_residual"] = np.float64
  history_dtypes.update({k: np.float64 for k in metric_names})
  history_dtypes["step_time"] = np.float64
  _check_steps(steps, len(history_dtypes))
  history = _History(history_dtypes)
  if meta is not None:
    history.extend(_load_history(str(checkpoint_path), meta, first_step, history_dtypes))
  resumed_from = int(state.step)

  def save(state):
    if checkpoint_path is None:
      return
    completed = int(state.step)
    trees = {"x": variables.partition(state.x)[0], "opt_state": state.opt_state}
    if with_y:
      trees["y"] = y_dyn(state.y0)
      trees["y_last"] = y_dyn(state.y)
    meta = {"step": np.int64(completed)}
    meta.update({f"history.{k}": v for k, v in history.arrays(completed).items()})
    checkpointing.save(checkpoint_path, trees, meta)

  # The non-array leaves of x and y (an Equinox module's functions) stay out
  # of jit: `split` keeps the arrays of an UpperState, `join` puts them back.
  def split(state):
    ys = None if state.history is None else tuple(map(y_dyn, state.history[0]))
    return variables.partition(state.x)[0], (
      state.opt_state,
      y_dyn(state.y0),
      y_dyn(state.y),
      state.step,
      state.v0,
      state.adjoint,
      None if state.history is None else (ys, state.history[1]),
    )

  def join(x_d, rest_of_state):
    opt_state, y0_d, y_d, count, v0, adjoint, history = rest_of_state
    if history is not None:
      history = (tuple(map(as_y, history[0])), history[1])
    return upper_step.UpperState(
      as_x(x_d), opt_state, as_y(y0_d), as_y(y_d), count, v0, adjoint, history
    )

  def array_step(x_dyn, rest_of_state, batch):
    new, step_info = stepper.step(join(x_dyn, rest_of_state), **batch)
    x_new, rest_new = split(new)
    return x_new, rest_new, step_info

  compile_start = time.perf_counter()
  compiled = jax.jit(array_step).lower(*split(state), pending).compile()
  compile_time = time.perf_counter() - compile_start

  lower_codes = history.arrays()["lower_status"] if has_status else np.zeros(0, np.int64)
  inner_failures = int(np.sum(lower_codes != status_lib.SUCCESS))
  failed_codes = lower_codes[lower_codes != status_lib.SUCCESS]
  inner_status = int(failed_codes[0]) if failed_codes.size else status_lib.SUCCESS
  nonfinite = False
  bar = _ProgressBar(steps, log) if progress else None
  try:
    for t in range(resumed_from, steps):
      batch = pending if t == first_step else draw(t)
      tic = time.perf_counter()
      x_new, rest_new, step_info = compiled(*split(state), batch)
      jax.block_until_ready((x_new, step_info))
      new_state = join(x_new, rest_new)
      elapsed = time.perf_counter() - tic
      metrics: dict[str, Any] = {
        "value": float(step_info.value),
        "grad_norm": float(step_info.grad_norm),
      }
      if has_status:
        metrics["lower_status"] = int(step_info.lower_status)
      if has_residual:
        metrics["lower_residual"] = float(step_info.lower_residual)
      metrics.update({k: float(v) for k, v in step_info.metrics.items()})
      metrics["step_time"] = elapsed
      history.append(metrics)
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
      state = new_state
      if log_every and ((t + 1) % log_every == 0 or t + 1 == steps):
        lower = ""
        if "lower_status" in metrics:
          lower = f"  lower: {status_lib.Status(metrics['lower_status']).name}"
        print(
          f"  upper step {t + 1:>6d}/{steps}  phi={metrics['value']:.6g}  "
          f"|grad|={metrics['grad_norm']:.3g}  {1e3 * elapsed:.2f} ms/step{lower}",
          file=log,
          flush=True,
        )
      if bar is not None:
        bar.update(t + 1, metrics["value"])
      if callback is not None and (t + 1) % callback_every == 0:
        callback(t + 1, state, step_info)
      if checkpoint_path is not None and (t + 1) % checkpoint_every == 0:
        save(state)
  except KeyboardInterrupt:
    save(state)
    raise
  finally:
    if bar is not None:
      bar.close()
  save(state)
  completed = int(state.step)
  status = (
    status_lib.NONFINITE
    if nonfinite
    else (status_lib.INNER_FAILED if inner_failures else status_lib.SUCCESS)
  )
  info = OptimizeInfo(
    num_steps=np.asarray(completed),
    status=np.asarray(status, np.int32),
    inner_status=np.asarray(inner_status, np.int32),
    inner_failures=np.asarray(inner_failures),
    resumed_from=np.asarray(resumed_from),
    compile_time=np.asarray(compile_time),
  )
  status_lib.raise_if_failed(info.status, throw=throw, where="upper.optimize")
  return OptimizeSolution(
    x=state.x, y=state.y, opt_state=state.opt_state, history=history.arrays(), info=info
  )
