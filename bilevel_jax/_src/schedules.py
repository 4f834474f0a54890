"""Aggregation schedules k -> alpha_k for BDA (eq. 10 of Liu et al., 2020).

A schedule is any callable taking the 1-based iteration index ``k`` (an int
array) and returning alpha_k in [0, 1]. The step from y_{k-1} to y_k uses
alpha_k, so a K-step run reads alpha_1, ..., alpha_K.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from bilevel_jax._src import validation

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
"""A schedule ``k -> alpha_k``: takes the 1-based iteration index ``k`` (an int
array of any shape) and returns alpha_k in [0, 1] of the same shape, a float
array. The ``alpha`` argument of `bilevel_jax.bda.solve` accepts any such
callable (it is static: a new callable recompiles) as well as a number.
"""


def constant(value: float) -> Schedule:
  """alpha_k = value. ``value = 0`` gives RHG (plain unrolled descent).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import schedules
    >>> [float(a) for a in schedules.constant(0.5)(jnp.arange(1, 4))]
    [0.5, 0.5, 0.5]
  """
  validation.check_in_unit_interval("value", value)

  def schedule(k):
    return jnp.full(jnp.shape(k), value, dtype=jnp.result_type(float))

  return schedule


def harmonic(c: float) -> Schedule:
  """alpha_k = c / k, the adaptive choice of Section 5.1 (c = 0.5 or 0.9).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import schedules
    >>> [round(float(a), 4) for a in schedules.harmonic(0.9)(jnp.arange(1, 4))]
    [0.9, 0.45, 0.3]
  """
  validation.check_in_unit_interval("c", c)

  def schedule(k):
    return c / jnp.asarray(k, dtype=jnp.result_type(float))

  return schedule


def geometric(alpha0: float, decay: float) -> Schedule:
  """alpha_k = alpha0 * decay**(k - 1) (the decay used by some toolboxes).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import schedules
    >>> [round(float(a), 4) for a in schedules.geometric(0.5, 0.9)(jnp.arange(1, 4))]
    [0.5, 0.45, 0.405]
  """
  validation.check_in_unit_interval("alpha0", alpha0)
  validation.check_in_unit_interval("decay", decay)

  def schedule(k):
    return alpha0 * decay ** (jnp.asarray(k, dtype=jnp.result_type(float)) - 1)

  return schedule


def theorem2_beta(upper_lr: float, sigma: float, smoothness: float) -> float:
  """beta = sqrt(1 - 2 s_u sigma L_F / (sigma + L_F)) (Proposition 1).

  Requires 0 < s_u <= 2 / (L_F + sigma), where sigma is the strong convexity
  and L_F the smoothness constant of F(x, .).

  Examples:
    >>> from bilevel_jax import schedules
    >>> round(schedules.theorem2_beta(0.4, sigma=1.0, smoothness=2.0), 4)
    0.6831
  """
  for name, value in (("upper_lr", upper_lr), ("sigma", sigma), ("smoothness", smoothness)):
    validation.check_positive(name, value)
  if sigma > smoothness:
    raise ValueError(f"`sigma` ({sigma}) cannot exceed `smoothness` ({smoothness}).")
  limit = 2.0 / (smoothness + sigma)
  if upper_lr > limit * (1 + 1e-12):
    raise ValueError(
      f"`upper_lr` must be <= 2 / (smoothness + sigma) = {limit:.6g} for Theorem 2, got {upper_lr}."
    )
  return math.sqrt(max(0.0, 1.0 - 2.0 * upper_lr * sigma * smoothness / (sigma + smoothness)))


def theorem2(
  *, upper_lr: float, sigma: float, smoothness: float, gamma: float = 1.0, epsilon: float = 1e-2
) -> Schedule:
  """alpha_k = min(2 gamma / (k (1 - beta)), 1 - epsilon) (Prop. 1, Thm. 2).

  The constants are Python numbers checked when the schedule is built (so
  this factory cannot be vmapped over them; vmap over a constant alpha
  instead). Theorem 2 also needs s_l <= 1 / L_f for the lower step.

  Args:
    upper_lr: s_u, the upper step size used inside the lower iterations.
    sigma: strong-convexity modulus of F(x, .).
    smoothness: L_F, the Lipschitz constant of grad_y F(x, .).
    gamma: in (0, 1].
    epsilon: in (0, 1); caps alpha_k at 1 - epsilon.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import schedules
    >>> alpha = schedules.theorem2(upper_lr=0.4, sigma=1.0, smoothness=2.0, gamma=0.5)
    >>> [round(float(a), 4) for a in alpha(jnp.array([1, 10, 100]))]
    [0.99, 0.3156, 0.0316]
  """
  if not 0 < gamma <= 1:
    raise ValueError(f"`gamma` must lie in (0, 1], got {gamma}.")
  if not 0 < epsilon < 1:
    raise ValueError(f"`epsilon` must lie in (0, 1), got {epsilon}.")
  beta = theorem2_beta(upper_lr, sigma, smoothness)
  if beta >= 1.0:
    raise ValueError(
      f"beta rounds to 1 for `upper_lr` = {upper_lr} and `sigma` = {sigma}: "
      "alpha_k would be infinite; increase them."
    )
  scale = 2.0 * gamma / (1.0 - beta)

  def schedule(k):
    k = jnp.asarray(k, dtype=jnp.result_type(float))
    return jnp.minimum(scale / k, 1.0 - epsilon)

  return schedule


def as_schedule(alpha) -> tuple[Schedule, bool]:
  """Turns the ``alpha`` argument of `bda.solve` into a schedule.

  Returns the schedule and whether it is statically zero (RHG), in which case
  the solver skips the upper-level gradient inside the lower iterations.
  """
  if isinstance(alpha, bool):
    raise TypeError("`alpha` must be a number in [0, 1] or a callable, got a bool.")
  if callable(alpha):
    return alpha, False
  concrete = validation.concrete_value(alpha)
  if concrete is not None:
    if not np.issubdtype(concrete.dtype, np.number):
      raise TypeError(
        f"`alpha` must be a number in [0, 1] or a callable k -> alpha_k "
        f"(e.g. `bilevel_jax.schedules.harmonic(0.5)` for 0.5 / k), got "
        f"{alpha!r}."
      )
    if concrete.shape != ():
      raise ValueError(
        f"`alpha` must be a scalar or a callable k -> alpha_k, "
        f"got an array of shape {concrete.shape}."
      )
    validation.check_in_unit_interval("alpha", concrete)
    is_zero = bool(concrete == 0)
  else:
    is_zero = False

  def schedule(k):
    return jnp.broadcast_to(jnp.asarray(alpha), jnp.shape(k))

  return schedule, is_zero
