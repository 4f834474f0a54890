"""Smoothing families phi_mu of nonsmooth functions (Definition 2.5).

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

Chen-Mangasarian smoothings of the plus function with four densities
(Example 2.7) and what is built from it, and Moreau envelopes (Example 2.8).
See `bilevel_jax._src.smoothing` for the formulas and approximation bounds.
"""

from bilevel_jax._src.smoothing import DENSITIES
from bilevel_jax._src.smoothing import Density
from bilevel_jax._src.smoothing import abs
from bilevel_jax._src.smoothing import bound
from bilevel_jax._src.smoothing import hinge
from bilevel_jax._src.smoothing import kappa
from bilevel_jax._src.smoothing import l1
from bilevel_jax._src.smoothing import max
from bilevel_jax._src.smoothing import maximum
from bilevel_jax._src.smoothing import moreau_abs
from bilevel_jax._src.smoothing import moreau_box
from bilevel_jax._src.smoothing import moreau_hinge
from bilevel_jax._src.smoothing import moreau_l1
from bilevel_jax._src.smoothing import plus

__all__ = [
  "DENSITIES",
  "Density",
  "abs",
  "bound",
  "hinge",
  "kappa",
  "l1",
  "max",
  "maximum",
  "moreau_abs",
  "moreau_box",
  "moreau_hinge",
  "moreau_l1",
  "plus",
]
