"""Composite lower levels: h as data, the regularized solve (3.1) and the
derivative (3.6) against finite differences, closed forms and limits; the
diagnostics ri_violated and condition_number.  jit, vmap, retracing, float32,
status codes and throw= are in tests/test_contract.py."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import composite
from bilevel_jax._src.problems import regression
from bilevel_jax._src.status import Status
from tests.helpers import finite_difference_grad

TIGHT = dict(tol=1e-12, max_steps=200)


def _fd_jacobian(fn, x, eps=1e-6):
  cols = []
  for i in range(x.shape[0]):
    e = jnp.zeros_like(x).at[i].set(eps)
    cols.append((fn(x + e) - fn(x - e)) / (2 * eps))
  return jnp.stack(cols, axis=-1)


def _check_jacobian(g, G, h, x, y0, alpha, beta, rtol=1e-5):
  @jax.jit
  def solve(xx):
    return composite.solve(g, G, h, xx, y0, alpha=alpha, beta=beta, **TIGHT)

  def yp(xx):
    sol = solve(xx)
    return jnp.concatenate([sol.y, sol.p])

  sol = solve(x)
  assert int(sol.info.status) == Status.SUCCESS, sol.info
  jac = jax.jit(jax.jacrev(yp))(x)
  fd = _fd_jacobian(yp, x)
  np.testing.assert_allclose(jac, fd, rtol=rtol, atol=rtol * (1 + np.max(np.abs(fd))))
  return sol


# ------------------------------------------------------------- Polyhedral h


def test_l1_value_prox_and_multipliers():
  h = composite.l1(3, scale=2.0)
  y = jnp.array([1.0, -0.3, 0.05])
  z = jnp.concatenate([y, -y])
  assert float(h(z)) == pytest.approx(2.0 * float(jnp.sum(jnp.abs(y))))
  w = h.prox(z, 0.1)
  np.testing.assert_allclose(w, [0.8, -0.3, -0.1, -1.0, 0.1, -0.1], atol=1e-14)
  p = (z - w) / 0.1
  # p in dh(w): each block's p lies on the segment 2 * conv{e1, e2}.
  np.testing.assert_allclose(p[:3] + p[3:], 2.0, atol=1e-12)
  assert np.all(p >= -1e-12)


@pytest.mark.parametrize(
  "builder",
  [
    lambda: composite.separable(composite.nonpositive(2), composite.hinge(2), composite.maximum(3)),
    lambda: composite.polyhedral(
      a=[[1.0, 0.0, 0.5], [0.0, 1.0, 0.2]], alpha=[0.0, 0.3], b=[[1.0, 1.0, 0.0]], beta=[1.0]
    ),
  ],
)
def test_prox_is_optimal(builder):
  # No random point near w does better in the prox objective.
  h = builder()
  step = 0.3
  objective = jax.jit(
    jax.vmap(lambda v, z: h(v) + jnp.sum((v - z) ** 2) / (2 * step), in_axes=(0, None))
  )
  prox = jax.jit(lambda z: h.prox(z, step))
  rng = np.random.default_rng(1)
  for _ in range(5):
    z = jnp.asarray(rng.normal(size=h.size) * 2)
    w = prox(z)
    best = objective(w[None], z)[0]
    assert np.isfinite(best)
    scales = np.repeat([1e-3, 1e-2, 1e-1, 1.0], 100)[:, None]
    candidates = w[None] + jnp.asarray(rng.normal(size=(400, h.size)) * scales)
    assert float(jnp.min(objective(candidates, z))) >= float(best) - 1e-10


def test_critical_cone_of_example_3_6():
  # h(z) = z0 + indicator{z_1..z_3 <= 0}: the basis of K_{h*} consists of
  # e_{i+1} for the active constraints (Example 3.6).
  h = composite.polyhedral(a=[[1.0, 0, 0, 0]], b=[[0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
  z = jnp.array([0.3, 0.5, -2.0, 0.7])  # constraints 1 and 3 violated -> active at prox
  proj = h.critical_cone_projector(z, 0.1)
  np.testing.assert_allclose(proj, np.diag([0, 1.0, 0, 1.0]), atol=1e-12)
  basis, dim = h.critical_cone_basis(z, 0.1)
  assert dim == 2 and basis.shape == (4, 2)


def test_bad_h_is_rejected():
  with pytest.raises(ValueError, match="`a`"):
    composite.polyhedral(a=[[1.0, -0.5]])
  with pytest.raises(ValueError, match="`b`"):
    composite.polyhedral(a=[[1.0, 0.5]], b=[[-1.0, 0.0]])
  with pytest.raises(ValueError, match="separable"):
    composite.maximum(13)
  with pytest.raises(TypeError, match="`h`"):
    composite.solve(
      lambda x, y: jnp.sum(y**2),
      lambda x, y: y,
      jnp.abs,
      jnp.zeros(1),
      jnp.zeros(2),
      alpha=1.0,
      beta=1.0,
    )


# --------------------------------------------------------------- the solve


def _example_5_5(x, alpha, beta):
  """Closed form of Y_{alpha,beta}(x) for Example 5.5 of the paper."""
  a, b = alpha, beta
  if x <= (2 + b) / (1 + b):
    return -x / (2 + b)
  if x < (1 + 100 * (2 * a + b * a + 1)) / (3 * a + a * b + 2):
    return (1 - (a + 1) * x) / (2 * a + a * b + 1)
  return (-99 - a * x) / (2 * a + a * b + 2)


def _g55(x, y):
  return y[0] ** 2 + x * y[0]


def _G55(x, y):
  return jnp.array([x + y[0] - 1, x - y[0] - 100])


def test_example_5_5_closed_form():
  # All three pieces of Y_{alpha,beta}, including x > 50.5 where the actual
  # lower level is infeasible; one compiled, vmapped call.
  h = composite.nonpositive(2)
  solve = jax.jit(
    jax.vmap(lambda x, a, b: composite.solve(_g55, _G55, h, x, jnp.zeros(1), alpha=a, beta=b))
  )
  xs = jnp.array([0.5, 10.0, 60.0, 200.0] * 2)
  alphas = jnp.array([0.5] * 4 + [1e-3] * 4)
  betas = jnp.array([0.2] * 4 + [1e-3] * 4)
  sol = solve(xs, alphas, betas)
  assert np.all(np.asarray(sol.info.status) == Status.SUCCESS)
  expected = [_example_5_5(float(x), float(a), float(b)) for x, a, b in zip(xs, alphas, betas)]
  np.testing.assert_allclose(sol.y[:, 0], expected, rtol=1e-9, atol=1e-10)


def test_jacobian_inequality_constrained_qp():
  rng = np.random.default_rng(0)
  m, s, n = 5, 4, 3
  q = rng.normal(size=(m, m))
  Q = jnp.asarray(q @ q.T + np.eye(m))
  C = jnp.asarray(rng.normal(size=(m, n)))
  A = jnp.asarray(rng.normal(size=(s, m)))
  D = jnp.asarray(rng.normal(size=(s, n)))
  g = lambda x, y: 0.5 * y @ Q @ y - (C @ x) @ y
  G = lambda x, y: A @ y - 0.2 - D @ x
  sol = _check_jacobian(
    g, G, composite.nonpositive(s), jnp.asarray(rng.normal(size=n)), jnp.zeros(m), 1e-2, 1e-3
  )
  assert int(sol.info.num_active) > 0


def test_jacobian_lasso():
  rng = np.random.default_rng(1)
  n_obs, d = 12, 6
  A = jnp.asarray(rng.normal(size=(n_obs, d)))
  b = jnp.asarray(rng.normal(size=n_obs))
  g = lambda x, y: jnp.sum((A @ y - b - x[1]) ** 2)
  G = lambda x, y: jnp.exp(x[0]) * jnp.concatenate([y, -y])
  sol = _check_jacobian(g, G, composite.l1(d), jnp.array([1.5, 0.1]), jnp.zeros(d), 1e-3, 1e-3)
  assert np.sum(np.abs(np.asarray(sol.y)) < 1e-3) >= 1  # some coordinates at (near) 0


def test_jacobian_minimax():
  rng = np.random.default_rng(2)
  m, s, n = 3, 4, 2
  A = jnp.asarray(rng.normal(size=(s, m)))
  C = jnp.asarray(rng.normal(size=(s, n)))
  g = lambda x, y: 0.5 * jnp.sum((y - x[0]) ** 2)
  G = lambda x, y: A @ y + C @ x
  _check_jacobian(g, G, composite.maximum(s), jnp.array([0.3, -0.7]), jnp.zeros(m), 1e-2, 1e-2)


def test_jacobian_nonlinear_G():
  # Ball constraints |y - c_i(x)|^2 <= r^2: G convex and nonlinear in y.
  centers = jnp.array([[0.0, 0.0], [1.0, 0.5]])
  g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2) + 0.1 * jnp.sum(jnp.exp(y))
  G = lambda x, y: jnp.sum((y[None, :] - centers - 0.1 * x[None, :]) ** 2, axis=1) - 1.0
  sol = _check_jacobian(
    g, G, composite.nonpositive(2), jnp.array([2.0, -1.5]), jnp.zeros(2), 1e-2, 1e-3
  )
  assert int(sol.info.num_active) >= 1


def test_regularized_solution_approaches_lasso_solution():
  # Proposition 4.1: Y_{a,b}(x) -> Y(x) as a, b -> 0.  Reference: FISTA on
  # the (strongly convex) elastic net itself.
  rng = np.random.default_rng(3)
  A = rng.normal(size=(20, 8))
  b = rng.normal(size=20)
  lam1, lam2 = 3.0, 0.5
  L = 2 * np.linalg.norm(A, 2) ** 2 + lam2
  y = v = np.zeros(8)
  t = 1.0
  for _ in range(20000):
    grad = 2 * A.T @ (A @ v - b) + lam2 * v
    u = v - grad / L
    y_new = np.sign(u) * np.maximum(np.abs(u) - lam1 / L, 0)
    t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
    v = y_new + (t - 1) / t_new * (y_new - y)
    y, t = y_new, t_new
  g = lambda x, yy: (
    jnp.sum((jnp.asarray(A) @ yy - jnp.asarray(b)) ** 2) + 0.5 * lam2 * jnp.sum(yy**2)
  )
  G = lambda x, yy: lam1 * jnp.concatenate([yy, -yy])
  solve = jax.jit(
    jax.vmap(
      lambda reg: (
        composite.solve(g, G, composite.l1(8), jnp.zeros(1), jnp.zeros(8), alpha=reg, beta=reg).y
      )
    )
  )
  errors = list(np.max(np.abs(np.asarray(solve(jnp.array([1e-1, 1e-3, 1e-5, 1e-7]))) - y), axis=1))
  assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-5, errors


def test_unregularized_formula_matches_regularized_limit():
  # A QP with strict complementarity and LICQ: (3.14) and (3.6) at tiny
  # alpha, beta agree.
  Q = jnp.array([[2.0, 0.3], [0.3, 1.0]])
  g = lambda x, y: 0.5 * y @ Q @ y - x @ y
  G = lambda x, y: jnp.array([y[0] + y[1] - 1.0])
  x = jnp.array([3.0, 2.0])

  def first(derivative, reg):
    return lambda xx: (
      composite.solve(
        g, G, composite.nonpositive(1), xx, jnp.zeros(2), alpha=reg, beta=reg, derivative=derivative
      ).y
    )

  jac_u = jax.jit(jax.jacrev(first("unregularized", 1e-9)))(x)
  jac_r = jax.jit(jax.jacrev(first("regularized", 1e-9)))(x)
  np.testing.assert_allclose(jac_u, jac_r, atol=1e-6)
  # Closed form on the active face y0 + y1 = 1.
  np.testing.assert_allclose(jac_u @ jnp.ones(2), 0.0, atol=1e-8)


def test_gradients_in_alpha_beta_and_data():
  rng = np.random.default_rng(4)
  A = jnp.asarray(rng.normal(size=(10, 4)))
  b = jnp.asarray(rng.normal(size=10))

  def f(params):
    a_mat, alpha, beta = params
    g = lambda x, y: jnp.sum((a_mat @ y - b) ** 2)
    G = lambda x, y: x * jnp.concatenate([y, -y])
    sol = composite.solve(
      g, G, composite.l1(4), jnp.asarray(2.0), jnp.zeros(4), alpha=alpha, beta=beta, **TIGHT
    )
    return jnp.sum(sol.y * jnp.arange(1.0, 5.0))

  params = (A, jnp.asarray(0.05), jnp.asarray(0.02))
  grads = jax.jit(jax.grad(f))(params)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  f_flat = jax.jit(lambda v: f(unravel(v))[None])
  fd = _fd_jacobian(f_flat, flat)[0]
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0], fd, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_named():
  g = lambda x, y: jnp.sum(y**2)
  G = lambda x, y: jnp.concatenate([y, -y])
  h = composite.l1(2)
  y0 = jnp.zeros(2)
  kwargs = dict(alpha=1.0, beta=1.0)
  with pytest.raises(ValueError, match="`alpha`"):
    composite.solve(g, G, h, 0.0, y0, **{**kwargs, "alpha": 0.0})
  with pytest.raises(ValueError, match="`beta`"):
    composite.solve(g, G, h, 0.0, y0, **{**kwargs, "beta": -1.0})
  with pytest.raises(ValueError, match="`G`.*size 4"):
    composite.solve(g, lambda x, y: y, h, 0.0, y0, **kwargs)
  with pytest.raises(ValueError, match="`g`"):
    composite.solve(lambda x, y: y, G, h, 0.0, y0, **kwargs)
  with pytest.raises(ValueError, match="`derivative`"):
    composite.solve(g, G, h, 0.0, y0, derivative="exact", **kwargs)
  with pytest.raises(TypeError, match="`y0`"):
    composite.solve(g, G, h, 0.0, {"y": y0, "n": jnp.array(1)}, **kwargs)
  with pytest.raises(TypeError, match="unknown keyword.*maxiter"):
    composite.hypergradient(lambda x, y: y[0], g, G, h, 0.0, y0, maxiter=3, **kwargs)


def _below_zero():
  """min (y - x)^2 / 2 s.t. y <= 0 (h = indicator{z <= 0}, G = y)."""
  return (lambda x, y: 0.5 * jnp.sum((y - x) ** 2), lambda x, y: y, composite.nonpositive(1))


def _example_5_1():
  """Example 5.1: min x y s.t. x^2 >= 0, g = x y, G = (0, -x^2),
  h(z) = z_1 + indicator{z_2 <= 0}; S_{a,b}(x) = (-x / b, (1, 0))."""
  h = composite.polyhedral(a=[[1.0, 0.0]], b=[[0.0, 1.0]])
  return (lambda x, y: x * y[0], lambda x, y: jnp.stack([0.0 * y[0], -(x**2)]), h)


def test_relative_interior_condition():
  # ri_violated is True where an active piece has a zero multiplier (x = 0 in
  # both problems: no strict complementarity; the constraint x^2 >= 0 of
  # Example 5.1 with p_2 = 0, as in the paper) and False where the condition
  # holds (active with p = y*/alpha > 0 at x = 1, inactive at x = -1; Example
  # 5.1 at x = 1: -x^2 < 0 inactive).
  xs = jnp.array([0.0, 1.0, -1.0])
  for problem, expected in (
    (_below_zero, [True, False, False]),
    (_example_5_1, [True, False, False]),
  ):
    g, G, h = problem()
    sol = jax.jit(
      jax.vmap(lambda xx: composite.solve(g, G, h, xx, jnp.zeros(1), alpha=0.1, beta=0.1))
    )(xs)
    np.testing.assert_array_equal(sol.info.status, Status.SUCCESS)
    np.testing.assert_array_equal(sol.info.ri_violated, expected)
    # Strongly convex in y: the bound on cond(B^T A B) is 1.
    np.testing.assert_allclose(sol.info.condition_number, 1.0)
  np.testing.assert_allclose(sol.y[:, 0], -xs / 0.1, atol=1e-12)  # S(x) = (-x/b, (1, 0))
  np.testing.assert_allclose(sol.p, [[1.0, 0.0]] * 3, atol=1e-12)


def test_condition_number_grows_where_sosc_fails():
  # g = (y_1 + y_2 - x)^2 / 2 has no curvature along (1, -1): as beta -> 0
  # the lower bound on cond(B^T A B) grows like 1/(2 beta).
  flat = lambda x, y: 0.5 * (y[0] + y[1] - x) ** 2
  G = lambda x, y: jnp.atleast_1d(y[0] + y[1] - 5.0)
  regs = jnp.array([1e-2, 1e-4, 1e-6])
  info = jax.jit(
    jax.vmap(
      lambda reg: (
        composite.solve(
          flat, G, composite.nonpositive(1), 1.0, jnp.zeros(2), alpha=reg, beta=reg
        ).info
      )
    )
  )(regs)
  np.testing.assert_array_equal(info.status, Status.SUCCESS)
  np.testing.assert_allclose(info.condition_number * regs, 0.5, rtol=2e-2)


def test_hypergradient_and_its_solution():
  # phi(x) = y*(x)_1 with y* = x / (1 + beta + 1/alpha) for x > 0; x carries
  # an integer leaf, which gets no gradient.
  g, G, h = _below_zero()
  x = {"x": jnp.array(1.0), "n": jnp.array(3)}
  value, grad, sol = jax.jit(
    lambda xx: composite.hypergradient(
      lambda xx, y: y[0] * xx["n"],
      lambda xx, y: g(xx["x"], y),
      lambda xx, y: G(xx["x"], y),
      h,
      xx,
      jnp.zeros(1),
      alpha=0.1,
      beta=0.1,
      return_info=True,
    )
  )(x)
  expected = 3.0 / (1.1 + 10.0)
  np.testing.assert_allclose([value, grad["x"]], [expected, expected], rtol=1e-12)
  assert grad["n"] is None and int(sol.info.status) == Status.SUCCESS


def test_optax_driver_tunes_the_l1_weight():
  # The composite hypergradient in upper.optimize: Adam on log(lambda_1) of a
  # lasso decreases the validation error, warm-starting y.
  import optax
  from bilevel_jax import upper

  rng = np.random.default_rng(7)
  truth = np.zeros(10)
  truth[:3] = 1.0
  a_tr, a_val = rng.normal(size=(15, 10)), rng.normal(size=(40, 10))
  b_tr = a_tr @ truth + 0.5 * rng.normal(size=15)
  b_val = a_val @ truth + 0.5 * rng.normal(size=40)
  g = lambda lam, y: jnp.sum((a_tr @ y - b_tr) ** 2)
  G = lambda lam, y: jnp.exp(lam) * jnp.concatenate([y, -y])
  val = lambda lam, y: jnp.mean((a_val @ y - b_val) ** 2)
  hg = composite.make_hypergradient(val, g, G, composite.l1(10), alpha=1e-4, beta=1e-4)
  result = upper.optimize(
    hg, jnp.asarray(-3.0), optax.adam(0.3), steps=30, y0=jnp.zeros(10), warm_start=True
  )
  values = np.asarray(result.history["value"])
  assert int(result.info.status) == Status.SUCCESS
  # It ends near the best validation error over a grid of lambda.
  grid = jnp.linspace(-3.0, 4.0, 57)
  on_grid = jax.jit(jax.vmap(lambda lam: hg(lam, jnp.zeros(10))[0]))(grid)
  assert values[-1] < values[0]
  assert values[-1] <= float(jnp.min(on_grid)) + 1e-3 * float(jnp.min(on_grid))


def test_matrix_free_newton_matches_dense():
  # method="newton" with CG (matrix-free) against the default dense path, for
  # the solution and for the derivative (3.6).
  rng = np.random.default_rng(8)
  A = jnp.asarray(rng.normal(size=(12, 5)))
  b = jnp.asarray(rng.normal(size=12))
  g = lambda x, y: jnp.sum((A @ y - b) ** 2) + 0.1 * jnp.sum(y**2)
  G = lambda x, y: jnp.exp(x) * jnp.concatenate([y, -y])

  def value(x, **kwargs):
    sol = composite.solve(
      g, G, composite.l1(5), x, jnp.zeros(5), alpha=1e-2, beta=1e-2, max_steps=300, **kwargs
    )
    return jnp.sum(sol.y * jnp.arange(1.0, 6.0)), sol.info

  both = jax.jit(
    lambda x: (
      jax.value_and_grad(value, has_aux=True)(x),
      jax.value_and_grad(lambda xx: value(xx, method="newton", linear_solver="cg"), has_aux=True)(
        x
      ),
    )
  )
  ((v_dense, i_dense), g_dense), ((v_cg, i_cg), g_cg) = both(jnp.asarray(0.5))
  assert int(i_dense.status) == Status.SUCCESS and int(i_cg.status) == Status.SUCCESS
  assert float(i_dense.condition_number) >= 1 and np.isnan(float(i_cg.condition_number))
  np.testing.assert_allclose(v_cg, v_dense, rtol=1e-8)
  np.testing.assert_allclose(g_cg, g_dense, rtol=1e-6)


# ------------------------------------------------- warm starts and structure


def _elastic_net(seed=9, n_obs=15, d=6):
  rng = np.random.default_rng(seed)
  A = jnp.asarray(rng.normal(size=(n_obs, d)))
  b = jnp.asarray(rng.normal(size=n_obs))
  g = lambda x, y: jnp.sum((A @ y - b) ** 2) + 0.5 * jnp.exp(x[1]) * jnp.sum(y**2)
  G = lambda x, y: jnp.exp(x[0]) * jnp.concatenate([y, -y])
  return g, G, composite.l1(d)


@pytest.fixture(scope="module")
def enet_value_and_grad():
  g, G, h = _elastic_net()

  def value(x, y0, method, warm_steps):
    sol = composite.solve(
      g, G, h, x, y0, alpha=1e-5, beta=1e-5, method=method, warm_steps=warm_steps
    )
    return jnp.sum(sol.y * jnp.arange(1.0, 7.0)), sol

  return jax.jit(jax.value_and_grad(value, has_aux=True), static_argnums=(2, 3))


def test_warm_start_matches_cold_start(enet_value_and_grad):
  # method="warm" from the solution at a nearby x takes Newton steps only and
  # gives the cold interior-point solve's y and gradient.
  x = jnp.array([0.5, -1.0])
  (_, near), _ = enet_value_and_grad(x, jnp.zeros(6), "ipm", 10)
  x1 = x + jnp.array([1e-3, -2e-3])
  (v_cold, cold), g_cold = enet_value_and_grad(x1, jnp.zeros(6), "ipm", 10)
  (v_warm, warm), g_warm = enet_value_and_grad(x1, near.y, "warm", 10)
  assert int(cold.info.status) == int(warm.info.status) == Status.SUCCESS
  assert int(cold.info.interior_steps) > 0
  assert int(warm.info.interior_steps) == 0 and 1 <= int(warm.info.num_steps) <= 3
  np.testing.assert_allclose(warm.y, cold.y, atol=1e-10)
  np.testing.assert_allclose(v_warm, v_cold, rtol=1e-10)
  np.testing.assert_allclose(g_warm, g_cold, rtol=1e-7)


def test_warm_start_falls_back_to_interior_point(enet_value_and_grad):
  # A warm start far off at alpha = 1e-5 with one Newton step allowed: the
  # interior-point phase takes over; same y and gradient as a cold solve.
  x = jnp.array([1.0, -2.0])
  (_, cold), g_cold = enet_value_and_grad(x, jnp.zeros(6), "ipm", 10)
  (_, warm), g_warm = enet_value_and_grad(x, 5.0 * jnp.ones(6), "warm", 1)
  assert int(warm.info.status) == Status.SUCCESS
  assert int(warm.info.interior_steps) > 0 and int(warm.info.num_steps) >= 1
  np.testing.assert_allclose(warm.y, cold.y, atol=1e-10)
  np.testing.assert_allclose(g_warm, g_cold, rtol=1e-7)


def test_warm_newton_through_active_set_changes_needs_no_interior_point():
  # A jump of x that changes the active set over several Newton steps, each
  # not halving the residual: steps that change the active set count as
  # progress, so Newton finishes alone (the earlier stall test sent this
  # solve to the interior point after 3 steps).  Same y and value as a cold
  # solve.  (The warm hypergradient against the cold one is
  # test_warm_start_matches_cold_start's, in the extended run.)
  data = regression.make_instances(0, 1, dim=20, n_train=20, n_val=20, n_test=20)
  data = jax.tree_util.tree_map(lambda leaf: leaf[0], data)
  low = regression.elastic_net_lower(data)
  alpha = 4.432e-3
  x0, x1 = jnp.array([2.5, -0.097]), jnp.array([1.955, -0.736])

  @functools.partial(jax.jit, static_argnums=2)
  def value(x, y0, method):
    sol = composite.solve(low.g, low.G, low.h, x, y0, alpha=alpha, beta=alpha, method=method)
    return regression.mse(data.a_val, data.b_val, sol.y), sol

  near = value(x0, low.y0, "ipm")[1]
  v_warm, warm = value(x1, near.y, "warm")
  v_cold, cold = value(x1, low.y0, "ipm")
  assert int(warm.info.status) == int(cold.info.status) == Status.SUCCESS
  assert int(warm.info.interior_steps) == 0 and int(warm.info.num_steps) >= 4
  np.testing.assert_allclose(warm.y, cold.y, atol=1e-10)
  np.testing.assert_allclose(v_warm, v_cold, rtol=1e-10)


def test_jacobian_columns_read_off_the_jaxpr():
  # Rows of grad_y G supported on one column each are found from the jaxpr
  # (elementwise and structural primitives); anything else is None.
  from bilevel_jax._src.composite import structure

  x, y = jnp.array([0.3, 0.1]), jnp.arange(1.0, 5.0)
  cases = {
    "enet": (lambda x, y: jnp.exp(x[0]) * jnp.concatenate([y, -y]), [0, 1, 2, 3] * 2),
    "nonlinear": (lambda x, y: jnp.concatenate([y[:2] ** 2, jnp.exp(y[2:]) - x[1]]), [0, 1, 2, 3]),
    "reversed": (lambda x, y: jax.jit(lambda v: 2.0 * v[::-1])(y), [3, 2, 1, 0]),
    "constant rows": (lambda x, y: jnp.concatenate([y, jnp.ones(2)]), [0, 1, 2, 3, 0, 0]),
    "dense": (lambda x, y: jnp.ones((3, 4)) @ y, None),
    "two columns": (lambda x, y: y + y[::-1], None),
  }
  for name, (G, expected) in cases.items():
    columns = structure.jacobian_columns(G, (x, y), 1)
    if expected is None:
      assert columns is None, name
      continue
    np.testing.assert_array_equal(columns, expected, err_msg=name)
    jac = np.asarray(jax.jacfwd(G, argnums=1)(x, y))
    off = np.ones(jac.shape, bool)
    off[np.arange(len(columns)), columns] = False
    assert np.all(jac[off] == 0), name


@pytest.mark.parametrize("method", ["ipm", "warm"])
def test_separable_G_matches_the_dense_path(method):
  # G = e^l1 (y, -y) takes the structured path (J^T Q J as a scatter-add);
  # the same G as a matrix product takes the dense one.  Same y, p and
  # hypergradient in float64; the hypergradient matches finite differences.
  rng = np.random.default_rng(3)
  d = 6
  A = jnp.asarray(rng.normal(size=(15, d)))
  b = jnp.asarray(rng.normal(size=15))
  g = lambda x, y: jnp.sum((A @ y - b) ** 2) + 0.5 * jnp.exp(x[1]) * jnp.sum(y**2)
  stack = jnp.concatenate([jnp.eye(d), -jnp.eye(d)])
  separable = lambda x, y: jnp.exp(x[0]) * jnp.concatenate([y, -y])
  dense = lambda x, y: jnp.exp(x[0]) * (stack @ y)
  h = composite.l1(d)
  y0 = 0.3 * jnp.ones(d) if method == "warm" else jnp.zeros(d)

  @functools.partial(jax.jit, static_argnums=1)
  def value(x, G):
    sol = composite.solve(g, G, h, x, y0, alpha=1e-3, beta=1e-3, method=method)
    return jnp.sum(sol.y * jnp.arange(1.0, d + 1)), sol

  x = jnp.array([0.7, -1.0])
  (v_s, s_sol), (v_d, d_sol) = value(x, separable), value(x, dense)
  from bilevel_jax._src.composite import structure

  assert structure.jacobian_columns(separable, (x, y0), 1) is not None
  assert structure.jacobian_columns(dense, (x, y0), 1) is None
  assert int(s_sol.info.status) == int(d_sol.info.status) == Status.SUCCESS
  np.testing.assert_allclose(v_s, v_d, rtol=1e-12)
  np.testing.assert_allclose(s_sol.y, d_sol.y, atol=1e-12)
  np.testing.assert_allclose(s_sol.p, d_sol.p, atol=1e-9)
  grad = jax.jit(jax.grad(lambda x, G: value(x, G)[0]), static_argnums=1)
  g_s, g_d = grad(x, separable), grad(x, dense)
  np.testing.assert_allclose(g_s, g_d, rtol=1e-9)
  fd = finite_difference_grad(lambda x: value(x, separable)[0], x)
  np.testing.assert_allclose(g_s, fd, rtol=1e-5, atol=1e-8)


def test_bad_warm_steps_is_named():
  g, G, h = _elastic_net()
  with pytest.raises(ValueError, match="`warm_steps`"):
    composite.solve(
      g, G, h, jnp.zeros(2), jnp.zeros(6), alpha=1.0, beta=1.0, method="warm", warm_steps=0
    )
  with pytest.raises(ValueError, match="`linear_solver='cg'`"):
    composite.solve(
      g, G, h, jnp.zeros(2), jnp.zeros(6), alpha=1.0, beta=1.0, method="warm", linear_solver="cg"
    )


def test_constant_derivatives_are_read_off_the_jaxpr():
  from bilevel_jax._src.composite import structure

  A = jnp.ones((5, 3))
  y, p2, p1 = jnp.ones(3), jnp.ones(6), jnp.ones(1)

  def hess_dep(g, G, p):
    hess = lambda yy, pp: jax.hessian(lambda v: g(v) + jnp.vdot(G(v), pp))(yy)
    return structure.depends_on(hess, (y, p), (0, 1))

  def jac_dep(G):
    return structure.depends_on(jax.jacfwd(G), (y,), (0,))

  quad = lambda v: jnp.sum((A @ v - 1.0) ** 2) + 0.3 * jnp.vdot(v, v)
  affine = lambda v: 2.0 * jnp.concatenate([v, -v])
  ball = lambda v: jnp.sum(v**2)[None] - 1.0
  assert not hess_dep(quad, affine, p2) and not jac_dep(affine)
  assert hess_dep(lambda v: jnp.sum(jnp.exp(v)), affine, p2)
  assert hess_dep(quad, ball, p1) and jac_dep(ball)


def test_two_piece_prox_matches_enumeration():
  # The closed form for blocks max(c_1, c_2) against the enumeration of
  # active sets, including parallel pieces and points on the kink.
  from bilevel_jax._src.composite import polyhedral as poly

  rng = np.random.default_rng(10)
  cases = []
  for _ in range(200):
    a = np.abs(rng.normal(size=(2, 3)))
    alpha = rng.normal(size=2)
    cases.append((a, alpha, rng.normal(size=3) * 3, 10.0 ** rng.uniform(-6, 0)))
  a = np.array([[1.0, 0.0], [0.0, 1.0]])
  cases += [
    (a, np.zeros(2), np.array([0.3, 0.3]), 0.1),  # on the kink
    (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([0.0, 0.5]), np.ones(2), 0.2),
    (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([0.5, 0.0]), np.ones(2), 0.2),
  ]
  empty_b, empty_beta = jnp.zeros((0, 0)), jnp.zeros(0)
  closed = jax.jit(lambda a, al, z, s: poly._two_piece_prox(a, al, empty_b, empty_beta, z, s))
  enum = jax.jit(
    lambda a, al, z, s: poly._block_prox(a, al, jnp.zeros((0, a.shape[1])), empty_beta, z, s)
  )
  for a, alpha, z, step in cases:
    args = (jnp.asarray(a), jnp.asarray(alpha), jnp.asarray(z[: a.shape[1]]), step)
    w1, lam1, act1, ok1, weak1 = closed(*args)
    w2, lam2, act2, ok2, weak2 = enum(*args)
    np.testing.assert_allclose(w1, w2, atol=1e-10)
    np.testing.assert_allclose(lam1, lam2, atol=1e-8)
    assert np.array_equal(act1, act2) and bool(ok1) == bool(ok2) and bool(weak1) == bool(weak2)


def test_small_solve_matches_lapack():
  from bilevel_jax._src.composite import linalg

  rng = np.random.default_rng(11)
  solve = jax.jit(jax.vmap(linalg.small_solve))
  for n in (1, 2, 4, 7):
    mats = rng.normal(size=(20, n, n))
    mats[::4, 0] = 0.0  # needs a row exchange
    mats[::4, 0, -1] = 1e-3
    rhs = rng.normal(size=(20, n, 3))
    np.testing.assert_allclose(
      solve(jnp.asarray(mats), jnp.asarray(rhs)), np.linalg.solve(mats, rhs), rtol=1e-8, atol=1e-10
    )


# ------------------------------- no wrong answer reported as SUCCESS (i14)


def _jaxopt_lasso(dtype):
  """jaxopt's proximal-gradient lasso: 10 x 3 data of make_regression, the
  objective |A y - b|^2 / (2 n) + lam |y|_1 (sklearn's Lasso with alpha =
  lam), as g + h(G) with G = lam (y, -y), h = l1(3)."""
  datasets = pytest.importorskip("sklearn.datasets")
  a_np, b_np = datasets.make_regression(n_samples=10, n_features=3, random_state=0)
  A, b = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
  g = lambda lam, y: 0.5 * jnp.mean((A @ y - b) ** 2)
  G = lambda lam, y: lam * jnp.concatenate([y, -y])
  return g, G, composite.l1(3), (a_np, b_np)


def _sklearn_lasso(a_np, b_np, lams):
  linear_model = pytest.importorskip("sklearn.linear_model")
  return np.stack(
    [
      linear_model.Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=10**6)
      .fit(a_np, b_np)
      .coef_
      for lam in lams
    ]
  )


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_lasso_path_under_jit_matches_sklearn(dtype):
  # The issue's case: jitted, default method, alpha = beta in {1e-8, 1e-7,
  # 1e-6}: 18 points of the lasso path from 3 starts.  Every SUCCESS must be
  # sklearn's solution up to the O(alpha) shift of the regularization and
  # the precision; the failures that remain are reported (MAX_STEPS).
  g, G, h, (a_np, b_np) = _jaxopt_lasso(dtype)
  lam_max = np.max(np.abs(a_np.T @ b_np)) / a_np.shape[0]
  lams = lam_max * np.logspace(-3, 0.1, 18)
  ref = _sklearn_lasso(a_np, b_np, lams)
  solve = jax.jit(lambda lam, y0, reg: composite.solve(g, G, h, lam, y0, alpha=reg, beta=reg))
  starts = [np.zeros(3), 5 * np.ones(3), np.array([100.0, -50.0, 30.0])]
  base = 1e-8 if dtype == jnp.float64 else 5e-6
  tol = 1e-10 if dtype == jnp.float64 else 1e-5
  successes, total = 0, 0
  for reg in (1e-8, 1e-7, 1e-6):
    for y0 in starts:
      for lam, y_ref in zip(lams, ref):
        sol = solve(jnp.asarray(lam, dtype), jnp.asarray(y0, dtype), jnp.asarray(reg, dtype))
        total += 1
        if int(sol.info.status) != Status.SUCCESS:
          continue
        successes += 1
        err = np.max(np.abs(np.asarray(sol.y, np.float64) - y_ref)) / (1 + np.max(np.abs(y_ref)))
        assert err <= base + 5 * reg, (reg, lam, y0, np.asarray(sol.y), y_ref)
        assert float(sol.info.relative_residual) <= max(tol, 1e-6), sol.info
  assert successes >= (0.95 if dtype == jnp.float64 else 0.7) * total, (successes, total)


def test_issue_lasso_at_lam_10_and_its_derivative():
  # The issue's worst case: lam = 10, jitted, default method, alpha = beta =
  # 1e-8 gave y = 0 with status SUCCESS and a zero Jacobian.  The interior
  # phase now stops where rounding stalls it (INACCURATE), Newton polishes.
  g, G, h, (a_np, b_np) = _jaxopt_lasso(jnp.float64)
  y_ref = _sklearn_lasso(a_np, b_np, [10.0])[0]
  np.testing.assert_allclose(y_ref, [62.2, 29.0, 88.3], atol=0.05)
  solve = lambda lam: composite.solve(g, G, h, lam, jnp.zeros(3), alpha=1e-8, beta=1e-8)
  jac, sol = jax.jit(jax.jacrev(lambda lam: (solve(lam).y, solve(lam)), has_aux=True))(
    jnp.asarray(10.0)
  )
  assert int(sol.info.status) == Status.SUCCESS, sol.info
  assert int(sol.info.interior_status) in (Status.SUCCESS, Status.INACCURATE)
  assert float(sol.info.relative_residual) <= 1e-10
  np.testing.assert_allclose(sol.y, y_ref, rtol=1e-7)
  # dy/dlam on the all-active face: -(A^T A / n)^{-1} sign(y).
  expected = -np.linalg.solve(a_np.T @ a_np / a_np.shape[0], np.sign(y_ref))
  np.testing.assert_allclose(jac, expected, rtol=1e-6)


def test_diverging_interior_phase_keeps_its_best_iterate(monkeypatch):
  # Without the stall test the interior phase runs on past its attainable
  # accuracy, s and lam underflow and the iterates blow up (the issue's
  # trace: 1e-7 -> 7e21 -> 1e58 -> NaN).  It must report NONFINITE and
  # return its best iterate, from which Newton still finds the solution.
  from bilevel_jax._src.composite import ipm

  monkeypatch.setattr(ipm, "PATIENCE", 10**6)
  g, G, h, (a_np, b_np) = _jaxopt_lasso(jnp.float64)
  y_ref = _sklearn_lasso(a_np, b_np, [10.0])[0]
  sol = jax.jit(lambda lam: composite.solve(g, G, h, lam, jnp.zeros(3), alpha=1e-8, beta=1e-8))(
    jnp.asarray(10.0)
  )
  assert int(sol.info.interior_status) == Status.NONFINITE, sol.info
  assert int(sol.info.interior_steps) < 100
  assert int(sol.info.status) == Status.SUCCESS, sol.info
  np.testing.assert_allclose(sol.y, y_ref, rtol=1e-7)


@pytest.mark.parametrize("method, steps", [("newton", 100), ("warm", 100), ("ipm", 2)])
def test_success_only_below_tolerance_on_hard_cases(method, steps):
  # SUCCESS is decided at the returned point: its relative residual is at most
  # max(tol, floor / scale) with floor / scale <= eps^(1/4).  Cases that
  # returned wrong points as SUCCESS before (lasso at alpha = 1e-8 from far
  # starts; too few steps) either succeed truly or say they did not.
  g, G, h, (a_np, b_np) = _jaxopt_lasso(jnp.float64)
  lams = np.array([0.5, 10.0, 60.0, 150.0])
  ref = _sklearn_lasso(a_np, b_np, lams)
  solve = jax.jit(
    lambda lam, y0: composite.solve(
      g, G, h, lam, y0, alpha=1e-8, beta=1e-8, method=method, max_steps=steps
    )
  )
  cap = float(jnp.finfo(jnp.float64).eps) ** 0.25
  outcomes = set()
  for lam, y_ref in zip(lams, ref):
    for y0 in (np.zeros(3), np.array([100.0, -50.0, 30.0])):
      sol = solve(jnp.asarray(lam), jnp.asarray(y0))
      rel = float(sol.info.relative_residual)
      outcomes.add(int(sol.info.status))
      if int(sol.info.status) == Status.SUCCESS:
        assert rel <= cap, (lam, y0, sol.info)
        np.testing.assert_allclose(sol.y, y_ref, rtol=1e-6, atol=1e-6)
      else:
        assert not rel <= 1e-10, (lam, y0, sol.info)
  assert Status.SUCCESS in outcomes


@pytest.fixture(scope="module")
def enet_float64_at_small_alpha():
  g, G, h = _elastic_net()
  return jax.jit(
    lambda x: composite.solve(g, G, h, x, 5.0 * jnp.ones(6), alpha=1e-6, beta=1e-6, **TIGHT).y
  )(jnp.zeros(2))


@pytest.mark.parametrize("method", ["ipm", "newton"])
def test_float32_elastic_net_at_small_alpha(method, enet_float64_at_small_alpha):
  # The issue's float32 case: alpha = beta = 1e-6 from y0 = 5 gave a relative
  # residual of 1.01 with SUCCESS after one step.  p from the prox's
  # multipliers (no (G - w) / alpha cancellation) makes it solvable.
  x = jnp.zeros(2)
  _, _, h = _elastic_net()
  y64 = enet_float64_at_small_alpha
  rng = np.random.default_rng(9)
  A = jnp.asarray(rng.normal(size=(15, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=15), jnp.float32)
  g32 = lambda x, y: jnp.sum((A @ y - b) ** 2) + 0.5 * jnp.exp(x[1]) * jnp.sum(y**2)
  G32 = lambda x, y: jnp.exp(x[0]) * jnp.concatenate([y, -y])
  sol = jax.jit(
    lambda xx, y0: composite.solve(g32, G32, h, xx, y0, alpha=1e-6, beta=1e-6, method=method)
  )(x.astype(jnp.float32), 5.0 * jnp.ones(6, jnp.float32))
  assert sol.y.dtype == jnp.float32
  assert int(sol.info.status) == Status.SUCCESS, sol.info
  assert float(sol.info.relative_residual) <= 1e-5
  np.testing.assert_allclose(np.asarray(sol.y, np.float64), y64, atol=1e-5)


def test_nonfinite_h_data():
  data = dict(a=[[1.0, 0.0], [0.0, 1.0]], alpha=[0.0, 0.0], b=[[1.0, 1.0]], beta=[1.0])
  g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)

  @jax.jit
  def solve(arrays):
    # Traced data: no check at trace time; the solve reports NaN.
    return composite.solve(
      g,
      lambda x, y: y,
      composite.polyhedral(**arrays),
      jnp.array([1.0, 2.0]),
      jnp.zeros(2),
      alpha=1e-3,
      beta=1e-3,
    )

  clean = {k: jnp.asarray(v) for k, v in data.items()}
  assert int(solve(clean).info.status) == Status.SUCCESS
  for name in data:
    bad = np.array(data[name])
    bad.flat[0] = np.nan
    with pytest.raises(ValueError, match=f"`{name}` must be finite"):
      composite.polyhedral(**{**data, name: bad})
    assert int(solve({**clean, name: jnp.asarray(bad)}).info.status) != Status.SUCCESS
  with pytest.raises(ValueError, match="`c` must be finite"):
    composite.linear([1.0, np.inf])


def test_l1_scale_is_differentiable():
  # The weight of l1 in `scale` or in G: the same solution and derivative,
  # both equal to finite differences (the scale used to get a zero cotangent).
  g, _, _, _ = _jaxopt_lasso(jnp.float64)
  weights = jnp.arange(1.0, 4.0)

  def upper(lam_vec, placement):
    lam = lam_vec[0]
    # e_alpha(lam h_1)(z) = e_{alpha lam^2} h_1(lam z): the same problem, with
    # p = lam p_1.
    if placement == "scale":
      h, G = composite.l1(3, scale=lam), lambda x, y: jnp.concatenate([y, -y])
      alpha, p_1 = 1e-3, lambda p: p / lam
    else:
      h, G = composite.l1(3), lambda x, y: x * jnp.concatenate([y, -y])
      alpha, p_1 = 1e-3 * lam**2, lambda p: p
    sol = composite.solve(g, G, h, lam, jnp.zeros(3), alpha=alpha, beta=1e-3, **TIGHT)
    return jnp.sum(sol.y * weights) + jnp.sum(p_1(sol.p) * jnp.arange(6.0)), sol

  value_and_grad = jax.jit(jax.value_and_grad(upper, has_aux=True), static_argnums=1)
  eps = 1e-5
  for lam in (10.0, 60.0):
    out = {}
    for placement in ("scale", "G"):
      (value, sol), grad = value_and_grad(jnp.array([lam]), placement)
      assert int(sol.info.status) == Status.SUCCESS
      fd = (
        value_and_grad(jnp.array([lam + eps]), placement)[0][0]
        - value_and_grad(jnp.array([lam - eps]), placement)[0][0]
      ) / (2 * eps)
      np.testing.assert_allclose(grad[0], fd, rtol=1e-6)
      out[placement] = (float(value), float(grad[0]), np.asarray(sol.y))
    assert abs(out["scale"][1]) > 0.1
    np.testing.assert_allclose(out["scale"][:2], out["G"][:2], rtol=1e-9)
    np.testing.assert_allclose(out["scale"][2], out["G"][2], rtol=1e-9, atol=1e-9)
  assert composite.hinge(2, scale=jnp.asarray(2.0)).scale is None  # concrete: slopes
  traced = jax.jit(lambda s: composite.hinge(2, scale=s)(jnp.array([1.0, -1.0])))
  assert float(traced(jnp.asarray(2.0))) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="`scale`"):
    jax.jit(lambda s: composite.separable(composite.l1(1, scale=s)).size)(1.0)
