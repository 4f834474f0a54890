"""The one status enumeration of every solver, its messages, and ``throw=``.

Every entry point returns a ``*Solution`` whose ``info.status`` is an int32
array holding one of the codes below; the same integer means the same thing
in every module (BDA, implicit, composite, value functions, gradient
sampling, the upper loop).  A failure is data, not an exception: under
``jax.vmap`` one lane may fail while the others succeed, and a driver that
calls an inner solver records the inner status instead of stopping.

``throw=True`` (on every entry point; default ``False``) turns a status other
than ``SUCCESS`` into a `SolverError` that names the entry point, the code
and its message:

* called eagerly (the status is a concrete array), the error is raised at
  once, as a `SolverError`;
* under ``jax.jit`` (the status is traced), the check runs on the host when
  the program runs (`jax.debug.callback`); the runtime reports it as a
  ``JaxRuntimeError`` whose message contains the `SolverError` text.  Under
  ``jax.vmap`` it raises when any lane failed.

We chose a host callback over `equinox.error_if` (no new dependency; same
behaviour under jit) and over `jax.experimental.checkify` (which would make
every caller wrap its function in ``checkify.checkify``).  The default is
``False`` because the library's callers are jit-compiled training loops that
vmap over tasks: an exception there loses every lane's result, and the
drivers (`bilevel_jax.upper.optimize`, gradient sampling, `solve_vfp`) need
the inner status to report it.  Check ``info.status`` or pass ``throw=True``.

Examples:
  >>> import jax.numpy as jnp
  >>> from bilevel_jax import Status, status_message
  >>> int(Status.MAX_STEPS), status_message(jnp.array(1))
  (1, 'max_steps reached before the tolerance was met; raise max_steps or loosen tol')
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np


class Status(enum.IntEnum):
  """Status codes of ``info.status`` (the same integers in every module)."""

  SUCCESS = 0
  MAX_STEPS = 1
  NONFINITE = 2
  LINESEARCH_FAILED = 3
  INACCURATE = 4
  NOT_STATIONARY = 5
  INNER_FAILED = 6
  INVALID_INPUT = 7
  DIVERGED = 8
  NOT_CONVEX = 9


MESSAGES = {
  Status.SUCCESS: "success",
  Status.MAX_STEPS: "max_steps reached before the tolerance was met; raise max_steps or loosen tol",
  Status.NONFINITE: "a value, gradient or iterate became NaN or infinite; check the "
  "objectives and reduce the step sizes",
  Status.LINESEARCH_FAILED: "the line search found no decrease before the tolerance "
  "was met (tol below what rounding allows?)",
  Status.INACCURATE: "the error estimate (quadrature, approximation) is above tol; "
  "refine the rule or raise mu",
  Status.NOT_STATIONARY: "the final point is not stationary to the tolerance "
  "(KKT residual above kkt_tol)",
  Status.INNER_FAILED: "an inner solve failed; info.inner_status holds its code",
  Status.INVALID_INPUT: "an argument known only at run time (a traced step size, alpha, "
  "mu, eps, ...) is outside its valid range; the solve was not "
  "trusted (see the entry point's docstring for the ranges)",
  Status.DIVERGED: "the lower iterations did not settle: the lower residual did not "
  "shrink and the lower objective does not curve up between the "
  "first and the last iterate; is the lower level bounded below?",
  Status.NOT_CONVEX: "a direction of zero or negative curvature of the lower objective "
  "at the solution (a saddle point, a maximum or a singular "
  "Hessian): the lower level is not strongly convex there, so the "
  "implicit derivative does not apply",
}

# Python ints, for use in jnp.where inside traced code.
SUCCESS = int(Status.SUCCESS)
MAX_STEPS = int(Status.MAX_STEPS)
NONFINITE = int(Status.NONFINITE)
LINESEARCH_FAILED = int(Status.LINESEARCH_FAILED)
INACCURATE = int(Status.INACCURATE)
NOT_STATIONARY = int(Status.NOT_STATIONARY)
INNER_FAILED = int(Status.INNER_FAILED)
INVALID_INPUT = int(Status.INVALID_INPUT)
DIVERGED = int(Status.DIVERGED)
NOT_CONVEX = int(Status.NOT_CONVEX)


class SolverError(RuntimeError):
  """Raised by ``throw=True`` when a solve ends with a status other than SUCCESS."""


def status_message(status) -> str:
  """The message of a status code (a concrete int or 0-d array)."""
  code = int(np.asarray(status))
  try:
    return MESSAGES[Status(code)]
  except ValueError:
    return f"unknown status {code}"


def _describe(where: str, status: np.ndarray) -> str:
  codes = sorted({int(c) for c in np.ravel(status) if int(c) != SUCCESS})
  parts = []
  for code in codes:
    try:
      parts.append(f"{Status(code).name} ({code}): {MESSAGES[Status(code)]}")
    except ValueError:
      parts.append(f"unknown status {code}")
  lanes = "" if status.ndim == 0 else f" in {int(np.sum(status != SUCCESS))} of {status.size} lanes"
  return f"`{where}` failed{lanes}: " + "; ".join(parts)


def _raise_on_failure(where: str, status) -> None:
  status = np.asarray(status)
  if np.any(status != SUCCESS):
    raise SolverError(_describe(where, status))


def raise_if_failed(status, *, throw: bool, where: str) -> None:
  """With ``throw``, raises `SolverError` unless ``status`` is SUCCESS.

  Eagerly (a concrete status) the error is raised here; under a
  transformation the check is a `jax.debug.callback` that raises when the
  program runs.  ``where`` names the entry point in the message.
  """
  if not isinstance(throw, (bool, np.bool_)):
    raise TypeError(f"`throw` must be a bool, got {throw!r}.")
  if not throw:
    return
  if isinstance(status, jax.core.Tracer):
    jax.debug.callback(lambda s: _raise_on_failure(where, s), status)
  else:
    _raise_on_failure(where, status)


def with_inner(status, inner_status):
  """The driver's status: its own failure first, else INNER_FAILED when the
  inner solve failed, else SUCCESS."""
  status = jnp.asarray(status, jnp.int32)
  inner_status = jnp.asarray(inner_status, jnp.int32)
  return jnp.where((status == SUCCESS) & (inner_status != SUCCESS), INNER_FAILED, status).astype(
    jnp.int32
  )


def unless_invalid(valid, status):
  """INVALID_INPUT where the run-time argument check ``valid`` fails, else
  ``status``: an out-of-range argument outranks whatever the solve reports."""
  return jnp.where(jnp.asarray(valid), jnp.asarray(status, jnp.int32), INVALID_INPUT).astype(
    jnp.int32
  )


def first_failure(current, new):
  """Keeps the first non-SUCCESS code of a sequence of inner statuses."""
  current = jnp.asarray(current, jnp.int32)
  return jnp.where(current == SUCCESS, jnp.asarray(new, jnp.int32), current)


def of(solution_or_status):
  """``info.status`` of a solution, or the status itself."""
  info = getattr(solution_or_status, "info", None)
  if info is not None and hasattr(info, "status"):
    return info.status
  return solution_or_status
