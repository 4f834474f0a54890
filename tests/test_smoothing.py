"""Smoothing families: closed forms against their definitions, approximation
bounds (Example 2.7: kappa mu; Example 2.8: L^2 mu / 2), float32, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import smoothing

DENSITIES = sorted(smoothing.DENSITIES)
T = jnp.linspace(-3.0, 3.0, 601)  # contains t = 0
MUS = (1.0, 0.1, 0.01)


def _rho(name, s):
  if name == "softplus":
    return np.exp(-np.abs(s)) / (1.0 + np.exp(-np.abs(s))) ** 2
  if name == "chks":
    return 2.0 / (s * s + 4.0) ** 1.5
  if name == "uniform":
    return (np.abs(s) <= 0.5).astype(float)
  return np.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("density", DENSITIES)
def test_plus_is_the_chen_mangasarian_integral(density):
  """phi_mu(t) = int (t - mu s)_+ rho(s) ds and kappa = int |s| rho(s) ds."""
  ds = 2e-3  # midpoint rule on [-4000, 4000]: CHKS has heavy tails
  s = (np.arange(4_000_000) + 0.5) * ds - 4000.0
  rho = _rho(density, s)
  np.testing.assert_allclose(np.sum(rho) * ds, 1.0, atol=2e-3)
  np.testing.assert_allclose(np.sum(np.abs(s) * rho) * ds, smoothing.kappa(density), rtol=2e-3)
  mu = 0.3
  for t in (-1.0, -0.1, 0.0, 0.05, 0.7):
    integral = np.sum(np.maximum(t - mu * s, 0.0) * rho) * ds
    np.testing.assert_allclose(float(smoothing.plus(t, mu, density)), integral, atol=2e-3)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("mu", MUS)
def test_plus_family_bounds(density, mu):
  """0 <= phi_mu - phi <= bound (kappa mu / 2, sharp at the kink)."""
  tiny = 1e-12
  cases = [
    ("plus", smoothing.plus(T, mu, density), jnp.maximum(T, 0.0), 1),
    ("abs", smoothing.abs(T, mu, density), jnp.abs(T), 1),
    ("hinge", smoothing.hinge(T, mu, density), jnp.maximum(1.0 - T, 0.0), 1),
    ("maximum", smoothing.maximum(T, 0.3 * T + 0.2, mu, density), jnp.maximum(T, 0.3 * T + 0.2), 1),
  ]
  z = jnp.stack([T, -T, 0.5 * T + 0.1])
  cases.append(("max", smoothing.max(z, mu, density, axis=0), jnp.max(z, axis=0), 3))
  for name, smooth, exact, n in cases:
    gap = np.asarray(smooth - exact)
    bound = smoothing.bound(name, mu, density, n=n)
    assert gap.min() >= -tiny, (name, gap.min())
    assert gap.max() <= bound + tiny, (name, gap.max(), bound)
    assert bound <= (n if name != "abs" else 1) * smoothing.kappa(density) * mu
  # The sharp constants are attained at the kink.
  np.testing.assert_allclose(
    float(smoothing.plus(0.0, mu, density)), 0.5 * smoothing.kappa(density) * mu, rtol=1e-12
  )
  np.testing.assert_allclose(
    float(smoothing.abs(0.0, mu, density)), smoothing.kappa(density) * mu, rtol=1e-12
  )
  w = jnp.array([0.5, -2.0, 0.0, 1.5])
  l1_gap = float(smoothing.l1(w, mu, density) - jnp.sum(jnp.abs(w)))
  assert 0 <= l1_gap <= smoothing.bound("l1", mu, density, n=4)


def _brute_moreau(phi, z, mu):
  u = np.linspace(-6, 6, 240_001)
  return np.min(phi(u)[None, :] + (z[:, None] - u[None, :]) ** 2 / (2 * mu), axis=1)


@pytest.mark.parametrize("mu", MUS)
def test_moreau_envelopes_match_definition_and_bounds(mu):
  z = np.linspace(-3, 3, 41)
  for fn, phi, kind in (
    (smoothing.moreau_abs, np.abs, "moreau_abs"),
    (smoothing.moreau_hinge, lambda u: np.maximum(1 - u, 0), "moreau_hinge"),
  ):
    env = np.asarray(fn(jnp.asarray(z), mu))
    np.testing.assert_allclose(env, _brute_moreau(phi, z, mu), atol=1e-6)
    gap = phi(z) - env
    assert gap.min() >= -1e-12 and gap.max() <= smoothing.bound(kind, mu) + 1e-12
  w = jnp.array([0.3, -1.0, 2.0])
  gap = float(jnp.sum(jnp.abs(w)) - smoothing.moreau_l1(w, mu))
  assert 0 <= gap <= smoothing.bound("moreau_l1", mu, n=3) + 1e-12


def test_moreau_box_indicator():
  lo, hi, mu = jnp.array([-1.0, 0.0]), jnp.array([1.0, 2.0]), 0.1
  assert float(smoothing.moreau_box(jnp.array([0.5, 1.0]), mu, lo, hi)) == 0.0
  z = jnp.array([1.5, -1.0])
  np.testing.assert_allclose(
    float(smoothing.moreau_box(z, mu, lo, hi)), (0.25 + 1.0) / (2 * mu), rtol=1e-12
  )
  grad = jax.grad(smoothing.moreau_box)(z, mu, lo, hi)
  np.testing.assert_allclose(grad, (z - jnp.clip(z, lo, hi)) / mu, rtol=1e-12)
  with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
    smoothing.moreau_box(z, mu, hi, lo)


@pytest.mark.parametrize("density", DENSITIES)
def test_float32_small_mu_and_gradient_consistency(density):
  """Finite in float32 at mu = 1e-4; phi_mu' -> sign away from the kink and
  stays in [0, 1] (Example 2.7's limsup)."""
  t = jnp.array([-2.0, -0.05, 0.0, 0.05, 2.0], jnp.float32)
  values = smoothing.plus(t, 1e-4, density)
  grads = jax.vmap(jax.grad(lambda s: smoothing.plus(s, 1e-4, density)))(t)
  assert values.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(values)))
  assert bool(jnp.all(jnp.isfinite(grads)))
  np.testing.assert_allclose(np.asarray(grads)[[0, 1, 3, 4]], [0, 0, 1, 1], atol=1e-4)
  assert 0 <= float(grads[2]) <= 1
  huber = smoothing.moreau_abs(t, 1e-4)
  assert huber.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(huber)))


def test_vmap_over_mu_and_bad_input():
  mus = jnp.array([1.0, 0.1, 0.01])
  out = jax.vmap(lambda m: smoothing.abs(0.0, m, "chks"))(mus)
  np.testing.assert_allclose(out, 2.0 * mus, rtol=1e-12)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="`mu` must be > 0"):
      smoothing.plus(1.0, bad)
  with pytest.raises(ValueError, match="`density` must be one of"):
    smoothing.plus(1.0, 0.1, "cauchy")
