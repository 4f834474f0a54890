"""Smoothed value functions and the smoothing method for (VFP_eps).

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

  entropic           v_mu(x) = -mu ln int_Y exp(-g_mu(x, y)/mu) dy      (4.1)
  quadratic          v_mu(x) = min_{y in Y} g_mu(x, y) + mu/2 ||y||^2    (3.2)
  solve_vfp          augmented Lagrangian on (VFP^mu_eps) for mu_k -> 0 (Prop. 2.13)
  consistency_check  distance of grad v_mu(x) to partial v(x_bar)        (Def. 2.6)

Every entry point returns a ``*Solution`` whose ``info.status`` is a
`bilevel_jax.Status` code and takes ``throw=``. See the modules under
`bilevel_jax._src.value` for the formulas and the practical choices.
"""

from bilevel_jax._src.value.consistency import ConsistencyInfo
from bilevel_jax._src.value.consistency import ConsistencySolution
from bilevel_jax._src.value.consistency import consistency_check
from bilevel_jax._src.value.consistency import distance_to_hull
from bilevel_jax._src.value.entropic import EntropicInfo
from bilevel_jax._src.value.entropic import EntropicSolution
from bilevel_jax._src.value.entropic import entropic
from bilevel_jax._src.value.entropic import log_radius
from bilevel_jax._src.value.quadratic import QuadraticInfo
from bilevel_jax._src.value.quadratic import QuadraticSolution
from bilevel_jax._src.value.quadratic import quadratic
from bilevel_jax._src.value.vfp import VFPInfo
from bilevel_jax._src.value.vfp import VFPSolution
from bilevel_jax._src.value.vfp import geometric_mus
from bilevel_jax._src.value.vfp import solve_vfp

__all__ = [
  "ConsistencyInfo",
  "ConsistencySolution",
  "EntropicInfo",
  "EntropicSolution",
  "QuadraticInfo",
  "QuadraticSolution",
  "VFPInfo",
  "VFPSolution",
  "consistency_check",
  "distance_to_hull",
  "entropic",
  "geometric_mus",
  "log_radius",
  "quadratic",
  "solve_vfp",
]
