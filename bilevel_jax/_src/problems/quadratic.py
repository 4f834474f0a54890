"""A strongly convex quadratic bilevel problem with closed-form answers.

    f(x, y) = y^T A y / 2 - y^T B x,        A symmetric positive definite,
    F(x, y) = ||y - c||^2 / 2 + rho ||x||^2 / 2.

y*(x) = A^{-1} B x, and the hypergradient of phi(x) = F(x, y*(x)) is

    grad phi(x) = (A^{-1} B)^T (A^{-1} B x - c) + rho x.

The problem is a NamedTuple of arrays, hence a pytree: it can be vmapped over
(a batch of problems) and its methods used as the objectives.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QuadraticProblem(NamedTuple):
  """f(x, y) = y^T A y / 2 - y^T B x and F(x, y) = ||y - c||^2 / 2 + rho ||x||^2 / 2.

  ``upper`` and ``lower`` are the objectives; ``solution``, ``value`` and
  ``hypergradient`` the closed forms y*(x), phi(x) and grad phi(x).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> prob = problems.QuadraticProblem(A=jnp.eye(2), B=jnp.eye(2), c=jnp.ones(2),
    ...                                  rho=jnp.asarray(0.5))
    >>> x = jnp.array([2.0, 0.0])
    >>> prob.solution(x).tolist(), float(prob.value(x))
    ([2.0, 0.0], 2.0)
    >>> prob.hypergradient(x).tolist()       # (y* - c) + rho x
    [2.0, -1.0]
  """

  A: jax.Array
  B: jax.Array
  c: jax.Array
  rho: jax.Array

  def upper(self, x, y):
    return 0.5 * jnp.sum((y - self.c) ** 2) + 0.5 * self.rho * jnp.sum(x**2)

  def lower(self, x, y):
    return 0.5 * y @ (self.A @ y) - y @ (self.B @ x)

  def solution(self, x):
    """y*(x) = A^{-1} B x."""
    return jnp.linalg.solve(self.A, self.B @ x)

  def value(self, x):
    return self.upper(x, self.solution(x))

  def hypergradient(self, x):
    """Closed-form grad phi(x)."""
    jac = jnp.linalg.solve(self.A, self.B)
    return jac.T @ (jac @ x - self.c) + self.rho * x

  def lower_smoothness(self):
    """L_f = largest eigenvalue of A (so s_l = 1 / L_f is a safe step)."""
    return jnp.linalg.eigvalsh(self.A)[-1]


def make_quadratic(
  key, *, dim_x: int = 5, dim_y: int = 10, condition: float = 10.0, rho: float = 0.1, dtype=None
) -> QuadraticProblem:
  """Random instance with eigenvalues of A spread in [1, condition].

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> prob = problems.make_quadratic(jax.random.PRNGKey(0), dim_x=2, dim_y=3,
    ...                                condition=4.0)
    >>> prob.A.shape, prob.B.shape, round(float(prob.lower_smoothness()), 4)
    ((3, 3), (3, 2), 4.0)
    >>> y = prob.solution(jnp.array([1.0, -1.0]))   # grad_y f(x, y*) = A y* - B x = 0
    >>> bool(jnp.allclose(prob.A @ y, prob.B @ jnp.array([1.0, -1.0]), atol=1e-5))
    True
  """
  dtype = dtype or jnp.result_type(float)
  k1, k2, k3 = jax.random.split(key, 3)
  q, _ = jnp.linalg.qr(jax.random.normal(k1, (dim_y, dim_y), dtype))
  eigs = jnp.linspace(1.0, condition, dim_y, dtype=dtype)
  A = (q * eigs[None, :]) @ q.T
  A = 0.5 * (A + A.T)
  B = jax.random.normal(k2, (dim_y, dim_x), dtype) / jnp.sqrt(dim_x)
  c = jax.random.normal(k3, (dim_y,), dtype)
  return QuadraticProblem(A=A, B=B, c=c, rho=jnp.asarray(rho, dtype))
