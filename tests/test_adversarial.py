"""Adversarial inputs: no wrong answer reported as SUCCESS, no silently zero
gradient, and errors that name the argument (issue "No wrong answer
reported as success; clear errors", the solver part).

One test per case, grouped by kind:

* a result that is wrong or undefined must not come back as SUCCESS
  (non-finite values, a lower level unbounded below, a lower solution that
  is not a minimum, a failed adjoint solve, overflowing hull points);
* a step size, alpha, mu or eps that is only known at run time (traced under
  jit or vmap) and out of range gives ``Status.INVALID_INPUT`` (or NaN for
  the smoothing functions, which have no status);
* an x-dependent feasible set is differentiated, not dropped;
* bad arguments raise an error that names the argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import SolverError, Status, bda, implicit, projections, smoothing, upper
from bilevel_jax import value
from bilevel_jax._src import validation
from tests.helpers import finite_difference_grad

X2 = jnp.array([1.0, 2.0])
PULL = lambda x, y: jnp.sum((y - x) ** 2)  # F: pulls y towards x
BOWL = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)  # a well-posed lower level
BDA_KW = dict(steps=20, upper_lr=0.5, lower_lr=0.5)


def _status(solution):
  return int(solution.info.status)


# ------------------------------------------- 2. wrong or undefined, not SUCCESS


def test_bda_upper_nan_at_x_is_nonfinite():
  # F is NaN through x alone: y_K stays finite, the value does not.
  upper_fn = lambda x, y: jnp.sqrt(-1.0 - jnp.sum(x**2)) + jnp.sum(y)
  value_, _, sol = bda.hypergradient(
    upper_fn, BOWL, X2, jnp.zeros(2), return_info=True, alpha=0.5, **BDA_KW
  )
  assert np.isnan(value_)
  assert _status(sol) == Status.NONFINITE


def test_bda_nonfinite_gradient_is_nonfinite():
  # A finite value whose gradient in x is infinite (sqrt at 0).
  upper_fn = lambda x, y: jnp.sum(jnp.sqrt(jnp.abs(x))) + jnp.sum(y**2)
  value_, grad, sol = bda.hypergradient(
    upper_fn, BOWL, jnp.zeros(2), jnp.zeros(2), return_info=True, alpha=0.0, **BDA_KW
  )
  assert np.isfinite(value_) and not np.all(np.isfinite(grad))
  assert _status(sol) == Status.NONFINITE


@pytest.mark.parametrize("alpha", [0.0, 0.5], ids=["rhg", "bda"])
def test_bda_lower_linear_unbounded_is_diverged(alpha):
  sol = bda.solve(PULL, lambda x, y: jnp.sum(y), X2, jnp.zeros(2), alpha=alpha, **BDA_KW)
  assert float(sol.info.residual) == pytest.approx(np.sqrt(2.0))
  assert _status(sol) == Status.DIVERGED


@pytest.mark.parametrize("alpha", [0.0, 0.5], ids=["rhg", "bda"])
def test_bda_lower_concave_unbounded_is_diverged(alpha):
  sol = bda.solve(PULL, lambda x, y: -0.5 * jnp.sum(y**2), X2, jnp.ones(2), alpha=alpha, **BDA_KW)
  assert _status(sol) == Status.DIVERGED


def test_bda_diverged_throws():
  with pytest.raises(SolverError, match="DIVERGED"):
    bda.solve(PULL, lambda x, y: jnp.sum(y), X2, jnp.zeros(2), alpha=0.0, throw=True, **BDA_KW)


@pytest.mark.parametrize(
  "case",
  [
    "bounded",
    "anisotropic_compromise",
    "start_at_minimum",
    "start_at_compromise",
    "linear_on_a_box",
  ],
)
def test_bda_settling_runs_are_not_diverged(case):
  # No false alarm: BDA with a constant alpha settles at a compromise whose
  # lower residual grows (10 -> 50 here) but where f curves up.
  if case == "start_at_compromise":  # y0 = 2x/3 is BDA's fixed point: y does not move
    sol = bda.solve(PULL, lambda x, y: 0.5 * jnp.sum(y**2), X2, 2 * X2 / 3, alpha=0.5, **BDA_KW)
    assert float(sol.info.residual) > 1.0
  elif case == "linear_on_a_box":  # f = sum(y) is bounded below on the box
    sol = bda.solve(
      PULL,
      lambda x, y: jnp.sum(y),
      X2,
      jnp.zeros(2),
      alpha=0.0,
      prox=lambda x, y, s: jnp.clip(y, -1.0, 1.0),
      **BDA_KW,
    )
    np.testing.assert_allclose(sol.y, [-1.0, -1.0])
  elif case == "bounded":
    sol = bda.solve(PULL, BOWL, X2, jnp.zeros(2), alpha=0.5, **BDA_KW)
  elif case == "anisotropic_compromise":
    sol = bda.solve(
      lambda x, y: jnp.sum((y - jnp.array([0.0, 1.0])) ** 2),
      lambda x, y: 0.5 * (y[0] ** 2 + 100 * y[1] ** 2),
      X2,
      jnp.array([10.0, 0.0]),
      steps=20,
      upper_lr=0.5,
      lower_lr=0.01,
      alpha=0.5,
    )
    assert float(sol.info.residual) > 10.0
  else:
    sol = bda.solve(PULL, lambda x, y: 0.5 * jnp.sum(y**2), X2, jnp.zeros(2), alpha=0.5, **BDA_KW)
  assert _status(sol) == Status.SUCCESS


def test_bda_traced_nonpositive_lower_lr_is_invalid():
  run = lambda lr: (
    bda.solve(
      PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=0.5, lower_lr=lr, alpha=0.5
    ).info.status
  )
  statuses = jax.vmap(run)(jnp.array([0.5, 0.0, -0.5, jnp.nan]))
  np.testing.assert_array_equal(statuses, [Status.SUCCESS] + 3 * [Status.INVALID_INPUT])


def test_bda_traced_negative_upper_lr_is_invalid():
  run = jax.jit(
    lambda lr: (
      bda.solve(
        PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=lr, lower_lr=0.5, alpha=0.5
      ).info.status
    )
  )
  assert int(run(-0.5)) == Status.INVALID_INPUT


def test_bda_traced_alpha_outside_unit_interval_is_invalid():
  run = lambda a: (
    bda.solve(
      PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=0.5, lower_lr=0.5, alpha=a
    ).info.status
  )
  statuses = jax.vmap(run)(jnp.array([-0.1, 0.5, 1.5]))
  np.testing.assert_array_equal(
    statuses, [Status.INVALID_INPUT, Status.SUCCESS, Status.INVALID_INPUT]
  )


def test_bda_traced_schedule_outside_unit_interval_is_invalid():
  # alpha_k = c / k with a traced c = 1.5: alpha_1 = 1.5.
  run = jax.jit(
    lambda c: (
      bda.solve(
        PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=0.5, lower_lr=0.5, alpha=lambda k: c / k
      ).info.status
    )
  )
  assert int(run(1.5)) == Status.INVALID_INPUT
  assert int(run(0.5)) == Status.SUCCESS


def test_bda_traced_invalid_throws_under_jit():
  run = jax.jit(
    lambda lr: (
      bda.solve(
        PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=0.5, lower_lr=lr, alpha=0.5, throw=True
      ).info.status
    )
  )
  with pytest.raises(Exception, match="INVALID_INPUT"):
    jax.block_until_ready(run(-1.0))


def test_quadratic_traced_nonpositive_mu_is_invalid():
  run = lambda mu: value.quadratic(BOWL, X2, jnp.zeros(2), mu=mu).info.status
  statuses = jax.vmap(run)(jnp.array([0.1, 0.0, -1.0]))
  np.testing.assert_array_equal(statuses, [Status.SUCCESS] + 2 * [Status.INVALID_INPUT])


def test_entropic_traced_nonpositive_mu_is_invalid():
  g = lambda x, y: jnp.sum((y - x[0]) ** 2)
  box = (jnp.array([-1.0]), jnp.array([1.0]))
  run = jax.jit(lambda mu: value.entropic(g, jnp.array([0.2]), mu=mu, box=box).info.status)
  assert int(run(-0.05)) == Status.INVALID_INPUT


def test_vfp_traced_negative_epsilon_is_invalid():
  import optax

  g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)
  f = lambda x, y: 0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * jnp.sum(y**2)
  value_fn = lambda x, mu: value.quadratic(g, x, jnp.zeros(1), mu=mu)

  def run(eps):
    return value.solve_vfp(
      f,
      g,
      value_fn,
      jnp.array([0.3]),
      jnp.zeros(1),
      mus=jnp.array([0.1]),
      epsilon=eps,
      optimizer=optax.sgd(0.1),
      inner_steps=2,
      outer_steps=1,
    ).info.status

  assert int(jax.jit(run)(-0.05)) == Status.INVALID_INPUT


@pytest.mark.parametrize(
  "fn",
  [
    lambda t, mu: smoothing.plus(t, mu),
    lambda t, mu: smoothing.plus(t, mu, "chks"),
    lambda t, mu: smoothing.plus(t, mu, "uniform"),
    lambda t, mu: smoothing.plus(t, mu, "gaussian"),
    lambda t, mu: smoothing.abs(t, mu),
    lambda t, mu: smoothing.max(t, mu),
    smoothing.moreau_abs,
    smoothing.moreau_hinge,
    lambda t, mu: smoothing.moreau_box(t, mu, -1.0, 1.0),
  ],
  ids=[
    "plus",
    "chks",
    "uniform",
    "gaussian",
    "abs",
    "max",
    "moreau_abs",
    "moreau_hinge",
    "moreau_box",
  ],
)
def test_smoothing_traced_nonpositive_mu_is_nan(fn):
  t = jnp.array([-0.5, 0.0, 2.0])
  out = jax.vmap(lambda mu: fn(t, mu))(jnp.array([0.1, 0.0, -1.0]))
  assert np.all(np.isfinite(out[0]))
  assert np.all(np.isnan(out[1:]))


@functools.cache
def _gradient_sampling_info():
  """Algorithm 1 jitted over four of its parameters (compiled once)."""
  fun = lambda x, a, b: jnp.sum(jnp.abs(x - 1.0))
  return jax.jit(
    lambda eps0, alpha0, mu_eps, gamma: (
      upper.gradient_sampling(
        fun,
        jnp.array([2.0]),
        key=jax.random.PRNGKey(0),
        num_samples=2,
        max_steps=5,
        eps0=eps0,
        alpha0=alpha0,
        mu_eps=mu_eps,
        gamma=gamma,
      ).info
    )
  )


@pytest.mark.parametrize("name", ["eps0", "alpha0", "mu_eps", "gamma"])
def test_gradient_sampling_traced_bad_parameter_is_invalid(name):
  params = {"eps0": 1.0, "alpha0": 1.0, "mu_eps": 0.5, "gamma": 0.5}
  good = _gradient_sampling_info()(**params)
  assert int(good.num_steps) > 0 and int(good.status) != Status.INVALID_INPUT
  params[name] = {"eps0": -1.0, "alpha0": 0.0, "mu_eps": 1.5, "gamma": -0.5}[name]
  info = _gradient_sampling_info()(**params)
  assert int(info.status) == Status.INVALID_INPUT
  assert int(info.num_steps) == 0


def test_sqp_gradient_sampling_traced_negative_rho0_is_invalid():
  run = jax.jit(
    lambda rho: (
      upper.sqp_gradient_sampling(
        lambda x, a, b: -x[0],
        lambda x: x - 1.0,
        jnp.array([0.0]),
        key=jax.random.PRNGKey(0),
        num_samples=2,
        max_steps=5,
        rho0=rho,
      ).info.status
    )
  )
  assert int(run(-0.5)) == Status.INVALID_INPUT


# f(x, y) = -y^2 / 2 + x y: stationary (a maximum) at y = x.
MAXIMUM = lambda x, y: -0.5 * jnp.sum(y**2) + x * jnp.sum(y)


def test_implicit_solve_at_local_maximum_is_not_convex():
  sol = implicit.solve(MAXIMUM, 0.0, jnp.zeros(1))
  assert int(sol.info.num_steps) == 0  # started at the stationary point
  assert float(sol.info.curvature) < 0
  assert _status(sol) == Status.NOT_CONVEX


@pytest.mark.parametrize("linear_solver", ["cg", "dense"])
def test_implicit_hypergradient_at_local_maximum_is_not_convex(linear_solver):
  _, _, sol = implicit.hypergradient(
    lambda x, y: jnp.sum(y),
    MAXIMUM,
    0.0,
    jnp.zeros(1),
    return_info=True,
    linear_solver=linear_solver,
  )
  assert _status(sol) == Status.NOT_CONVEX


def test_implicit_saddle_seen_by_cg_is_not_convex():
  # f = (3 y1^2 - y2^2) / 2 - x y2: every +-1 probe sees curvature 2 > 0, but
  # the adjoint right-hand side grad_y F = (0, 1) lies along the negative one.
  f = lambda x, y: 0.5 * (3 * y[0] ** 2 - y[1] ** 2) - x * y[1]
  _, _, sol = implicit.hypergradient(lambda x, y: y[1], f, 0.0, jnp.zeros(2), return_info=True)
  assert float(sol.info.curvature) <= 0
  assert _status(sol) == Status.NOT_CONVEX


@pytest.mark.parametrize("linear_solver", ["cg", "dense"])
def test_implicit_singular_hessian_is_not_success(linear_solver):
  # f does not depend on y2: hess_yy f = diag(1, 0), the hypergradient is NaN.
  f = lambda x, y: 0.5 * y[0] ** 2 - x * y[0] + 0.0 * y[1]
  _, _, sol = implicit.hypergradient(
    lambda x, y: jnp.sum(y), f, 0.0, jnp.zeros(2), return_info=True, linear_solver=linear_solver
  )
  assert _status(sol) == Status.NOT_CONVEX


def test_implicit_nan_hessian_gives_nan_gradient_not_zero():
  # A NaN in the lower level must not turn into a finite (zero) adjoint term.
  f = lambda x, y: 0.5 * jnp.sum(y**2) * x - jnp.sum(y)
  _, grad, sol = implicit.hypergradient(
    lambda x, y: jnp.sum(y**2), f, jnp.nan, jnp.ones(2), return_info=True
  )
  assert not np.isfinite(grad)
  assert _status(sol) == Status.NONFINITE


def test_implicit_adjoint_not_converged_is_max_steps():
  a = jnp.diag(jnp.array([1.0, 10.0, 100.0]))
  f = lambda x, y: 0.5 * y @ a @ y - jnp.sum(x * y)
  _, _, sol = implicit.hypergradient(
    lambda x, y: jnp.sum(y**2),
    f,
    jnp.ones(3),
    jnp.zeros(3),
    return_info=True,
    solver="newton",
    linear_max_steps=1,
  )
  assert float(sol.info.residual) < 1e-8  # the lower solve succeeded
  assert float(sol.info.linear_residual) > 1e-3
  assert _status(sol) == Status.MAX_STEPS


def test_implicit_strongly_convex_reports_positive_curvature():
  a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
  f = lambda x, y: 0.5 * y @ a @ y - jnp.sum(x * y)
  _, _, sol = implicit.hypergradient(
    lambda x, y: jnp.sum(y), f, jnp.ones(2), jnp.zeros(2), return_info=True
  )
  assert _status(sol) == Status.SUCCESS
  lam = np.linalg.eigvalsh(np.asarray(a))
  assert lam[0] - 1e-9 <= float(sol.info.curvature) <= lam[1] + 1e-9


def test_min_norm_hull_overflowing_points_are_exact():
  # |w_i|^2 overflows float64: the Gram matrix used to be inf and the
  # answer (1e200, 1) came back as SUCCESS; the min-norm point is (0, 1).
  sol = upper.min_norm_hull(jnp.array([[1e200, 1.0], [-1e200, 1.0]]))
  np.testing.assert_allclose(sol.point, [0.0, 1.0], atol=1e-12)
  assert _status(sol) == Status.SUCCESS


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_min_norm_hull_nonfinite_point_is_flagged(bad):
  sol = upper.min_norm_hull(jnp.array([[bad, 1.0], [0.0, 1.0]]))
  assert _status(sol) == Status.NONFINITE


# ------------------------------------------------- 3. no silently zero gradient


def _interval_value(x, mu=1e-3):
  """v_mu(x) = min over Y(x) = [-x, x]^2 of |y - 2|^2 + x sum(y) + mu/2 |y|^2."""
  g = lambda xx, y: jnp.sum((y - 2.0) ** 2) + xx * jnp.sum(y)
  return value.quadratic(g, x, jnp.zeros(2), mu=mu, projection=lambda y: jnp.clip(y, -x, x)).value


@pytest.mark.parametrize("x0", [0.5, 1.5])
def test_quadratic_x_dependent_projection_is_differentiated(x0):
  grad = jax.grad(_interval_value)(x0)
  fd = finite_difference_grad(lambda x: _interval_value(x[0]), np.array([x0]))[0]
  assert abs(float(grad)) > 1.0  # not the silent 0
  assert float(grad) == pytest.approx(fd, rel=1e-6, abs=1e-7)


def test_quadratic_x_dependent_projection_under_jit_and_vmap():
  xs = jnp.array([0.5, 1.5])
  expected = [jax.grad(_interval_value)(x) for x in xs]
  np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(_interval_value)))(xs), expected, rtol=1e-9)


def test_quadratic_projection_bounds_get_cotangents():
  g = lambda x, y: jnp.sum((y + 2.0) ** 2)  # pushes y down onto the lower bound

  def v(lo):
    return value.quadratic(
      g, 0.0, jnp.zeros(2), mu=1e-3, projection=lambda y: jnp.clip(y, lo, 1.0)
    ).value

  lo = jnp.array([-1.0, -0.5])
  np.testing.assert_allclose(jax.grad(v)(lo), finite_difference_grad(v, lo), rtol=1e-6)


# ------------------------------------------------ 4. errors name the argument


def test_bda_int_x_names_x():
  with pytest.raises(TypeError, match="`x`"):
    bda.hypergradient(PULL, BOWL, 1, jnp.zeros(1), alpha=0.5, **BDA_KW)


def test_bda_prox_with_wrong_signature_names_prox():
  with pytest.raises(TypeError, match="`prox`"):
    bda.solve(PULL, BOWL, X2, jnp.zeros(2), alpha=0.5, prox=lambda y: y, **BDA_KW)


def test_bda_alpha_string_names_alpha():
  with pytest.raises(TypeError, match="`alpha`"):
    bda.solve(PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=0.5, lower_lr=0.5, alpha="0.5/k")


def test_bda_lower_lr_shape_names_lower_lr():
  with pytest.raises(ValueError, match="`lower_lr`"):
    bda.solve(PULL, BOWL, X2, jnp.zeros(2), steps=5, upper_lr=0.5, lower_lr=jnp.ones(3), alpha=0.5)


def test_bda_per_coordinate_lower_lr_is_accepted():
  sol = bda.solve(
    PULL, BOWL, X2, jnp.zeros(2), steps=40, upper_lr=0.5, lower_lr=jnp.array([0.5, 0.25]), alpha=0.0
  )
  np.testing.assert_allclose(sol.y, X2, rtol=1e-4)
  assert jnp.shape(sol.info.residual) == ()


@pytest.mark.parametrize("steps", [2**24 + 1, 2**31])
def test_bda_huge_steps_is_bounded(steps):
  with pytest.raises(ValueError, match="`steps` must be at most"):
    bda.solve(PULL, BOWL, X2, jnp.zeros(2), steps=steps, upper_lr=0.5, lower_lr=0.5, alpha=0.5)


def test_implicit_huge_max_steps_is_bounded():
  with pytest.raises(ValueError, match="`max_steps` must be at most"):
    implicit.solve(BOWL, X2, jnp.zeros(2), max_steps=2**31)


GS_FUN = lambda x, a, b: jnp.sum(jnp.abs(x - 1.0))
GS_KW = dict(num_samples=2, max_steps=2)


def test_gradient_sampling_vector_fun_names_fun():
  with pytest.raises(ValueError, match="`fun` must return a scalar"):
    upper.gradient_sampling(lambda x, a, b: x, jnp.array([2.0]), key=jax.random.PRNGKey(0), **GS_KW)


def test_gradient_sampling_one_argument_fun_names_the_call():
  with pytest.raises(TypeError, match=r"`fun` failed when called as fun\(x0, alpha0, beta0\)"):
    upper.gradient_sampling(
      lambda x: jnp.sum(x), jnp.array([2.0]), key=jax.random.PRNGKey(0), **GS_KW
    )


@pytest.mark.parametrize("x0", [2, [2**70], np.array([2])], ids=["int", "big_int", "array"])
def test_gradient_sampling_integer_x0_names_x0(x0):
  with pytest.raises(TypeError, match="`x0`"):
    upper.gradient_sampling(GS_FUN, x0, key=jax.random.PRNGKey(0), **GS_KW)


@pytest.mark.parametrize("key", [0, np.float32(1.0), "seed"])
def test_gradient_sampling_bad_key_names_key(key):
  with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
    upper.gradient_sampling(GS_FUN, jnp.array([2.0]), key=key, **GS_KW)


def test_typed_and_raw_keys_are_accepted():
  validation.check_prng_key("key", jax.random.key(0))
  validation.check_prng_key("key", jax.random.PRNGKey(0))
  validation.check_prng_key("key", jax.random.split(jax.random.PRNGKey(0), 3))


@pytest.mark.parametrize(
  "points",
  [jnp.zeros((0, 2)), jnp.zeros((2, 0)), jnp.zeros(3)],
  ids=["no_points", "no_coordinates", "1d"],
)
def test_min_norm_hull_empty_names_points(points):
  with pytest.raises(ValueError, match="`points`"):
    upper.min_norm_hull(points)


def test_smoothing_max_of_empty_names_z():
  with pytest.raises(ValueError, match="`z`"):
    smoothing.max(jnp.zeros((0,)), 0.1)


def test_projection_box_is_unchanged_by_the_new_rule():
  # A projection closing over constants only: the Danskin gradient as before.
  g = lambda x, y: x * y[0]
  grad = jax.grad(
    lambda x: (
      value.quadratic(g, x, jnp.zeros(1), mu=1e-2, projection=projections.box(-1.0, 1.0)).value
    )
  )(0.5)
  assert float(grad) == pytest.approx(-1.0)
