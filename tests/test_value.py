"""Entropic and quadratic value functions: closed forms, rates in mu,
gradients (custom rules) against finite differences, gradient consistency,
float32 at small mu, status codes, ``throw``, the shared FISTA and simplex
projection, and bad input (jit/vmap/retrace: the contract test)."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from bilevel_jax import SolverError
from bilevel_jax import Status
from bilevel_jax import projections
from bilevel_jax import smoothing
from bilevel_jax import value
from bilevel_jax._src import fista
from tests.helpers import finite_difference_grad

BOX1 = (jnp.array([-1.0]), jnp.array([1.0]))
BOX_PROJ = projections.box(-1.0, 1.0)


def bilinear(x, y):
  """g(x, y) = x y on Y = [-1, 1]: v(x) = -|x|, nonsmooth at 0."""
  return x * y[0]


def entropic_bilinear_exact(x, mu):
  """-mu ln int_{-1}^{1} exp(-x y / mu) dy = -mu ln(2 mu sinh(x/mu) / x)."""
  a = np.abs(x) / mu
  # ln(2 mu sinh(a) / |x|) = a + ln(1 - e^{-2a}) - ln(a) ... computed stably
  return -mu * (a + np.log1p(-np.exp(-2 * a)) - np.log(a))


def entropic_square_exact(x, mu):
  """g = (y - x)^2 on [-1, 1]: -mu ln(sqrt(pi mu)/2 [erf((1-x)/sqrt mu) + erf((1+x)/sqrt mu)])."""
  s = jnp.sqrt(mu)
  return -mu * jnp.log(0.5 * jnp.sqrt(jnp.pi * mu) * (erf((1 - x) / s) + erf((1 + x) / s)))


# ---------------------------------------------------------------- entropic
@pytest.mark.parametrize("x, mu", [(0.5, 1e-1), (-0.3, 1e-2), (1e-3, 1e-2)])
def test_entropic_bilinear_closed_form_and_gradient(x, mu):
  fn = jax.jit(lambda xx: value.entropic(bilinear, xx, mu=mu, box=BOX1, order=10, panels=64).value)
  sol = value.entropic(bilinear, x, mu=mu, box=BOX1, order=10, panels=64)
  np.testing.assert_allclose(
    float(sol.value), entropic_bilinear_exact(x, mu), rtol=1e-10, atol=1e-12
  )
  assert int(sol.info.status) == Status.SUCCESS and float(sol.info.integration_error) < 1e-8
  assert int(sol.info.num_steps) == 1
  grad = float(jax.grad(fn)(x))
  exact_fd = (entropic_bilinear_exact(x + 1e-6, mu) - entropic_bilinear_exact(x - 1e-6, mu)) / 2e-6
  np.testing.assert_allclose(grad, exact_fd, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(
    grad, finite_difference_grad(fn, jnp.array(x))[()], rtol=1e-6, atol=1e-8
  )
  np.testing.assert_allclose(float(sol.y[0]), grad, rtol=1e-10, atol=1e-12)  # E_alpha[y] = grad


def test_entropic_rate_in_mu_and_theorem_bounds():
  """g = (y - x)^2, Y = [-1, 1], |x| < 1: v = 0 and v_mu = -(mu/2) ln(pi mu) + o(mu),
  so (v_mu - v) / (mu ln(1/mu)) -> 1/2; the bounds of Theorem 4.3 hold:
  v - mu ln vol(Y) <= v_mu <= v - mu ln(mu vol(Y)) for mu small."""
  x = 0.3
  mus = jnp.array([1e-2, 1e-3, 1e-4, 1e-5])
  # Fine panels so that the Gibbs width sqrt(mu) is resolved.
  values = jax.jit(
    jax.vmap(
      lambda mu: (
        value.entropic(
          lambda xx, y: (y[0] - xx) ** 2, x, mu=mu, box=BOX1, order=12, panels=128
        ).value
      )
    )
  )(mus)
  ratios = []
  for mu, v in zip(np.asarray(mus), np.asarray(values)):
    exact = float(entropic_square_exact(x, mu))
    np.testing.assert_allclose(v, exact, rtol=1e-9, atol=1e-12)
    assert -mu * np.log(2.0) <= exact <= -mu * np.log(2.0 * mu)
    ratios.append(exact / (mu * np.log(1 / mu)))
  np.testing.assert_allclose(
    ratios, 0.5 - 0.5 * np.log(np.pi) / np.log(1 / np.array([1e-2, 1e-3, 1e-4, 1e-5])), rtol=1e-6
  )
  assert all(abs(b - 0.5) < abs(a - 0.5) for a, b in zip(ratios, ratios[1:]))


@pytest.mark.parametrize("m, rule", [(2, "gauss-legendre"), (3, "gauss-legendre"), (4, "halton")])
def test_entropic_separable_closed_form_and_error_estimate(m, rule):
  """A separable g integrates to a product of 1-D closed forms."""
  x = jnp.linspace(-0.4, 0.4, m)
  mu = 0.05
  g = lambda xx, y: jnp.sum((y - xx) ** 2)
  box = (-jnp.ones(m), jnp.ones(m))
  kw = dict(order=8, panels=4) if rule == "gauss-legendre" else dict(num_points=4096)
  fn = lambda xx: value.entropic(g, xx, mu=mu, box=box, rule=rule, **kw)
  sol, grad = jax.jit(lambda xx: (fn(xx), jax.grad(lambda z: fn(z).value)(xx)))(x)
  exact_fn = lambda xx: jnp.sum(jax.vmap(lambda xi: entropic_square_exact(xi, mu))(xx))
  exact, exact_grad = jax.jit(jax.value_and_grad(exact_fn))(x)
  err = abs(float(sol.value) - float(exact))
  assert float(sol.info.integration_error) > 0
  assert err <= 3 * float(sol.info.integration_error) + 1e-12, (err, sol.info.integration_error)
  assert err < (1e-6 if rule == "gauss-legendre" else 2e-3)
  np.testing.assert_allclose(grad, exact_grad, atol=1e-5 if rule == "gauss-legendre" else 5e-2)


def test_entropic_user_points_and_unbounded_box():
  g = lambda x, y: 0.5 * (y[0] - x) ** 2
  ref = value.entropic(g, 0.2, mu=0.1, box=BOX1, order=8, panels=8)
  t, w = np.polynomial.legendre.leggauss(64)
  user = value.entropic(g, 0.2, mu=0.1, points=t[:, None], weights=w)
  np.testing.assert_allclose(float(user.value), float(ref.value), rtol=1e-12)
  assert np.isnan(float(user.info.integration_error))
  # Y = R: v_mu = -mu ln sqrt(2 pi mu) (the Gaussian integral), tails negligible.
  radius = value.log_radius(2.0)
  unbounded = jax.jit(
    lambda mu: value.entropic(
      g,
      0.2,
      mu=mu,
      box=(jnp.array([-jnp.inf]), jnp.array([jnp.inf])),
      radius=radius,
      order=8,
      panels=64,
    )
  )
  for mu in (0.1, 0.01):
    sol = unbounded(mu)
    np.testing.assert_allclose(float(sol.value), -mu * np.log(np.sqrt(2 * np.pi * mu)), rtol=1e-8)
    np.testing.assert_allclose(
      float(sol.info.log_volume), np.log(2 * float(radius(mu))), rtol=1e-12
    )
  # The schedule meets Theorem 4.13: mu ln vol(Y_mu) -> 0.
  terms = [mu * np.log(2 * float(radius(mu))) for mu in (1e-2, 1e-4, 1e-6, 1e-8)]
  assert all(b < a for a, b in zip(terms, terms[1:])) and terms[-1] < 1e-6
  with pytest.raises(ValueError, match="`box` is unbounded: pass `radius`"):
    value.entropic(g, 0.2, mu=0.1, box=(jnp.array([-jnp.inf]), jnp.array([1.0])))


@pytest.mark.parametrize("batch_size", [None, 48])
def test_entropic_derivatives_in_mu_box_and_closure(batch_size):
  """The custom VJP also gives exact derivatives in mu, the box and closed-over
  arrays, evaluated at once or in chunks of nodes (320 = 6 x 48 + 32)."""
  c = jnp.array(0.7)

  def v(args):
    mu, hi, c = args
    g = lambda x, y: c * (y[0] - x) ** 2
    return value.entropic(
      g,
      0.3,
      mu=mu,
      box=(jnp.array([-1.0]), jnp.array([hi])),
      order=10,
      panels=32,
      batch_size=batch_size,
    ).value

  args = jnp.array([0.05, 1.2, c])
  flat = jax.jit(lambda a: v((a[0], a[1], a[2])))
  grad = jax.grad(flat)(args)
  np.testing.assert_allclose(grad, finite_difference_grad(flat, args), rtol=1e-6, atol=1e-9)


def test_entropic_nonconvex_double_well():
  """g = (y^2 - 1)^2 - x y has two wells; v(x) ~ -|x| near 0 (the well y = sign x)."""
  g = lambda x, y: (y[0] ** 2 - 1) ** 2 - x * y[0]
  box = (jnp.array([-2.0]), jnp.array([2.0]))
  ys = jnp.linspace(-2, 2, 400_001)
  for x in (0.3, -0.2):
    sol = value.entropic(g, x, mu=1e-3, box=box, order=10, panels=64)
    v = float(jnp.min(g(x, ys[None])))
    assert v - 1e-3 * np.log(4.0) - 1e-9 <= float(sol.value) <= v + 1e-2
    assert np.sign(float(sol.y[0])) == np.sign(x)


# ---------------------------------------------------------------- quadratic
@pytest.mark.parametrize("mu", [1e-1, 1e-2, 1e-4])
def test_quadratic_bilinear_is_huber(mu):
  """min_{|y|<=1} x y + mu y^2/2 = Huber: -x^2/(2 mu) if |x| <= mu else -|x| + mu/2,
  S_mu(x) = clip(-x/mu, -1, 1), grad v_mu = S_mu (Prop. 3.4); |v_mu - v| <= mu/2."""
  xs = np.array([0.5, -0.3, 3e-3, 0.0, -5e-5])

  def solve(x):
    sol = value.quadratic(bilinear, x, jnp.zeros(1), mu=mu, projection=BOX_PROJ)
    return sol.value, sol.y[0], sol.info.status

  values, ys, status = jax.jit(jax.vmap(solve))(jnp.asarray(xs))
  grads = jax.jit(jax.vmap(jax.grad(lambda x: solve(x)[0])))(jnp.asarray(xs))
  exact = np.where(np.abs(xs) <= mu, -xs * xs / (2 * mu), -np.abs(xs) + mu / 2)
  np.testing.assert_allclose(values, exact, rtol=1e-10, atol=1e-12)
  gap = np.asarray(values) + np.abs(xs)
  assert gap.min() >= 0 and gap.max() <= mu / 2 + 1e-15
  np.testing.assert_allclose(ys, np.clip(-xs / mu, -1, 1), atol=1e-9)
  np.testing.assert_allclose(grads, np.clip(-xs / mu, -1, 1), atol=1e-9)
  assert np.all(np.asarray(status) == Status.SUCCESS)


@pytest.fixture(scope="module")
def lasso():
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  A = jax.random.normal(key_a, (12, 6))
  b = jax.random.normal(key_b, (12,))

  def g(x, y, mu):
    """Hyperparameter lower level (3.5): loss + x_1 ||y||_1 + x_2 hinge-type penalty."""
    return (
      0.5 * jnp.sum((A @ y["w"] - b) ** 2)
      + x["l1"] * smoothing.l1(y["w"], mu)
      + x["box"] * smoothing.moreau_box(y["w"], mu, -0.5, 0.5)
    )

  return g


def test_quadratic_pytree_gradient_matches_finite_differences(lasso):
  x = {"l1": jnp.array(0.3), "box": jnp.array(0.8)}
  y0 = {"w": jnp.zeros(6)}
  fn = jax.jit(lambda xx: value.quadratic(lasso, xx, y0, mu=1e-2, pass_mu=True).value)
  grad = jax.grad(fn)(x)
  flat = lambda a: fn({"l1": a[0], "box": a[1]})
  fd = finite_difference_grad(flat, jnp.array([0.3, 0.8]), eps=1e-5)
  np.testing.assert_allclose([grad["l1"], grad["box"]], fd, rtol=1e-6, atol=1e-8)
  # The derivative in mu: ||y*||^2 / 2 + d g_mu / d mu at y*.
  vm = jax.jit(lambda m: value.quadratic(lasso, x, y0, mu=m, pass_mu=True).value)
  np.testing.assert_allclose(
    float(jax.grad(vm)(1e-2)),
    finite_difference_grad(lambda m: vm(m[0]), jnp.array([1e-2]), 1e-6)[0],
    rtol=1e-5,
  )


def test_quadratic_rate_on_nonsmooth_lasso():
  """g = (y - b)^2/2 + x |y| (one dimension), smoothed with the CHKS plus function:
  v(x) = b^2/2 if |b| <= x else x|b| - x^2/2, and |v_mu - v| <= (kappa x + y*^2/2) mu = O(mu)."""
  b, x = 1.3, 0.4
  v = x * abs(b) - x * x / 2
  g = lambda xx, y, mu: 0.5 * (y[0] - b) ** 2 + xx * smoothing.abs(y[0], mu, "chks")
  gaps = []
  for mu in (1e-1, 1e-2, 1e-3, 1e-4):
    sol = value.quadratic(g, x, jnp.zeros(1), mu=mu, pass_mu=True)
    gap = float(sol.value) - v
    assert 0 <= gap <= (2.0 * x + 0.5 * (b - x) ** 2) * mu + 1e-12
    gaps.append(gap)
  rates = np.log10(np.array(gaps[:-1]) / np.array(gaps[1:]))
  np.testing.assert_allclose(rates, 1.0, atol=0.1)  # first order in mu
  np.testing.assert_allclose(rates[1:], 1.0, atol=0.01)


# ---------------------------------------------------------------- both
ENTROPIC = functools.partial(value.entropic, bilinear, box=BOX1, order=8, panels=64)
QUADRATIC = functools.partial(value.quadratic, bilinear, y0=jnp.zeros(1), projection=BOX_PROJ)


@pytest.mark.parametrize("method", [ENTROPIC, QUADRATIC], ids=["entropic", "quadratic"])
def test_gradient_consistency_at_the_kink(method):
  """v(x) = -|x|, partial v(0) = [-1, 1]: distances -> 0. Against the wrong set
  {-1} (the gradient on one side only) the check reports a distance > 0."""
  mus = jnp.array([1e-1, 1e-2, 1e-3])
  fn = lambda x, mu: method(x, mu=mu)
  right = value.consistency_check(fn, 0.0, mus=mus, subdifferential=jnp.array([[-1.0], [1.0]]))
  assert float(jnp.max(right.distances)) < 1e-8
  assert int(right.info.status) == Status.SUCCESS and int(right.info.num_steps) == 500
  assert right.info.inner_statuses.shape == right.distances.shape
  estimated = value.consistency_check(
    fn, 0.0, mus=mus, reference_grad=jax.grad(lambda x: -jnp.abs(x))
  )
  assert estimated.estimated_from == "reference_grad"
  assert float(jnp.max(estimated.distances)) < 1e-8
  wrong = jax.vmap(jax.vmap(lambda xi: value.distance_to_hull(xi, jnp.array([[-1.0]]))))(
    right.gradients
  )
  assert float(jnp.min(jnp.max(wrong, axis=1))) > 0.2
  # Away from the kink the limit is the gradient -sign(x).
  # (entropic: |grad v_mu(x) + 1| ~ mu / x, quadratic: 0 once mu < x).
  smooth = value.consistency_check(fn, 0.5, mus=mus, subdifferential=jnp.array([[-1.0]]))
  assert float(smooth.max_distance[-1]) < 3e-3
  assert all(np.diff(np.asarray(smooth.max_distance)) <= 1e-12)


@pytest.mark.parametrize("method", [ENTROPIC, QUADRATIC], ids=["entropic", "quadratic"])
def test_float32_finite_at_small_mu(method):
  x = jnp.array([0.5, -0.2, 1e-5, 0.0], jnp.float32)
  kw = {"y0": jnp.zeros(1, jnp.float32)} if method is QUADRATIC else {}
  fn = lambda xx: method(xx, mu=1e-4, **kw).value
  values, grads = jax.jit(jax.vmap(jax.value_and_grad(fn)))(x)
  assert values.dtype == jnp.float32 and grads.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(values))) and bool(jnp.all(jnp.isfinite(grads)))
  np.testing.assert_allclose(values[:2], -jnp.abs(x[:2]), atol=2e-3)
  np.testing.assert_allclose(grads[:2], -jnp.sign(x[:2]), atol=2e-2)


def test_status_and_throw_report_runtime_problems(lasso):
  # mu far below the node spacing: the estimate flags the rule as too coarse.
  sol = value.entropic(bilinear, 0.5, mu=1e-5, box=BOX1)
  assert int(sol.info.status) == Status.INACCURATE and float(sol.info.max_weight) > 0.9
  with pytest.raises(SolverError, match=r"`value.entropic` failed: INACCURATE \(4\)"):
    value.entropic(bilinear, 0.5, mu=1e-5, box=BOX1, throw=True)
  x, y0 = {"l1": 0.3, "box": 0.8}, {"w": jnp.zeros(6)}
  q = value.quadratic(lasso, x, y0, mu=1e-3, max_steps=3, pass_mu=True)
  assert int(q.info.status) == Status.MAX_STEPS and float(q.info.residual) > 1e-6
  assert int(q.info.num_steps) == 3
  nan = value.entropic(lambda x, y: jnp.log(x - 1.0) * y[0], 0.5, mu=0.1, box=BOX1)
  assert int(nan.info.status) == Status.NONFINITE
  # consistency_check passes the value function's failure on (here a stand-in
  # solution that is INACCURATE for mu < 1e-3).
  info = collections.namedtuple("Info", "status")
  solution = collections.namedtuple("Solution", "value info")
  fake = lambda x, mu: solution(-jnp.sqrt(x * x + mu * mu), info(jnp.where(mu < 1e-3, 4, 0)))
  check = value.consistency_check(
    fake, 0.5, mus=jnp.array([1e-2, 1e-4]), num_directions=2, subdifferential=jnp.array([[-1.0]])
  )
  assert int(check.info.status) == Status.INNER_FAILED and int(check.info.inner_failures) == 3
  assert int(check.info.inner_status) == Status.INACCURATE
  np.testing.assert_array_equal(check.info.inner_statuses, [[0, 0, 0], [4, 4, 4]])


def test_bad_input_names_the_argument():
  for bad in (0.0, -1e-3):
    with pytest.raises(ValueError, match="`mu` must be > 0"):
      value.entropic(bilinear, 0.5, mu=bad, box=BOX1)
    with pytest.raises(ValueError, match="`mu` must be > 0"):
      value.quadratic(bilinear, 0.5, jnp.zeros(1), mu=bad)
  with pytest.raises(ValueError, match=r"`box`: lower bound must be below .* lower\[1\]"):
    value.entropic(bilinear, 0.5, mu=0.1, box=(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0])))
  with pytest.raises(ValueError, match="`box`: lower bound"):
    value.entropic(bilinear, 0.5, mu=0.1, box=(jnp.array([2.0]), jnp.array([1.0])))
  vector_g = lambda x, y: x * y
  with pytest.raises(ValueError, match="`g` must return a scalar"):
    value.entropic(vector_g, 0.5, mu=0.1, box=BOX1)
  with pytest.raises(ValueError, match="`g` must return a scalar"):
    value.quadratic(vector_g, 0.5, jnp.zeros(1), mu=0.1)
  with pytest.raises(TypeError, match="`x` must have floating-point leaves"):
    value.quadratic(bilinear, jnp.array(1), jnp.zeros(1), mu=0.1)
  with pytest.raises(TypeError, match="`y0` must have only floating-point leaves"):
    value.quadratic(bilinear, 0.5, {"w": jnp.zeros(1), "n": jnp.array(3)}, mu=0.1)
  with pytest.raises(TypeError, match="`throw` must be a bool"):
    value.entropic(bilinear, 0.5, mu=0.1, box=BOX1, throw="yes")
  with pytest.raises(ValueError, match="`rule` must be one of"):
    value.entropic(bilinear, 0.5, mu=0.1, box=BOX1, rule="simpson")
  with pytest.raises(ValueError, match="`weights` must be > 0"):
    value.entropic(bilinear, 0.5, mu=0.1, points=jnp.zeros((2, 1)), weights=jnp.array([1.0, -1.0]))


# ------------------------------------------------ the shared FISTA, projection, samplers
def test_project_simplex_and_fista_options():
  v = jnp.array([0.3, -1.2, 2.0, 0.5])
  w = fista.project_simplex(v)
  assert abs(float(jnp.sum(w)) - 1.0) < 1e-15 and bool(jnp.all(w >= 0))
  # KKT of the projection: w = max(v - theta, 0) with one theta.
  theta = v - w
  np.testing.assert_allclose(theta[w > 0], theta[w > 0][0], atol=1e-15)
  np.testing.assert_allclose(fista.project_simplex(v, total=2.0).sum(), 2.0, atol=1e-15)
  # A box-constrained QP, min 1/2 x^T H x - b^T x on [0, 1]^3, three ways.
  H = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
  b = jnp.array([1.0, 5.0, -1.0])
  fun = lambda x: 0.5 * x @ H @ x - b @ x
  proj = lambda x: jnp.clip(x, 0.0, 1.0)
  x0 = jnp.zeros(3)
  lip = float(jnp.linalg.eigvalsh(H)[-1])
  # The shape of a dual FISTA: fixed step, gradient restart, own stopping quantity
  # (backtracking with the gradient-mapping restart: value.quadratic and the doctest).
  gap = lambda x: fista.gradient_mapping(jax.grad(fun), proj, x, lip)
  state = fista.fista(
    proj,
    x0,
    grad=lambda x: H @ x - b,
    lipschitz=lip,
    tol=1e-12,
    max_steps=500,
    restart="gradient",
    residual=gap,
  )
  np.testing.assert_allclose(state.x, [0.0, 1.0, 0.0], atol=1e-10)
  assert int(state.num_steps) < 500 and float(state.residual) <= 1e-12
  with pytest.raises(ValueError, match="`restart` must be one of"):
    fista.fista(proj, x0, fun=fun, lipschitz=lip, max_steps=3, restart="function")
