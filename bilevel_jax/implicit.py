"""Implicit hypergradients for smooth, strongly convex lower levels.

    sol = implicit.solve(f, x, y0)                     # y*(x) = argmin_y f(x, y)
    sol.y, sol.info                                    # y* differentiable in x
    value, grad = implicit.hypergradient(F, f, x, y0)  # phi(x) = F(x, y*(x))
    sol = implicit.hypergradient_at(F, f, x, y)        # at a y you trained yourself
    value, grad, sol = implicit.hypergradient(F, f, x, y_prev, v0=v_prev,
                                              return_info=True)  # warm starts: sol.y, sol.adjoint

The derivative solves hess_yy f(x, y*) v = y-bar (conjugate gradients on
Hessian-vector products, or dense) and returns -(d_x grad_y f)^T v; the
lower solver's iterations are never differentiated. See
`bilevel_jax._src.implicit.solver` for the equations and
`bilevel_jax._src.implicit_diff` for the rule shared with `composite` and
`value.quadratic`.
"""

from bilevel_jax._src.implicit.at_solution import ADJOINTS
from bilevel_jax._src.implicit.at_solution import AdjointInfo
from bilevel_jax._src.implicit.at_solution import AdjointSolution
from bilevel_jax._src.implicit.at_solution import hypergradient_at
from bilevel_jax._src.implicit.minimize import SOLVERS
from bilevel_jax._src.implicit.solver import IMPLICIT_LINEAR_SOLVERS as LINEAR_SOLVERS
from bilevel_jax._src.implicit.solver import PRECONDITIONERS
from bilevel_jax._src.implicit.solver import ImplicitInfo
from bilevel_jax._src.implicit.solver import ImplicitSolution
from bilevel_jax._src.implicit.solver import hypergradient
from bilevel_jax._src.implicit.solver import make_hypergradient
from bilevel_jax._src.implicit.solver import solve

__all__ = [
  "ADJOINTS",
  "AdjointInfo",
  "AdjointSolution",
  "ImplicitInfo",
  "ImplicitSolution",
  "LINEAR_SOLVERS",
  "PRECONDITIONERS",
  "SOLVERS",
  "hypergradient",
  "hypergradient_at",
  "make_hypergradient",
  "solve",
]
