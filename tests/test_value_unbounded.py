"""Entropic value function on an unbounded Y (Section 4.2): the bias term
mu ln vol(Y_mu) in ``info`` (against hand computations), the Euclidean ball
Y_mu = B_{r_mu}(0) of the footnote to Theorem 4.13 (closed-form Gaussian
integrals, finite differences, jit/vmap), and gradient consistency
(Theorem 4.18) on Y = R with the `log_radius` schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import Status
from bilevel_jax import smoothing
from bilevel_jax import value
from tests.helpers import finite_difference_grad


def real_line(m):
  return (jnp.full(m, -jnp.inf), jnp.full(m, jnp.inf))


def gaussian(x, y):
  """g = ||y - x||^2 / 2 on R^m: v = 0 and, with the tails of the Gaussian
  negligible, v_mu = -(m/2) mu ln(2 pi mu)."""
  return 0.5 * jnp.sum((y - x) ** 2)


def test_mu_log_volume_box_by_hand():
  # Example 1's Y = [-2, 4]^2 (vol 36): mu ln vol = mu ln 36 (0.358 at mu = 0.1).
  mus = jnp.array([0.1, 1e-3])
  box = (jnp.full(2, -2.0), jnp.full(2, 4.0))
  fn = lambda mu: value.entropic(gaussian, jnp.zeros(2), mu=mu, box=box, panels=2).info
  info = jax.jit(jax.vmap(fn))(mus)
  np.testing.assert_allclose(np.asarray(info.log_volume), math.log(36.0), rtol=1e-14)
  np.testing.assert_allclose(np.asarray(info.mu_log_volume), mus * math.log(36.0), rtol=1e-14)
  # Partly unbounded: Y = [0, inf) x [-1, 1] with r_mu = 5: Y_mu = [0, 5] x [-1, 1].
  box = (jnp.array([0.0, -1.0]), jnp.array([jnp.inf, 1.0]))
  info = jax.jit(
    lambda mu: value.entropic(gaussian, jnp.zeros(2), mu=mu, box=box, radius=5.0, panels=2).info
  )(0.2)
  np.testing.assert_allclose(float(info.mu_log_volume), 0.2 * math.log(10.0), rtol=1e-14)
  # A user rule: ln of the sum of its weights (2 for Gauss-Legendre on [-1, 1]).
  t, w = np.polynomial.legendre.leggauss(16)
  info = jax.jit(
    lambda mu: value.entropic(gaussian, jnp.zeros(1), mu=mu, points=t[:, None], weights=w).info
  )(0.3)
  np.testing.assert_allclose(float(info.mu_log_volume), 0.3 * math.log(2.0), rtol=1e-14)


def test_mu_log_volume_log_radius_by_hand():
  """Y = R^m with r_mu = r0 (1 + ln(1 + 1/mu)): box (2 r_mu)^m, ball pi r_mu^2
  (m = 2) and 4/3 pi r_mu^3 (m = 3); mu ln vol(Y_mu) -> 0 along mu -> 0."""
  r0 = 2.0
  radius = value.log_radius(r0)
  mus = (1e-1, 1e-3, 1e-6)
  r = lambda mu: r0 * (1.0 + math.log(1.0 + 1.0 / mu))
  hand = {
    ("box", 1): lambda mu: mu * math.log(2 * r(mu)),
    ("box", 2): lambda mu: mu * 2 * math.log(2 * r(mu)),
    ("ball", 2): lambda mu: mu * math.log(math.pi * r(mu) ** 2),
    ("ball", 3): lambda mu: mu * math.log(4.0 / 3.0 * math.pi * r(mu) ** 3),
    ("ball", 5): lambda mu: mu * math.log(8.0 / 15.0 * math.pi**2 * r(mu) ** 5),
  }
  for (truncation, m), expected in hand.items():
    fn = jax.jit(
      jax.vmap(
        lambda mu: (
          value.entropic(
            gaussian,
            jnp.zeros(m),
            mu=mu,
            box=real_line(m),
            radius=radius,
            truncation=truncation,
            panels=2,
            num_points=64,
          ).info.mu_log_volume
        )
      )
    )
    got = np.asarray(fn(jnp.asarray(mus)))
    np.testing.assert_allclose(got, [expected(mu) for mu in mus], rtol=1e-12)
    assert got[0] > got[1] > got[2] > 0 and got[2] < 1e-4


@pytest.mark.parametrize("m", [pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_ball_gauss_legendre_gaussian_integral(m):
  """Polar/spherical Gauss-Legendre on B_r(0): v_mu and its gradient.

  For g = ||y - x||^2/2 the tails outside B_r are below e^{-(r - |x|)^2 / (2 mu)},
  so v_mu = -(m/2) mu ln(2 pi mu) to rounding; the ball's volume is smaller
  than the box's (for m >= 2) and the value does not depend on x (gradient 0).
  """
  mu, x = 0.05, jnp.full(m, 0.1)
  radius = value.log_radius(0.5)  # r = 2.02 at mu = 0.05
  # Radius: 12 panels of 8 nodes; angles: 4 panels of 8 nodes (smooth, periodic).
  order, panels = (8,) * m, (12,) + (4,) * (m - 1)

  def fn(xx):
    return value.entropic(
      gaussian,
      xx,
      mu=mu,
      box=real_line(m),
      radius=radius,
      truncation="ball",
      order=order,
      panels=panels,
    )

  sol = jax.jit(fn)(x)
  exact = -0.5 * m * mu * math.log(2 * math.pi * mu)
  assert int(sol.info.status) == Status.SUCCESS
  assert abs(float(sol.value) - exact) < 1e-9, (float(sol.value), exact)
  assert float(sol.info.integration_error) < 1e-6
  np.testing.assert_allclose(np.asarray(sol.y), np.asarray(x), atol=1e-9)  # Gibbs mean = x
  grad = np.asarray(jax.grad(lambda xx: fn(xx).value)(x))
  np.testing.assert_allclose(grad, np.zeros(m), atol=1e-7)
  r = 0.5 * (1.0 + math.log(1.0 + 1.0 / mu))
  box_log_volume = m * math.log(2 * r)  # the box's ln vol, larger for m >= 2
  ball_log_volume = math.log(math.pi ** (m / 2) / math.gamma(m / 2 + 1) * r**m)
  np.testing.assert_allclose(float(sol.info.log_volume), ball_log_volume, rtol=1e-12)
  if m >= 2:
    assert ball_log_volume < box_log_volume
  else:
    np.testing.assert_allclose(ball_log_volume, box_log_volume, rtol=1e-14)


def test_ball_gradient_finite_differences():
  """A g whose minimizer sits off-centre and whose v_mu depends on x: the
  custom derivative rule of the ball rule against central differences
  (float64), in x and in mu (through r_mu and the weights)."""
  c = jnp.array([0.3, -0.2])
  g = lambda x, y: jnp.sum((y - x[:2] * c) ** 2) + x[2] * jnp.sum(y**2) + 0.1 * y[0] ** 3
  radius = value.log_radius(0.4)

  def v(x, mu):
    return value.entropic(
      g, x, mu=mu, box=real_line(2), radius=radius, truncation="ball", order=(8, 8), panels=(8, 4)
    ).value

  x0 = np.array([1.0, 2.0, 0.5])
  grad = np.asarray(jax.grad(v)(jnp.asarray(x0), 0.2))
  fd = finite_difference_grad(lambda x: v(x, 0.2), x0)
  np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
  d_mu = float(jax.grad(v, argnums=1)(jnp.asarray(x0), 0.2))
  fd_mu = finite_difference_grad(lambda m: v(jnp.asarray(x0), m[0]), np.array([0.2]))[0]
  np.testing.assert_allclose(d_mu, fd_mu, rtol=1e-6)


def test_ball_halton_wide_gaussian():
  """m = 4 (QMC mapped into the ball): the estimate of v_mu against the
  closed form lies within a few of its own error estimates."""
  m, mu = 4, 1.0
  sol = value.entropic(
    gaussian,
    jnp.zeros(m),
    mu=mu,
    box=real_line(m),
    radius=6.0,
    truncation="ball",
    num_points=4096,
    randomizations=8,
    tol=1e-2,
  )
  # Tails outside B_6 for the 4-D standard normal: P(chi^2_4 > 36) = e^{-18} 19.
  exact = -0.5 * m * mu * math.log(2 * math.pi * mu)
  err = abs(float(sol.value) - exact)
  assert int(sol.info.status) == Status.SUCCESS
  assert 0 < float(sol.info.integration_error) < 1e-2
  assert err < 4 * float(sol.info.integration_error), (err, float(sol.info.integration_error))
  np.testing.assert_allclose(float(sol.info.log_volume), math.log(0.5 * math.pi**2 * 6.0**4))


def test_ball_bad_input():
  with pytest.raises(ValueError, match="needs Y = R\\^m"):
    value.entropic(
      gaussian,
      jnp.zeros(1),
      mu=0.1,
      box=(jnp.array([0.0]), jnp.array([jnp.inf])),
      radius=2.0,
      truncation="ball",
    )
  with pytest.raises(ValueError, match="`truncation='ball'` needs `radius`"):
    value.entropic(gaussian, jnp.zeros(1), mu=0.1, box=real_line(1), truncation="ball")
  with pytest.raises(ValueError, match="`truncation` must be one of"):
    value.entropic(gaussian, jnp.zeros(1), mu=0.1, box=real_line(1), radius=1.0, truncation="l1")
  with pytest.raises(ValueError, match="m <= 3"):
    value.entropic(
      gaussian,
      jnp.zeros(4),
      mu=0.1,
      box=real_line(4),
      radius=1.0,
      truncation="ball",
      rule="gauss-legendre",
    )


def test_gradient_consistency_unbounded_log_radius():
  """Theorem 4.18 on Y = R: g(x, y) = |y - x - c| (smoothed by CHKS), v = 0,
  partial v(0) = {0}. With Y_mu = [-r_mu, r_mu] from `log_radius(1)` the
  distances of grad v_mu(x_k) to {0} go to 0 once r_mu exceeds the minimizer
  c = 4 (r = 3.40 at mu = 0.1, 5.62 at mu = 0.01); with a fixed radius 3 the
  Gibbs mass sits on the boundary and the gradient stays at 1: Y_mu must grow
  to Y (Proposition 4.11, Lemma 4.12)."""
  c = 4.0
  g = lambda x, y, mu: smoothing.abs(y[0] - x - c, mu, "chks")
  mus = jnp.array([1e-1, 1e-2])

  def check(radius, subdifferential):
    fn = lambda x, mu: value.entropic(
      g, x, mu=mu, box=real_line(1), radius=radius, panels=1500, pass_mu=True
    )
    return value.consistency_check(
      fn, 0.0, mus=mus, num_directions=2, subdifferential=subdifferential
    )

  grows = check(value.log_radius(1.0), jnp.array([[0.0]]))
  assert int(grows.info.status) == Status.SUCCESS
  dist = np.asarray(grows.max_distance)
  assert dist[0] > 0.9 and dist[1] < 1e-8, dist
  fixed = check(3.0, jnp.array([[0.0]]))
  assert np.all(np.asarray(fixed.max_distance) > 0.9), fixed.max_distance
  # The same gradients against the wrong set {1}: distance 1 where consistent.
  wrong = [float(value.distance_to_hull(xi, jnp.array([[1.0]]))) for xi in grows.gradients[1]]
  np.testing.assert_allclose(wrong, 1.0, atol=1e-8)
