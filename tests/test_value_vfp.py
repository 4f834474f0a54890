"""solve_vfp (Proposition 2.13) on a problem whose (VFP_eps) solution and
multiplier are known, its status (inner failures passed on, NOT_STATIONARY by
default, growing multipliers), bad input, and the value modules' docstring
examples."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax._src.fista as fista_module
import bilevel_jax._src.sampling as sampling_module
import bilevel_jax._src.value.consistency as consistency_module
import bilevel_jax._src.value.entropic as entropic_module
import bilevel_jax._src.value.quadratic as quadratic_module
import bilevel_jax._src.value.vfp as vfp_module
from bilevel_jax import SolverError
from bilevel_jax import Status
from bilevel_jax import value

EPS = 0.02
D = np.sqrt(2 * EPS)  # |y - x| at the solution


def upper(x, y):
  return 0.5 * (y[0] - 3.0) ** 2 + 0.5 * (x - 1.0) ** 2


def lower(x, y):
  """v = 0 on Y = R, so (VFP_eps) is min F s.t. |y - x| <= sqrt(2 eps):
  x* = 2 - d/2, y* = 2 + d/2, lambda* = (1 - d/2)/d = 4.5 for eps = 0.02."""
  return 0.5 * (y[0] - x) ** 2


VALUE_FNS = {
  "quadratic": lambda x, mu: value.quadratic(lower, x, jnp.zeros(1), mu=mu),
  "entropic": lambda x, mu: value.entropic(
    lower, x, mu=mu, box=(jnp.array([-5.0]), jnp.array([5.0])), order=8, panels=64
  ),
}


@pytest.mark.parametrize("name", sorted(VALUE_FNS))
def test_solve_vfp_recovers_solution_and_multiplier(name):
  mus = value.geometric_mus(1e-1, 0.1, 4)
  solve = jax.jit(
    lambda x0, y0: value.solve_vfp(
      upper,
      lower,
      VALUE_FNS[name],
      x0,
      y0,
      mus=mus,
      epsilon=EPS,
      optimizer=optax.adam(3e-2),
      inner_steps=150,
      outer_steps=8,
    )
  )
  sol = solve(jnp.asarray(0.0), jnp.zeros(1))
  info = sol.info
  assert int(info.status) == Status.SUCCESS and int(info.inner_status) == Status.SUCCESS
  assert int(info.num_steps) == 4 * 8 * 150 and not bool(info.lambda_growing)
  # Default kkt_tol = 1e-2 (1 + ||grad f(x0, y0)||), grad f = (-1, -3) at the start.
  np.testing.assert_allclose(float(info.kkt_tol), 1e-2 * (1 + np.sqrt(10.0)), rtol=1e-12)
  assert float(info.residual) == float(info.kkt_residual[-1]) <= float(info.kkt_tol)
  assert info.lambdas.shape == (4,) and info.xs.shape == (4,) and info.ys.shape == (4, 1)
  np.testing.assert_allclose(info.mus, mus)
  assert bool(jnp.all(info.lambdas >= 0))
  np.testing.assert_allclose(float(sol.x), 2 - D / 2, atol=3e-3)
  np.testing.assert_allclose(float(sol.y[0]), 2 + D / 2, atol=3e-3)
  lam_star = (1 - D / 2) / D
  errors = np.abs(np.asarray(info.lambdas) - lam_star)
  assert errors[-1] < 0.2 and errors[-1] < errors[0]  # lambda_k -> lambda* as mu_k -> 0
  assert float(info.feasibility[-1]) < 1e-4 and float(info.complementarity[-1]) < 1e-3
  assert float(info.kkt_residual[-1]) < 0.05
  np.testing.assert_allclose(
    info.kkt_residual,
    np.maximum.reduce([info.stationarity, info.feasibility, info.complementarity]),
  )


def test_solve_vfp_passes_inner_failure_and_reports_not_stationary():
  """The issue's case: an entropic v_mu whose rule is far too coarse for mu
  (2 nodes on [-5, 5], mu = 1e-3) is INACCURATE; solve_vfp used to say SUCCESS."""
  coarse = lambda x, mu: value.entropic(
    lower, x, mu=mu, box=(jnp.array([-5.0]), jnp.array([5.0])), order=2, panels=1
  )
  kw = dict(
    mus=[1e-1, 1e-3], epsilon=EPS, optimizer=optax.adam(3e-2), inner_steps=20, outer_steps=2
  )
  solve = jax.jit(
    lambda x0, y0, tol: value.solve_vfp(upper, lower, coarse, x0, y0, kkt_tol=tol, **kw)
  )
  info = solve(jnp.asarray(0.0), jnp.zeros(1), 1e3).info  # a loose kkt_tol: only the inner fails
  assert int(info.status) == Status.INNER_FAILED
  assert int(info.inner_status) == Status.INACCURATE
  assert int(info.inner_statuses[-1]) == Status.INACCURATE
  assert int(info.inner_failures) >= 1
  # With the default kkt_tol, 4 small steps are far from stationary: NOT_STATIONARY
  # (the exact v = 0 as a bare value: no inner status).
  few = dict(kw, mus=[1e-1], inner_steps=2, optimizer=optax.sgd(1e-3))
  exact = lambda x, mu: 0.0 * x
  sol = value.solve_vfp(upper, lower, exact, 0.0, jnp.zeros(1), **few)
  assert int(sol.info.status) == Status.NOT_STATIONARY
  assert float(sol.info.residual) > float(sol.info.kkt_tol)
  assert int(sol.info.inner_status) == Status.SUCCESS
  with pytest.raises(SolverError, match=r"`value.solve_vfp` failed: NOT_STATIONARY \(5\)"):
    value.solve_vfp(upper, lower, exact, 0.0, jnp.zeros(1), throw=True, **few)


def test_lambda_growing():
  cases = [
    ([1.68, 3.34, 7.46], True),  # value_doublewell from y0 = -1.5
    ([0.0, 0.095, 1.75, 5.22], True),  # value_hyper
    ([1.0, 20.0], True),
    ([1.08, 3.04, 4.27, 4.47], False),  # the test problem: lambda_k -> 4.5
    ([2.90, 3.35, 4.20, 4.53], False),
    ([0.0, 0.0, 0.0099], False),  # small multipliers
    ([1.56e4, 1.64e4, 1.63e4, 1.62e4], False),
    ([3.0], False),
  ]
  for lambdas, growing in cases:
    assert bool(vfp_module.lambda_growing(np.asarray(lambdas))) == growing, lambdas


def test_solve_vfp_bad_input():
  kw = dict(mus=[1e-1, 1e-2], epsilon=EPS, optimizer=optax.sgd(0.1), inner_steps=2, outer_steps=1)
  vf = VALUE_FNS["quadratic"]
  with pytest.raises(ValueError, match="`mus` must be non-increasing"):
    value.solve_vfp(upper, lower, vf, 0.0, jnp.zeros(1), **dict(kw, mus=[1e-2, 1e-1]))
  with pytest.raises(ValueError, match="`mus` must be > 0"):
    value.solve_vfp(upper, lower, vf, 0.0, jnp.zeros(1), **dict(kw, mus=[1e-1, 0.0]))
  with pytest.raises(ValueError, match="`epsilon` must be > 0"):
    value.solve_vfp(upper, lower, vf, 0.0, jnp.zeros(1), **dict(kw, epsilon=0.0))
  with pytest.raises(ValueError, match="`value_fn` must return a scalar"):
    value.solve_vfp(upper, lower, lambda x, mu: jnp.zeros(2), 0.0, jnp.zeros(1), **kw)
  with pytest.raises(ValueError, match="`g` must return a scalar"):
    value.solve_vfp(upper, lambda x, y: y, vf, 0.0, jnp.zeros(1), **kw)
  with pytest.raises(ValueError, match="`kkt_tol` must be > 0"):
    value.solve_vfp(upper, lower, vf, 0.0, jnp.zeros(1), **dict(kw, kkt_tol=0.0))
  with pytest.raises(TypeError, match="`y0` must have floating-point leaves"):
    value.solve_vfp(upper, lower, vf, 0.0, jnp.zeros(1, int), **kw)
  with pytest.raises(ValueError, match="`factor` must lie in"):
    value.geometric_mus(1.0, 1.5, 3)


@pytest.mark.parametrize(
  "module",
  [
    entropic_module,
    quadratic_module,
    consistency_module,
    vfp_module,
    fista_module,
    sampling_module,
  ],
)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
