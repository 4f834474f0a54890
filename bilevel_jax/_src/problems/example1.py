"""Example 1 of Liu et al. (2020), eq. (5): the counterexample without LLS.

    min_{x in [-100, 100]} F(x, y) = (x - y_2)^2 / 2 + (y_1 - 1)^2 / 2
    s.t. y in argmin_y f(x, y) = y_1^2 / 2 - x y_1.

S(x) = {(x, t) : t in R} is not a singleton; the optimistic solution is
x* = 1, y* = (1, 1) with F* = 0. RHG (alpha = 0) never moves y_2 from its
initial value, so it converges to the wrong x (x = 1.5 from y0 = (2, 2)).

Examples:
  >>> import jax.numpy as jnp
  >>> from bilevel_jax.problems import example1
  >>> float(example1.upper(1.0, jnp.array([1.0, 1.0])))      # F* = 0 at (x*, y*)
  0.0
  >>> float(example1.lower(2.0, jnp.array([2.0, 5.0]))), float(example1.lower_value(2.0))
  (-2.0, -2.0)
"""

from __future__ import annotations

import jax.numpy as jnp

from bilevel_jax._src import projections

X_STAR = 1.0
Y_STAR = (1.0, 1.0)
X_BOUNDS = (-100.0, 100.0)


def upper(x, y):
  """F(x, y) = (x - y_2)^2 / 2 + (y_1 - 1)^2 / 2.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax.problems import example1
    >>> float(example1.upper(1.5, jnp.array([2.0, 2.0])))
    0.625
  """
  return 0.5 * (x - y[1]) ** 2 + 0.5 * (y[0] - 1.0) ** 2


def lower(x, y):
  """f(x, y) = y_1^2 / 2 - x y_1.

  Examples:
    Y_2 does not enter: every y = (x, t) is a minimizer:


    >>> import jax.numpy as jnp
    >>> from bilevel_jax.problems import example1
    >>> [float(example1.lower(1.0, jnp.array([1.0, t]))) for t in (5.0, -3.0)]
    [-0.5, -0.5]
  """
  return 0.5 * y[0] ** 2 - x * y[0]


def lower_value(x):
  """f*(x) = min_y f(x, y) = -x^2 / 2.

  Examples:
    >>> from bilevel_jax.problems import example1
    >>> example1.lower_value(3.0)
    -4.5
  """
  return -0.5 * x**2


def projection():
  """Projection onto X = [-100, 100].

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax.problems import example1
    >>> float(example1.projection()(jnp.asarray(250.0)))
    100.0
  """
  return projections.box(*X_BOUNDS)


def metrics(x, y):
  """The four measures of Figures 1-3.

  |F - F*| with F* = 0; |f - f*| is the lower optimality gap
  f(x, y) - min_y f(x, y) at the current x; relative squared errors of x and y.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax.problems import example1
    >>> m = example1.metrics(1.5, jnp.array([1.0, 2.0]))
    >>> {k: round(float(v), 4) for k, v in m.items()}
    {'F_gap': 0.125, 'f_gap': 0.125, 'x_err': 0.25, 'y_err': 0.5}
  """
  y_star = jnp.asarray(Y_STAR, dtype=jnp.result_type(y))
  return {
    "F_gap": jnp.abs(upper(x, y)),
    "f_gap": jnp.abs(lower(x, y) - lower_value(x)),
    "x_err": (x - X_STAR) ** 2 / X_STAR**2,
    "y_err": jnp.sum((y - y_star) ** 2) / jnp.sum(y_star**2),
  }
