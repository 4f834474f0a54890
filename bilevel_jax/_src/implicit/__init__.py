"""Implicit hypergradients for smooth, strongly convex lower levels (private).

minimize.py  the lower solvers (L-BFGS, gradient descent, Newton) on flat y
solver.py    `solve`, `hypergradient`, `make_hypergradient`; the derivative
             rule and the adjoint solves live in `bilevel_jax._src.implicit_diff`
"""
