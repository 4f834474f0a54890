"""Smoothing families phi_mu of nonsmooth functions (Definition 2.5 of
Alcantara, Nguyen, Chen and Lin, "value-function smoothing").

Two constructions, both elementwise and usable inside ``g_mu(x, y)``:

Chen-Mangasarian (Example 2.7). For a symmetric density rho with
kappa = int |s| rho(s) ds < inf,

    plus_mu(t) = int (t - mu s)_+ rho(s) ds,      0 <= plus_mu(t) - t_+ <= kappa mu.

The gap is largest at t = 0, where it equals mu int_{s<0} |s| rho = kappa mu / 2,
so the sharp bound is kappa mu / 2 (we document and test both). Densities:

  =========== ================================ ====================================== =========
  density     rho(s)                           plus_mu(t)                             kappa
  =========== ================================ ====================================== =========
  "softplus"  e^-s / (1 + e^-s)^2 (logistic)   mu log(1 + e^{t/mu})                   2 ln 2
  "chks"      2 / (s^2 + 4)^{3/2}              (t + sqrt(t^2 + 4 mu^2)) / 2           2
  "uniform"   1 on [-1/2, 1/2]                 0, (t + mu/2)^2/(2 mu), t (piecewise)  1/4
  "gaussian"  N(0, 1)                          t Phi(t/mu) + mu phi(t/mu)             sqrt(2/pi)
  =========== ================================ ====================================== =========

Built from it: |t| = t_+ + (-t)_+ (gap <= kappa mu, attained at 0),
hinge(t) = (1 - t)_+ (gap <= kappa mu / 2), max(a, b) = b + (a - b)_+
(gap <= kappa mu / 2), max over n entries by a left fold (gap <= (n-1) kappa mu / 2),
and ||z||_1 = sum |z_i| (gap <= n kappa mu).

Moreau envelopes (Example 2.8), e_mu phi(z) = min_u phi(u) + ||z - u||^2 / (2 mu),
with 0 <= phi - e_mu phi <= L^2 mu / 2 (L the Lipschitz constant of phi):
|t| (the Huber function, L = 1), ||z||_1 (L^2 = n), the hinge (L = 1), and the
indicator of a box [lo, hi], whose envelope is dist(z, box)^2 / (2 mu): zero on
the box and finite but growing like 1/mu outside (the indicator is not
Lipschitz, so no L^2 mu / 2 bound; e_mu -> indicator pointwise as mu -> 0).

All functions take ``mu`` as an array (vmap and grad over mu work; a traced
mu that is not > 0 gives NaN, a concrete one raises) and stay
finite in float32 down to mu = 1e-4 and below: the softplus is evaluated as
mu * softplus(t / mu), the others have no exponentials.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special

from bilevel_jax._src import validation


class Density(NamedTuple):
  """A symmetric density of Example 2.7: its name and kappa = E|s|."""

  name: str
  kappa: float


DENSITIES = {
  "softplus": Density("softplus", 2.0 * math.log(2.0)),
  "chks": Density("chks", 2.0),
  "uniform": Density("uniform", 0.25),
  "gaussian": Density("gaussian", math.sqrt(2.0 / math.pi)),
}


def kappa(density: str) -> float:
  """kappa = int |s| rho(s) ds of a density: plus_mu - plus <= kappa mu.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(smoothing.kappa("softplus"), 4)  # ln 2
    1.3863
  """
  return _density(density).kappa


def _density(density: str) -> Density:
  if density not in DENSITIES:
    raise ValueError(f"`density` must be one of {sorted(DENSITIES)}, got {density!r}.")
  return DENSITIES[density]


def _as_float(t):
  t = jnp.asarray(t)
  return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))


def _mu_like(mu, t):
  validation.check_positive("mu", mu)
  return jnp.asarray(mu, dtype=t.dtype)


def _nan_unless_positive(out, mu):
  """NaN where a traced ``mu`` is not > 0 (a concrete one raised already in
  `_mu_like`): a bad mu under jit or vmap poisons the value, so the solver
  that evaluates it reports NONFINITE instead of a finite wrong answer."""
  if validation.concrete_value(mu) is not None:
    return out
  return jnp.where(mu > 0, out, jnp.nan)


def plus(t, mu, density: str = "softplus"):
  """Chen-Mangasarian smoothing of t_+ = max(t, 0) (Example 2.7), elementwise.

  Args:
    t: array.
    mu: smoothing parameter > 0 (a scalar; array-valued under vmap).
    density: "softplus", "chks", "uniform" or "gaussian" (see the module doc).

  Returns:
    plus_mu(t), with 0 <= plus_mu(t) - t_+ <= kappa mu / 2 <= kappa mu; NaN
    where a traced ``mu`` (under jit or vmap) is not > 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> [round(float(v), 4) for v in smoothing.plus(jnp.array([-1.0, 0.0, 1.0]), 0.1)]
    [0.0, 0.0693, 1.0]
    >>> round(float(smoothing.plus(0.0, 0.1, density="chks")), 4)
    0.1
  """
  _density(density)
  t = _as_float(t)
  mu = _mu_like(mu, t)
  return _nan_unless_positive(_plus(t, mu, density), mu)


def _plus(t, mu, density):
  if density == "softplus":
    return mu * jax.nn.softplus(t / mu)
  if density == "chks":
    return 0.5 * (t + jnp.sqrt(t * t + 4.0 * mu * mu))
  if density == "uniform":
    half = 0.5 * mu
    inner = jnp.clip(t + half, 0.0, mu)  # the quadratic piece, clipped
    return jnp.where(t > half, t, inner * inner / (2.0 * mu))
  z = t / mu  # gaussian
  return t * special.ndtr(z) + mu * jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def abs(t, mu, density: str = "softplus"):
  """|t| ~ plus_mu(t) + plus_mu(-t); 0 <= gap <= kappa mu (attained at t = 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.abs(0.0, 0.1)), 4)   # the gap at t = 0: kappa mu
    0.1386
    >>> round(float(smoothing.abs(-2.0, 0.1)), 4)
    2.0
  """
  return plus(t, mu, density) + plus(-_as_float(t), mu, density)


def hinge(t, mu, density: str = "softplus"):
  """max(0, 1 - t) ~ plus_mu(1 - t); 0 <= gap <= kappa mu / 2.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> [round(float(v), 4) for v in smoothing.hinge(jnp.array([0.0, 1.0, 2.0]), 0.1)]
    [1.0, 0.0693, 0.0]
  """
  return plus(1.0 - _as_float(t), mu, density)


def maximum(a, b, mu, density: str = "softplus"):
  """max(a, b) ~ b + plus_mu(a - b); 0 <= gap <= kappa mu / 2.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.maximum(1.0, 3.0, 0.1)), 4)
    3.0
  """
  a, b = _as_float(a), _as_float(b)
  return b + plus(a - b, mu, density)


def max(z, mu, density: str = "softplus", axis: int = -1):
  """max_i z_i along ``axis`` by a left fold of `maximum`.

  0 <= gap <= (n - 1) kappa mu / 2 for n entries.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.max(jnp.array([1.0, 3.0, 2.0]), 0.01)), 4)
    3.0
  """
  z = _as_float(z)
  if z.ndim == 0 or z.shape[axis] == 0:
    raise ValueError(
      f"`z` must have at least one entry along `axis` ({axis}) to take "
      f"the max of, got shape {z.shape}."
    )
  z = jnp.moveaxis(z, axis, 0)
  out = z[0]
  for i in range(1, z.shape[0]):
    out = maximum(z[i], out, mu, density)
  return out


def l1(z, mu, density: str = "softplus"):
  """||z||_1 (summed over all entries); 0 <= gap <= n kappa mu.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.l1(jnp.array([1.0, -2.0, 0.5]), 0.01)), 4)
    3.5
  """
  return jnp.sum(abs(z, mu, density))


def moreau_abs(t, mu):
  """Moreau envelope of |t| (Huber): t^2/(2 mu) if |t| <= mu else |t| - mu/2.

  0 <= |t| - e_mu(t) <= mu / 2 (L = 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> [round(float(v), 4) for v in smoothing.moreau_abs(jnp.array([0.05, 2.0]), 0.1)]
    [0.0125, 1.95]
  """
  t = _as_float(t)
  mu = _mu_like(mu, t)
  a = jnp.abs(t)
  small = jnp.minimum(a, mu)
  return _nan_unless_positive(small * small / (2.0 * mu) + (a - small), mu)


def moreau_l1(z, mu):
  """Moreau envelope of ||z||_1 = sum of Huber terms; 0 <= gap <= n mu / 2.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.moreau_l1(jnp.array([0.05, -2.0]), 0.1)), 4)
    1.9625
  """
  return jnp.sum(moreau_abs(z, mu))


def moreau_hinge(t, mu):
  """Moreau envelope of max(0, 1 - t); 0 <= gap <= mu / 2 (L = 1).

  With u = 1 - t: 0 if u <= 0, u^2/(2 mu) if 0 <= u <= mu, u - mu/2 if u >= mu.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> [round(float(v), 4) for v in smoothing.moreau_hinge(jnp.array([0.0, 0.95, 2.0]), 0.1)]
    [0.95, 0.0125, 0.0]
  """
  t = _as_float(t)
  mu = _mu_like(mu, t)
  u = jnp.maximum(1.0 - t, 0.0)
  small = jnp.minimum(u, mu)
  return _nan_unless_positive(small * small / (2.0 * mu) + (u - small), mu)


def moreau_box(z, mu, lower, upper):
  """Moreau envelope of the indicator of [lower, upper]: dist(z, box)^2 / (2 mu).

  Summed over all entries. Zero on the box; its gradient is (z - P(z)) / mu.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.moreau_box(jnp.array([2.0, 0.5]), 0.5, 0.0, 1.0)), 4)
    1.0
  """
  z = _as_float(z)
  mu = _mu_like(mu, z)
  lo, hi = validation.concrete_value(lower), validation.concrete_value(upper)
  if lo is not None and hi is not None and (lo > hi).any():
    raise ValueError(f"`lower` must be <= `upper`, got {lower} and {upper}.")
  d = z - jnp.clip(z, jnp.asarray(lower, z.dtype), jnp.asarray(upper, z.dtype))
  return _nan_unless_positive(jnp.sum(d * d) / (2.0 * mu), mu)


# Sharp upper bounds on |phi_mu - phi| used in the docs and tests; n is the
# number of entries for l1 / max.
def bound(kind: str, mu, density: str = "softplus", n: int = 1):
  """The approximation bound of a family: sup |phi_mu - phi| <= bound.

  ``kind`` is one of "plus", "abs", "hinge", "maximum", "max", "l1",
  "moreau_abs", "moreau_l1", "moreau_hinge".

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import smoothing
    >>> round(float(smoothing.bound("abs", 0.1)), 4)
    0.1386
    >>> round(float(smoothing.bound("l1", 0.1, n=3)), 4)
    0.4159
  """
  if kind.startswith("moreau_"):
    scale = {"moreau_abs": 1, "moreau_hinge": 1, "moreau_l1": n}.get(kind)
    if scale is None:
      raise ValueError(f"`kind` {kind!r} has no L^2 mu / 2 bound.")
    return scale * mu / 2.0
  k = kappa(density)
  factors = {
    "plus": 0.5,
    "hinge": 0.5,
    "maximum": 0.5,
    "abs": 1.0,
    "max": 0.5 * (n - 1),
    "l1": float(n),
  }
  if kind not in factors:
    raise ValueError(f"unknown `kind` {kind!r}.")
  return factors[kind] * k * mu
