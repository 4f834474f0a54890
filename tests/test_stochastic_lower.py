"""Stochastic lower levels and Optax transformations as the lower step in
`bda.solve` / `bda.hypergradient`: the reduction to eq. (10), derivatives
against finite differences (float64, fixed batches), jit/vmap over keys,
checkpointing, truncation, prox, and models with dropout or batch norm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import Status, bda
from bilevel_jax import prox as prox_lib
from bilevel_jax import schedules
from tests.helpers import finite_difference_grad

N, D, B, K = 40, 3, 8, 12
FEATURES = jax.random.normal(jax.random.PRNGKey(0), (N, D))
TARGETS = FEATURES @ jnp.array([1.0, -2.0, 0.5]) + 0.1 * jax.random.normal(
  jax.random.PRNGKey(1), (N,)
)
IDX = jax.random.randint(jax.random.PRNGKey(2), (K, B), 0, N)
BATCHES = (FEATURES[IDX], TARGETS[IDX])  # leading axis K
VAL_IDX = jax.random.randint(jax.random.PRNGKey(3), (K, B), 0, N)
VAL_BATCHES = (FEATURES[VAL_IDX], TARGETS[VAL_IDX])
X = jnp.array([-1.0, -0.5, -2.0])  # log of per-feature l2 weights
W0 = jnp.array([0.2, 0.1, -0.3])


def lower(x, w, batch):
  feats, targets = batch
  return jnp.mean((feats @ w - targets) ** 2) + jnp.sum(jnp.exp(x) * w**2)


def upper(x, w, batch):
  feats, targets = batch
  return jnp.mean((feats @ w - targets) ** 2) + 0.01 * jnp.sum(x**2)


def full_lower(x, w):
  return lower(x, w, (FEATURES, TARGETS))


def full_upper(x, w):
  return upper(x, w, (FEATURES[:10], TARGETS[:10]))


def sample(k, key):
  idx = jax.random.randint(key, (B,), 0, N)
  return FEATURES[idx], TARGETS[idx]


def _check_fd(kw, upper_fn=upper, lower_fn=lower, x=X, y0=W0, rtol=1e-6):
  """The hypergradient against central differences of phi_K; returns the
  gradient and the solution at x."""
  _, grad, sol = jax.jit(
    lambda v: bda.hypergradient(upper_fn, lower_fn, v, y0, return_info=True, **kw)
  )(x)
  phi = lambda v: bda.solve(upper_fn, lower_fn, v, y0, **kw).info.upper_value
  np.testing.assert_allclose(grad, finite_difference_grad(phi, x), rtol=rtol, atol=1e-9)
  assert int(sol.info.status) == Status.SUCCESS
  return grad, sol


# --------------------------------------------------- reduction to eq. (10)
@pytest.mark.parametrize("alpha", [0.0, 0.4, schedules.harmonic(0.8)])
def test_optax_sgd_is_eq_10(alpha):
  """optax.sgd(s) as the lower transformation is y_{k+1} = y_k - (alpha s_u
  grad F + (1 - alpha) s grad f), the fixed-step path with lower_lr = s."""
  kw = dict(steps=30, upper_lr=0.3, alpha=alpha)
  fixed = bda.hypergradient(full_upper, full_lower, X, W0, lower_lr=0.1, return_info=True, **kw)
  sgd = bda.hypergradient(
    full_upper, full_lower, X, W0, lower_optimizer=optax.sgd(0.1), return_info=True, **kw
  )
  np.testing.assert_allclose(sgd[2].y, fixed[2].y, rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(sgd[0], fixed[0], rtol=1e-14)
  np.testing.assert_allclose(sgd[1], fixed[1], rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(sgd[2].info.residual, fixed[2].info.residual, rtol=1e-13)


def test_optax_sgd_with_prox_is_eq_13():
  kw = dict(steps=25, upper_lr=0.3, alpha=0.3, prox=prox_lib.l1(0.05))
  fixed = bda.hypergradient(full_upper, full_lower, X, W0, lower_lr=0.1, **kw)
  sgd = bda.hypergradient(
    full_upper, full_lower, X, W0, lower_lr=0.1, lower_optimizer=optax.sgd(0.1), **kw
  )
  np.testing.assert_allclose(sgd[1], fixed[1], rtol=1e-13, atol=1e-15)


# ------------------------------------------------- finite differences
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_batches_pytree_matches_finite_differences(alpha):
  kw = dict(
    steps=K,
    upper_lr=0.2,
    lower_lr=0.1,
    alpha=alpha,
    lower_batches=BATCHES,
    upper_batches=VAL_BATCHES,
  )
  _check_fd(kw)
  sol = bda.solve(upper, lower, X, W0, **kw)
  last = lambda b: jax.tree_util.tree_map(lambda v: v[-1], b)
  # Values at y_K use the last batch b_{K-1}.
  np.testing.assert_allclose(sol.info.lower_value, lower(X, sol.y, last(BATCHES)), rtol=1e-14)
  np.testing.assert_allclose(sol.info.upper_value, upper(X, sol.y, last(VAL_BATCHES)), rtol=1e-14)
  g = jax.grad(lower, argnums=1)(X, sol.y, last(BATCHES))
  np.testing.assert_allclose(sol.info.residual, jnp.linalg.norm(g), rtol=1e-12)


def test_batches_are_used_in_order():
  """Step k sees batch k: the scan equals a Python loop over the batches."""
  sol = bda.solve(
    full_upper, lower, X, W0, steps=K, upper_lr=0.2, lower_lr=0.1, alpha=0.0, lower_batches=BATCHES
  )
  w = W0
  for k in range(K):
    w = w - 0.1 * jax.grad(lower, argnums=1)(X, w, (BATCHES[0][k], BATCHES[1][k]))
  np.testing.assert_allclose(sol.y, w, rtol=1e-13)


def test_sampler_matches_finite_differences_and_fold_in_keys():
  key = jax.random.PRNGKey(7)
  kw = dict(
    steps=K,
    upper_lr=0.2,
    lower_lr=0.1,
    alpha=0.5,
    lower_batches=sample,
    upper_batches=sample,
    key=key,
  )
  _check_fd(kw)
  # The sampler gets fold_in(key, k) (lower) and fold_in(fold_in(key, k), 1) (upper).
  keys = [jax.random.fold_in(key, k) for k in range(K)]
  stacked = lambda ks: jax.tree_util.tree_map(
    lambda *a: jnp.stack(a), *[sample(k, kk) for k, kk in enumerate(ks)]
  )
  explicit = dict(
    kw,
    lower_batches=stacked(keys),
    upper_batches=stacked([jax.random.fold_in(kk, 1) for kk in keys]),
    key=None,
  )
  np.testing.assert_allclose(
    bda.solve(upper, lower, X, W0, **kw).y, bda.solve(upper, lower, X, W0, **explicit).y, rtol=1e-14
  )


@pytest.mark.parametrize(
  "name, optimizer, alpha",
  [
    ("momentum", optax.sgd(0.05, momentum=0.9), 0.5),
    ("nesterov", optax.sgd(0.05, momentum=0.9, nesterov=True), 0.0),
    ("adam", optax.adam(0.05), 0.0),
    ("adam", optax.adam(0.05), 0.5),
    ("adamw-schedule", optax.adamw(optax.exponential_decay(0.05, 5, 0.5), weight_decay=0.1), 0.5),
  ],
)
def test_optax_lower_step_matches_finite_differences(name, optimizer, alpha):
  kw = dict(
    steps=K,
    upper_lr=0.2,
    alpha=alpha,
    lower_optimizer=optimizer,
    lower_batches=BATCHES,
    upper_batches=VAL_BATCHES,
  )
  _check_fd(kw, rtol=1e-5)


def test_optax_with_prox_matches_finite_differences():
  kw = dict(
    steps=K,
    upper_lr=0.2,
    alpha=0.5,
    lower_optimizer=optax.adam(0.05),
    lower_lr=0.05,
    prox=prox_lib.l1(0.02),
    lower_batches=BATCHES,
  )
  _check_fd(kw, upper_fn=full_upper, rtol=1e-5)


def _lr_problem():
  """x = (log learning rate, log weight decay) of the lower transformation."""
  make = lambda x: optax.inject_hyperparams(optax.adamw)(
    learning_rate=jnp.exp(x[0]), weight_decay=jnp.exp(x[1])
  )
  low = lambda x, w, batch: lower(jnp.full(D, -3.0), w, batch)
  up = lambda x, w: full_upper(jnp.zeros(D), w)
  return make, low, up, jnp.array([np.log(0.05), np.log(0.1)])


def test_injected_learning_rate_is_the_upper_variable():
  make, low, up, x = _lr_problem()
  kw = dict(steps=K, upper_lr=0.2, alpha=0.0, lower_optimizer=make, lower_batches=BATCHES)
  grad, _ = _check_fd(kw, upper_fn=up, lower_fn=low, x=x, rtol=1e-5)
  assert np.all(np.abs(grad) > 1e-6)  # both hyperparameters matter


def test_truncation_keeps_the_injected_learning_rate_derivative():
  """T-RHG with an injected learning rate: the head (y_{K-M}, and Adam's
  moments) is frozen, the learning rate still acts on the last M steps. With
  plain SGD the state is only the learning rate, so the reference is finite
  differences of the M tail steps started at the frozen y_{K-M}."""
  make = lambda x: optax.inject_hyperparams(optax.sgd)(learning_rate=jnp.exp(x[0]))
  low = lambda x, w: full_lower(jnp.full(D, -3.0), w)
  up = lambda x, w: full_upper(jnp.zeros(D), w)
  x = jnp.array([np.log(0.05)])
  kw = dict(steps=20, upper_lr=0.2, alpha=0.0, lower_optimizer=make)
  _, grad = bda.hypergradient(up, low, x, W0, truncate=6, **kw)
  head = bda.solve(up, low, x, W0, **dict(kw, steps=14)).y
  phi = lambda v: bda.solve(up, low, v, head, **dict(kw, steps=6)).info.upper_value
  np.testing.assert_allclose(grad, finite_difference_grad(phi, x), rtol=1e-6)
  full = bda.hypergradient(up, low, x, W0, **kw)[1]
  assert not np.allclose(grad, full)


# ----------------------------------------- transformations and options
def _sampled_hypergradient(x, rng, **extra):
  kw = dict(
    steps=K,
    upper_lr=0.2,
    alpha=0.5,
    lower_optimizer=optax.adam(0.05),
    lower_batches=sample,
    upper_batches=sample,
    key=rng,
  )
  kw.update(extra)
  value, grad = bda.hypergradient(upper, lower, x, W0, **kw)
  return value, grad


def test_jit_vmap_over_keys_and_no_retrace():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  chex.clear_trace_counter()
  jitted = jax.jit(chex.assert_max_traces(_sampled_hypergradient, n=1))
  loop = [jitted(X, k) for k in keys]  # same shapes: one trace
  jitted(X + 0.1, keys[0])
  values, grads = jax.jit(jax.vmap(_sampled_hypergradient, in_axes=(None, 0)))(X, keys)
  for i, (value, grad) in enumerate(loop):
    np.testing.assert_allclose(values[i], value, rtol=1e-10)
    np.testing.assert_allclose(grads[i], grad, rtol=1e-9)
  assert not np.allclose(grads[0], grads[1])  # different keys, different batches


def test_checkpoint_gives_the_same_gradient():
  """Per-step remat with a sampler; segments of 5 (and a remainder of 2) over
  a batch pytree (`unroll`: in the truncation test below)."""
  key = jax.random.PRNGKey(3)
  fixed = dict(lower_batches=BATCHES, upper_batches=VAL_BATCHES, rng=None)
  for batches, extra in (({}, {"checkpoint": True}), (fixed, {"checkpoint": 5})):
    ref = _sampled_hypergradient(X, **dict(dict(rng=key), **batches))
    got = _sampled_hypergradient(X, **dict(dict(rng=key), **batches), **extra)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)


def test_truncated_stochastic_run_matches_finite_differences_of_its_tail():
  kw = dict(
    upper_lr=0.2, alpha=0.5, lower_optimizer=optax.sgd(0.05, momentum=0.5), lower_batches=BATCHES
  )
  _, grad = bda.hypergradient(
    upper, lower, X, W0, steps=K, truncate=K, unroll=3, upper_batches=VAL_BATCHES, **kw
  )
  full, _ = _check_fd(dict(kw, steps=K, upper_batches=VAL_BATCHES))
  np.testing.assert_allclose(grad, full, rtol=1e-12)  # truncate = K: full backprop
  short = bda.hypergradient(
    upper, lower, X, W0, steps=K, truncate=4, upper_batches=VAL_BATCHES, **kw
  )[1]
  assert np.all(np.isfinite(short)) and not np.allclose(short, full)


def test_float32_stays_float32():
  cast = lambda t: jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), t)
  sol = bda.solve(
    upper,
    lower,
    X.astype(jnp.float32),
    W0.astype(jnp.float32),
    steps=K,
    upper_lr=0.2,
    alpha=0.5,
    lower_optimizer=optax.adam(0.05),
    lower_batches=cast(BATCHES),
    upper_batches=cast(VAL_BATCHES),
  )
  assert sol.y.dtype == jnp.float32 and int(sol.info.status) == Status.SUCCESS


def test_nonfinite_status_with_an_optimizer():
  sol = bda.solve(
    full_upper,
    full_lower,
    X,
    W0,
    steps=600,
    upper_lr=0.2,
    alpha=0.0,
    lower_optimizer=optax.sgd(5.0, momentum=0.9),
  )
  assert int(sol.info.status) == Status.NONFINITE


# ----------------------------------------------------------- models
eqx = pytest.importorskip("equinox")


class _EqxNet(eqx.Module):
  hidden: eqx.nn.Linear
  # Static: `bilevel_jax._src.variables` iterates Python-float leaves, and the
  # rate `Dropout.p` is one; as a static field it stays a hyperparameter.
  drop: eqx.nn.Dropout = eqx.field(static=True)
  out: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.hidden = eqx.nn.Linear(D, 6, key=k1)
    self.drop = eqx.nn.Dropout(0.3)
    self.out = eqx.nn.Linear(6, 1, key=k2)

  def __call__(self, inputs, key):
    hidden = self.drop(jnp.tanh(self.hidden(inputs)), key=key, inference=key is None)
    return self.out(hidden)[0]


def test_equinox_mlp_with_dropout_key_in_the_batch():
  net0 = _EqxNet(jax.random.PRNGKey(4))
  steps = 6
  drop_keys = jax.random.split(jax.random.PRNGKey(5), steps)  # one dropout key a step
  batches = (BATCHES[0][:steps], BATCHES[1][:steps], drop_keys)

  def eqx_lower(log_l2, net, batch):
    feats, targets, key = batch
    pred = jax.vmap(net, in_axes=(0, 0))(feats, jax.random.split(key, feats.shape[0]))
    params = jax.tree_util.tree_leaves(eqx.filter(net, eqx.is_inexact_array))
    return jnp.mean((pred - targets) ** 2) + jnp.exp(log_l2[0]) * sum(jnp.sum(p**2) for p in params)

  def eqx_upper(log_l2, net):
    pred = jax.vmap(lambda f: net(f, None))(FEATURES[:10])
    return jnp.mean((pred - TARGETS[:10]) ** 2)

  kw = dict(
    steps=steps, upper_lr=0.1, alpha=0.3, lower_optimizer=optax.adam(0.02), lower_batches=batches
  )
  _, sol = _check_fd(
    kw, upper_fn=eqx_upper, lower_fn=eqx_lower, x=jnp.array([-3.0]), y0=net0, rtol=1e-5
  )
  assert isinstance(sol.y, _EqxNet) and sol.y.drop.p == 0.3
  # Other dropout keys change the iterates: the masks do come from the batch.
  solve = eqx.filter_jit(
    lambda bs: (
      bda.solve(eqx_upper, eqx_lower, jnp.array([-3.0]), net0, **dict(kw, lower_batches=bs)).y
    )
  )
  moved = solve(batches[:2] + (jax.random.split(jax.random.PRNGKey(6), steps),))
  np.testing.assert_allclose(solve(batches).hidden.weight, sol.y.hidden.weight, rtol=1e-12)
  assert not np.allclose(moved.hidden.weight, sol.y.hidden.weight)


nnx = pytest.importorskip("flax.nnx")


class _NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(D, 6, rngs=rngs, param_dtype=jnp.float64)
    self.norm = nnx.BatchNorm(6, rngs=rngs, param_dtype=jnp.float64)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.out = nnx.Linear(6, 1, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, inputs, key=None):
    hidden = jnp.tanh(self.norm(self.hidden(inputs)))  # batch statistics in training
    return self.out(self.drop(hidden, rngs=key, deterministic=key is None))[:, 0]


def test_flax_nnx_model_with_batchnorm_and_dropout():
  """Parameters are the lower variable (``nnx.split(model, nnx.Param, ...)``);
  the batch statistics and RNG state are closed over. In training mode
  BatchNorm normalizes by the statistics of the batch, a differentiable
  function of the parameters; the dropout key of step k comes from the
  sampler (``fold_in(key, k)``)."""
  graphdef, params, rest = nnx.split(_NnxNet(nnx.Rngs(0)), nnx.Param, ...)
  rest = jax.tree_util.tree_map(  # BatchNorm keeps its statistics in float32
    lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, rest
  )
  # A fresh copy of `rest` a call: training-mode BatchNorm writes its running
  # statistics into the merged model (discarded: the lower loop does not carry them).
  net = lambda p: nnx.merge(graphdef, p, jax.tree_util.tree_map(jnp.array, rest))

  def nnx_lower(log_l2, p, batch):
    feats, targets, key = batch
    return jnp.mean((net(p)(feats, key) - targets) ** 2) + jnp.exp(log_l2[0]) * jnp.sum(
      p["hidden"]["kernel"][...] ** 2
    )

  def nnx_upper(log_l2, p):
    return jnp.mean((net(p)(FEATURES[:10]) - TARGETS[:10]) ** 2)

  def sampler(k, key):
    feats, targets = sample(k, key)
    return feats, targets, jax.random.fold_in(key, 1)

  kw = dict(
    steps=6,
    upper_lr=0.1,
    alpha=0.3,
    lower_optimizer=optax.adam(0.02),
    lower_batches=sampler,
    key=jax.random.key(8),
  )  # a typed key
  x = jnp.array([-3.0])
  _, sol = _check_fd(kw, upper_fn=nnx_upper, lower_fn=nnx_lower, x=x, y0=params, rtol=1e-5)
  assert float(sol.info.upper_value) < float(nnx_upper(x, params))


# ------------------------------------------------------------ bad inputs
def _call(**overrides):
  kw = dict(
    upper_fn=upper,
    lower_fn=lower,
    x=X,
    y0=W0,
    steps=K,
    upper_lr=0.2,
    lower_lr=0.1,
    alpha=0.5,
    lower_batches=BATCHES,
    upper_batches=VAL_BATCHES,
  )
  kw.update(overrides)
  return bda.solve(**kw)


@pytest.mark.parametrize(
  "overrides, error, match",
  [
    ({"lower_batches": (FEATURES[IDX][:5], TARGETS[IDX][:5])}, ValueError, "`lower_batches`"),
    ({"lower_batches": (FEATURES[IDX], TARGETS[IDX][:5])}, ValueError, "`lower_batches`"),
    ({"upper_batches": (FEATURES[:K], TARGETS[: K + 1])}, ValueError, "`upper_batches`"),
    ({"lower_batches": sample}, ValueError, "`key`"),
    ({"key": jax.random.PRNGKey(0)}, ValueError, "`key` is only used"),
    ({"lower_batches": sample, "key": 3.0}, TypeError, "`key`"),
    (
      {"lower_batches": lambda k, key: 1 / 0, "key": jax.random.PRNGKey(0)},
      TypeError,
      "`lower_batches` failed",
    ),
    ({"lower_optimizer": "adam", "lower_lr": None}, TypeError, "`lower_optimizer`"),
    ({"lower_optimizer": optax.adam, "lower_lr": None}, TypeError, "`lower_optimizer`"),
    ({"lower_optimizer": optax.adam(0.1)}, ValueError, "`lower_lr` or `lower_optimizer`"),
    ({"lower_lr": None}, ValueError, "`lower_lr`"),
    (
      {"lower_optimizer": optax.adam(0.1), "lower_lr": None, "prox": prox_lib.l1(0.1)},
      ValueError,
      "`lower_lr` is required with `prox`",
    ),
    ({"lower_fn": lambda x, w: full_lower(x, w)}, TypeError, "`lower_fn` failed"),
  ],
)
def test_bad_input_names_the_argument(overrides, error, match):
  with pytest.raises(error, match=match):
    _call(**overrides)


def test_one_upper_batch_for_every_step_equals_it_stacked():
  """``upper_batch`` (this upper step's validation minibatch) is
  ``upper_batches`` with the same batch at every step, and is checked against
  finite differences; giving both is an error naming them."""
  val = (FEATURES[:8], TARGETS[:8])
  kw = dict(steps=K, upper_lr=0.05, lower_lr=0.05, alpha=0.5, lower_batches=BATCHES)
  one, _ = _check_fd({**kw, "upper_batch": val})
  stacked = jax.tree_util.tree_map(lambda v: jnp.stack([v] * K), val)
  _, many = bda.hypergradient(upper, lower, X, W0, upper_batches=stacked, **kw)
  np.testing.assert_allclose(one, many, rtol=1e-12)
  with pytest.raises(ValueError, match="`upper_batch`.*`upper_batches`"):
    bda.solve(upper, lower, X, W0, upper_batch=val, upper_batches=stacked, **kw)
