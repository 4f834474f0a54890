"""Models as variables: an Equinox module or Flax NNX state as y0 (and an
Equinox module as x) in `bda` and `implicit`. Non-float leaves (activation
functions, PRNG keys, RNG counters) are carried along untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import Status, bda, implicit
from tests.helpers import finite_difference_grad

eqx = pytest.importorskip("equinox")
nnx = pytest.importorskip("flax.nnx")

FEATURES = jax.random.normal(jax.random.PRNGKey(0), (24, 3))
TARGETS = jnp.sin(FEATURES[:, 0]) + 0.5 * FEATURES[:, 1]
BDA_KW = dict(steps=30, upper_lr=0.1, lower_lr=0.2, alpha=0.5)


def _params(model):
  return jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))


def _eqx_lower(log_l2, model):
  pred = jax.vmap(model)(FEATURES)[:, 0]
  return jnp.mean((pred - TARGETS) ** 2) + jnp.exp(log_l2) * sum(
    jnp.sum(p**2) for p in _params(model)
  )


def _eqx_upper(log_l2, model):
  return jnp.mean((jax.vmap(model)(FEATURES[:8])[:, 0] - TARGETS[:8]) ** 2)


def test_equinox_mlp_as_y0_in_bda():
  mlp = eqx.nn.MLP(3, 1, 8, 1, activation=jax.nn.relu, key=jax.random.PRNGKey(1))
  sol = bda.solve(_eqx_upper, _eqx_lower, -2.0, mlp, **BDA_KW)
  assert isinstance(sol.y, eqx.nn.MLP) and sol.y.activation is jax.nn.relu
  assert int(sol.info.status) == Status.SUCCESS
  assert float(sol.info.lower_value) < float(_eqx_lower(-2.0, mlp))
  value, grad = bda.hypergradient(_eqx_upper, _eqx_lower, jnp.asarray(-2.0), mlp, **BDA_KW)
  phi = eqx.filter_jit(
    lambda v: bda.solve(_eqx_upper, _eqx_lower, v[0], mlp, **BDA_KW).info.upper_value
  )
  np.testing.assert_allclose(grad, finite_difference_grad(phi, [-2.0])[0], rtol=1e-6)


def test_equinox_linear_model_as_y0_in_implicit():
  linear = eqx.nn.Linear(3, 1, key=jax.random.PRNGKey(2))  # ridge: strongly convex
  sol = implicit.solve(_eqx_lower, -1.0, linear, tol=1e-10)
  assert isinstance(sol.y, eqx.nn.Linear) and int(sol.info.status) == Status.SUCCESS
  value, grad = implicit.hypergradient(_eqx_upper, _eqx_lower, jnp.asarray(-1.0), linear, tol=1e-10)
  phi = lambda v: _eqx_upper(v[0], implicit.solve(_eqx_lower, v[0], linear, tol=1e-12).y)
  np.testing.assert_allclose(grad, finite_difference_grad(phi, [-1.0])[0], rtol=1e-6)


def test_equinox_module_as_x_gets_a_filtered_gradient():
  """x is a feature map with an activation function; the gradient has None there."""
  feature_map = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(3))
  lower = lambda fmap, w: (
    0.5 * jnp.mean((jax.vmap(fmap)(FEATURES) @ w - TARGETS) ** 2) + 0.05 * jnp.sum(w**2)
  )
  upper_fn = lambda fmap, w: jnp.mean((jax.vmap(fmap)(FEATURES[:8]) @ w - TARGETS[:8]) ** 2)
  value, grad = implicit.hypergradient(upper_fn, lower, feature_map, jnp.zeros(2), tol=1e-10)
  assert isinstance(grad, eqx.nn.MLP) and grad.activation is None
  bias = grad.layers[-1].bias

  def phi(v):
    fmap = eqx.tree_at(lambda m: m.layers[-1].bias, feature_map, v)
    return upper_fn(fmap, implicit.solve(lower, fmap, jnp.zeros(2), tol=1e-12).y)

  fd = finite_difference_grad(phi, feature_map.layers[-1].bias)
  np.testing.assert_allclose(bias, fd, rtol=1e-5, atol=1e-9)


class _DropoutNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 8, rngs=rngs, param_dtype=jnp.float64)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, inputs):
    return self.out(self.drop(jnp.tanh(self.hidden(inputs))))[:, 0]


def _nnx_problem():
  graphdef, state = nnx.split(_DropoutNet(nnx.Rngs(0, dropout=1)))
  net = lambda st: nnx.merge(graphdef, st)

  def lower(log_l2, st):
    return jnp.mean((net(st)(FEATURES) - TARGETS) ** 2) + jnp.exp(log_l2) * jnp.sum(
      st["hidden"]["kernel"][...] ** 2
    )

  upper_fn = lambda log_l2, st: jnp.mean((net(st)(FEATURES[:8]) - TARGETS[:8]) ** 2)
  return state, lower, upper_fn


def _rng_leaves(state):
  rngs = state["drop"]["rngs"]
  return jax.random.key_data(rngs["key"][...]), rngs["count"][...]


def test_flax_nnx_state_with_dropout_rngs_in_bda_and_implicit():
  state, lower, upper_fn = _nnx_problem()
  # Calling an NNX model eagerly advances its RNG counter in place: keep a copy.
  rngs_before = [np.array(leaf) for leaf in _rng_leaves(state)]
  initial = float(lower(-2.0, _nnx_problem()[0]))
  sol = bda.solve(upper_fn, lower, -2.0, state, **BDA_KW)
  assert int(sol.info.status) == Status.SUCCESS
  assert float(sol.info.lower_value) < initial
  for before, after in zip(rngs_before, _rng_leaves(sol.y)):  # carried untouched
    np.testing.assert_array_equal(before, after)
  value, grad = bda.hypergradient(upper_fn, lower, jnp.asarray(-2.0), state, **BDA_KW)
  phi = jax.jit(lambda v: bda.solve(upper_fn, lower, v[0], state, **BDA_KW).info.upper_value)
  np.testing.assert_allclose(grad, finite_difference_grad(phi, [-2.0])[0], rtol=1e-6)

  imp = implicit.solve(lower, -2.0, state, max_steps=30)
  assert int(imp.info.num_steps) == 30 or int(imp.info.status) == Status.SUCCESS
  assert float(imp.info.value) < initial
  for before, after in zip(rngs_before, _rng_leaves(imp.y)):
    np.testing.assert_array_equal(before, after)


def test_model_without_float_leaves_is_rejected_by_name():
  with pytest.raises(TypeError, match="`y0` must have floating-point leaves"):
    bda.solve(_eqx_upper, _eqx_lower, -2.0, {"count": jnp.zeros((), jnp.uint32)}, **BDA_KW)


def test_jitted_make_hypergradient_and_optimize_take_an_equinox_module_as_y0():
  """make_hypergradient's default jit and upper.optimize keep a module's
  functions out of jit (equinox.filter_jit), with warm starts and the same
  numbers as the unjitted builder."""
  import equinox as eqx
  import optax

  from bilevel_jax import bda, upper

  net = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.PRNGKey(0))
  X, Y = jnp.ones((5, 2)), jnp.zeros(5)
  params = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array))
  f = lambda lam, m: (
    jnp.mean((jax.vmap(m)(X)[:, 0] - Y) ** 2) + lam * sum(jnp.sum(w**2) for w in params(m))
  )
  F = lambda lam, m: jnp.mean(jax.vmap(m)(X)[:, 0] ** 2)
  kw = dict(steps=3, upper_lr=0.1, lower_lr=0.1, alpha=0.0)
  value, grad, sol = bda.make_hypergradient(F, f, **kw)(jnp.asarray(0.1), net)
  value_ref, grad_ref, _ = bda.make_hypergradient(F, f, jit=False, **kw)(jnp.asarray(0.1), net)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-10)
  assert isinstance(sol.y, eqx.nn.MLP)
  result = upper.optimize(
    bda.make_hypergradient(F, f, **kw),
    jnp.asarray(0.1),
    optax.sgd(0.1),
    steps=3,
    y0=net,
    warm_start=True,
  )
  assert int(result.info.status) == 0 and isinstance(result.y, eqx.nn.MLP)
