"""solve_vfp (Proposition 2.13) on a problem whose (VFP_eps) solution and
multiplier are known, bad input, and the value modules' docstring examples."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax._src.value.entropic as entropic_module
import bilevel_jax._src.value.quadratic as quadratic_module
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
    "quadratic": lambda x, mu: value.quadratic(lower, x, mu=mu, y0=jnp.zeros(1)),
    "entropic": lambda x, mu: value.entropic(lower, x, mu=mu, box=(jnp.array([-5.0]), jnp.array([5.0])),
                                             order=8, panels=64),
}


@pytest.mark.parametrize("name", sorted(VALUE_FNS))
def test_solve_vfp_recovers_solution_and_multiplier(name):
  mus = value.geometric_mus(1e-1, 0.1, 4)
  solve = jax.jit(lambda x0, y0: value.solve_vfp(
      upper, lower, VALUE_FNS[name], x0, y0, mus=mus, epsilon=EPS,
      optimizer=optax.adam(3e-2), inner_steps=150, outer_steps=8))
  sol = solve(jnp.asarray(0.0), jnp.zeros(1))
  info = sol.info
  assert int(info.status) == value.SUCCESS
  assert info.lambdas.shape == (4,) and info.xs.shape == (4,) and info.ys.shape == (4, 1)
  np.testing.assert_allclose(info.mus, mus)
  assert bool(jnp.all(info.lambdas >= 0))
  np.testing.assert_allclose(float(sol.x), 2 - D / 2, atol=3e-3)
  np.testing.assert_allclose(float(sol.y[0]), 2 + D / 2, atol=3e-3)
  lam_star = (1 - D / 2) / D
  errors = np.abs(np.asarray(info.lambdas) - lam_star)
  assert errors[-1] < 0.2 and errors[-1] < errors[0]   # lambda_k -> lambda* as mu_k -> 0
  assert float(info.feasibility[-1]) < 1e-4 and float(info.complementarity[-1]) < 1e-3
  assert float(info.kkt_residual[-1]) < 0.05
  np.testing.assert_allclose(info.kkt_residual, np.maximum.reduce(
      [info.stationarity, info.feasibility, info.complementarity]))


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
  with pytest.raises(ValueError, match="`factor` must lie in"):
    value.geometric_mus(1.0, 1.5, 3)


@pytest.mark.parametrize("module", [entropic_module, quadratic_module])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
