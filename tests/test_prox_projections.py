"""Proximal operators and projections against their closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import projections, prox


def test_l1_soft_thresholding_on_pytrees():
  y = {"a": jnp.array([3.0, -0.2, 0.5]), "b": jnp.array(-2.0)}
  out = prox.l1(0.5)(None, y, 2.0)
  np.testing.assert_allclose(out["a"], [2.0, 0.0, 0.0])
  np.testing.assert_allclose(out["b"], -1.0)


def test_l1_prox_minimizes_its_objective():
  """Check optimality against brute force on a grid."""
  y, step, lam = 0.7, 0.5, 0.6
  z = prox.l1(lam)(None, jnp.array([y]), step)[0]
  grid = jnp.linspace(-2, 2, 40001)
  obj = lam * jnp.abs(grid) + (grid - y) ** 2 / (2 * step)
  assert abs(float(z - grid[jnp.argmin(obj)])) < 1e-4


def test_l1_strength_from_x():
  out = prox.l1(lambda x: jnp.exp(x))(jnp.log(0.5), jnp.array([1.0]), 1.0)
  np.testing.assert_allclose(out, [0.5])


def test_sets():
  y = jnp.array([3.0, -4.0])
  np.testing.assert_allclose(projections.box(-1.0, 2.0)(y), [2.0, -1.0])
  np.testing.assert_allclose(projections.nonnegative()(y), [3.0, 0.0])
  np.testing.assert_allclose(projections.l2_ball(1.0)(y), [0.6, -0.8])
  np.testing.assert_allclose(projections.l2_ball(10.0)(y), y)
  np.testing.assert_allclose(prox.box(-1.0, 2.0)(None, y, 0.3), [2.0, -1.0])
  np.testing.assert_allclose(prox.nonnegative()(None, y, 0.3), [3.0, 0.0])
  np.testing.assert_allclose(prox.l2_ball(1.0)(None, y, 0.3), [0.6, -0.8])
  tree = {"w": jnp.array([3.0]), "b": jnp.array([4.0])}
  out = projections.l2_ball(1.0)(tree)
  np.testing.assert_allclose([out["w"][0], out["b"][0]], [0.6, 0.8])


def test_box_with_pytree_bounds():
  tree = {"w": jnp.array([3.0, -3.0]), "b": jnp.array(5.0)}
  lo = {"w": jnp.array([0.0, -1.0]), "b": jnp.array(0.0)}
  hi = {"w": jnp.array([1.0, 1.0]), "b": jnp.array(2.0)}
  out = projections.box(lo, hi)(tree)
  np.testing.assert_allclose(out["w"], [1.0, -1.0])
  np.testing.assert_allclose(out["b"], 2.0)


def test_box_with_one_scalar_and_one_pytree_bound():
  tree = {"w": jnp.array([3.0, -3.0]), "b": jnp.array(-5.0)}
  out = projections.box(0.0, {"w": jnp.array([1.0, 2.0]), "b": jnp.array(2.0)})(tree)
  np.testing.assert_allclose(out["w"], [1.0, 0.0])
  np.testing.assert_allclose(out["b"], 0.0)
  with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
    projections.box(1.5, {"w": jnp.array([1.0, 2.0]), "b": jnp.array(2.0)})


def test_box_bounds_of_another_structure_are_named():
  with pytest.raises(ValueError, match="`lower` and `upper` must be numbers, arrays or pytrees"):
    projections.box({"w": 0.0}, {"w": 1.0, "b": 2.0})
  with pytest.raises(ValueError, match="`upper` must be a number, an array or a pytree"):
    projections.box(0.0, {"w": 1.0})({"w": jnp.ones(2), "b": jnp.ones(())})


def test_projections_keep_dtype():
  y = jnp.array([3.0, -4.0], jnp.float32)
  for p in (projections.box(-1.0, 2.0), projections.nonnegative(), projections.l2_ball(1.0)):
    assert p(y).dtype == jnp.float32


def test_bad_input():
  with pytest.raises(ValueError, match="`strength` must be >= 0"):
    prox.l1(-1.0)
  with pytest.raises(ValueError, match="`radius` must be > 0"):
    projections.l2_ball(0.0)
  with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
    projections.box(1.0, -1.0)
