"""Proximal operators for the nonsmooth lower level f + g (BDA eq. 12-13).

A prox is a callable ``prox(x, y, step)`` returning

    prox_{step * g(x, .)}(y) = argmin_z g(x, z) + ||z - y||^2 / (2 step),

so ``g`` may depend on the upper variable x (for example an l1 weight that is
a hyperparameter). The built-in operators are differentiable almost
everywhere, so reverse mode through the unrolled iterations works.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bilevel_jax._src import projections
from bilevel_jax._src import validation

Prox = Callable[[Any, Any, Any], Any]
"""A proximal operator ``prox(x, y, step) -> z``: prox_{step * g(x, .)}(y) for a
convex g that may depend on the upper variable x; z has the structure,
shapes and dtypes of the pytree y. The ``prox=`` argument of
`bilevel_jax.bda.solve` (proximal BDA, eq. 12-13) takes any such callable.
"""


def l1(strength) -> Prox:
  """prox of g(y) = strength * ||y||_1: soft thresholding.

  Args:
    strength: a nonnegative number, or a callable ``x -> strength`` so that
      the regularization weight can be an upper-level variable.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import prox
    >>> prox.l1(0.5)(None, jnp.array([-2.0, 0.2, 1.0]), 1.0).tolist()
    [-1.5, 0.0, 0.5]
    >>> weighted = prox.l1(lambda x: x["lam"])    # the weight is read from x
    >>> weighted({"lam": 0.25}, jnp.array([-2.0, 0.2, 1.0]), 2.0).tolist()
    [-1.5, 0.0, 0.5]
  """
  if not callable(strength):
    concrete = validation.concrete_value(strength)
    if concrete is not None and not (concrete >= 0).all():
      raise ValueError(f"`strength` must be >= 0, got {strength}.")

  def prox(x, y, step):
    lam = strength(x) if callable(strength) else strength

    def soft(v):
      threshold = step * lam
      return (jnp.sign(v) * jnp.maximum(jnp.abs(v) - threshold, 0)).astype(v.dtype)

    return jax.tree_util.tree_map(soft, y)

  return prox


def from_projection(projection: projections.Projection) -> Prox:
  """prox of the indicator of a closed convex set is its projection.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import projections, prox
    >>> p = prox.from_projection(projections.nonnegative())
    >>> p(None, jnp.array([-1.0, 2.0]), 0.1).tolist()    # x and step are ignored
    [0.0, 2.0]
  """

  def prox(x, y, step):
    del x, step
    return projection(y)

  return prox


def box(lower, upper) -> Prox:
  """prox of the indicator of {lower <= y <= upper}.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import prox
    >>> prox.box(0.0, 1.0)(None, jnp.array([-2.0, 0.5, 1.5]), 0.1).tolist()
    [0.0, 0.5, 1.0]
  """
  return from_projection(projections.box(lower, upper))


def nonnegative() -> Prox:
  """prox of the indicator of {y >= 0}.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import prox
    >>> prox.nonnegative()(None, jnp.array([-1.0, 2.0]), 0.1).tolist()
    [0.0, 2.0]
  """
  return from_projection(projections.nonnegative())


def l2_ball(radius: float) -> Prox:
  """prox of the indicator of {||y|| <= radius}.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import prox
    >>> [round(v, 4) for v in prox.l2_ball(1.0)(None, jnp.array([3.0, 4.0]), 0.1).tolist()]
    [0.6, 0.8]
  """
  return from_projection(projections.l2_ball(radius))
