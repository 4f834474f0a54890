"""Implicit hypergradients for smooth, strongly convex lower levels (private).

  minimize.py  the lower solvers (L-BFGS, gradient descent, Newton) on flat y
  linear.py    the adjoint linear solve (conjugate gradients or dense)
  solver.py    `solve`, its custom VJP, `hypergradient`, `make_hypergradient`
"""
