"""Implicit hypergradients for smooth, strongly convex lower levels.

    sol = implicit.solve(f, x, y0)                     # y*(x) = argmin_y f(x, y)
    sol.y, sol.info                                    # y* differentiable in x
    value, grad = implicit.hypergradient(F, f, x, y0)  # phi(x) = F(x, y*(x))

The derivative solves hess_yy f(x, y*) v = y-bar (conjugate gradients on
Hessian-vector products, or dense) and returns -(d_x grad_y f)^T v; the
lower solver's iterations are never differentiated. See
`bilevel_jax._src.implicit.solver` for the equations.
"""
from bilevel_jax._src.implicit.linear import LINEAR_SOLVERS
from bilevel_jax._src.implicit.minimize import SOLVERS
from bilevel_jax._src.implicit.solver import ImplicitInfo
from bilevel_jax._src.implicit.solver import ImplicitSolution
from bilevel_jax._src.implicit.solver import LINESEARCH_FAILED
from bilevel_jax._src.implicit.solver import MAX_STEPS
from bilevel_jax._src.implicit.solver import NONFINITE
from bilevel_jax._src.implicit.solver import STATUS_MESSAGES
from bilevel_jax._src.implicit.solver import SUCCESS
from bilevel_jax._src.implicit.solver import hypergradient
from bilevel_jax._src.implicit.solver import make_hypergradient
from bilevel_jax._src.implicit.solver import solve

__all__ = ["ImplicitInfo", "ImplicitSolution", "LINEAR_SOLVERS", "LINESEARCH_FAILED",
           "MAX_STEPS", "NONFINITE", "SOLVERS", "STATUS_MESSAGES", "SUCCESS",
           "hypergradient", "make_hypergradient", "solve"]
