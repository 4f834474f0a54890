"""Composite convex lower levels g + h(G) with epi-polyhedral h, regularized
(Moreau envelope + Tikhonov) and differentiated through the primal-dual
solution map (Solla & Royset 2026, Sections 2-5).

    h = composite.l1(d)                           # h(z1, z2) = sum max(z1_i, z2_i)
    sol = composite.solve(g, G, h, x, y0, alpha=1e-6, beta=1e-6)
    sol.y, sol.p, sol.info                        # y, p differentiable in x
    value, grad = composite.hypergradient(F, g, G, h, x, y0, alpha=1e-6, beta=1e-6)

``sol.info.status`` is a `bilevel_jax.Status` code.  See
`bilevel_jax._src.composite.solver` for the method and the equations.
"""

from bilevel_jax._src.composite.polyhedral import MAX_PIECES_PER_BLOCK
from bilevel_jax._src.composite.polyhedral import Polyhedral
from bilevel_jax._src.composite.polyhedral import hinge
from bilevel_jax._src.composite.polyhedral import l1
from bilevel_jax._src.composite.polyhedral import linear
from bilevel_jax._src.composite.polyhedral import maximum
from bilevel_jax._src.composite.polyhedral import nonpositive
from bilevel_jax._src.composite.polyhedral import polyhedral
from bilevel_jax._src.composite.polyhedral import separable
from bilevel_jax._src.composite.solver import CompositeInfo
from bilevel_jax._src.composite.solver import CompositeSolution
from bilevel_jax._src.composite.solver import hypergradient
from bilevel_jax._src.composite.solver import make_hypergradient
from bilevel_jax._src.composite.solver import solve

__all__ = [
  "CompositeInfo",
  "CompositeSolution",
  "MAX_PIECES_PER_BLOCK",
  "Polyhedral",
  "hinge",
  "hypergradient",
  "l1",
  "linear",
  "make_hypergradient",
  "maximum",
  "nonpositive",
  "polyhedral",
  "separable",
  "solve",
]
