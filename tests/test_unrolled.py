"""BDA / RHG / truncated RHG: derivatives, closed forms, transformations, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import Status
from bilevel_jax import bda
from bilevel_jax import prox as prox_lib
from bilevel_jax import schedules
from bilevel_jax.problems import example1, make_quadratic
from tests.helpers import finite_difference_grad


@pytest.fixture(scope="module")
def quad():
  return make_quadratic(jax.random.PRNGKey(0), dim_x=3, dim_y=6, condition=5.0)


def _kw(problem, **extra):
  kw = dict(
    steps=60,
    upper_lr=0.5,
    lower_lr=float(1 / problem.lower_smoothness()),
    alpha=schedules.harmonic(0.5),
  )
  kw.update(extra)
  return kw


X = jnp.array([0.3, -0.7, 1.1])


# ---------------------------------------------------------------- derivatives
@pytest.mark.parametrize("alpha", [0.0, 0.5, schedules.harmonic(0.9)])
@pytest.mark.parametrize("extra", [{}, {"truncate": 7}, {"checkpoint": "sqrt"}])
def test_hypergradient_matches_finite_differences(quad, alpha, extra):
  y0 = jnp.zeros(6)
  kw = _kw(quad, steps=25, alpha=alpha, **extra)
  _, grad = bda.hypergradient(quad.upper, quad.lower, X, y0, **kw)
  phi = lambda x: quad.upper(x, bda.solve(quad.upper, quad.lower, x, y0, **kw).y)
  if "truncate" in extra:
    # Truncation is an approximation of d phi_K: compare against finite
    # differences of the function whose head is frozen at y_{K-M}(X).
    head = bda.solve(quad.upper, quad.lower, X, y0, **dict(kw, steps=25 - 7, truncate=None)).y
    tail_kw = dict(kw, steps=7, truncate=None)
    alpha_tail = alpha if not callable(alpha) else (lambda k: alpha(k + 18))
    tail_kw["alpha"] = alpha_tail
    phi = lambda x: quad.upper(x, bda.solve(quad.upper, quad.lower, x, head, **tail_kw).y)
  np.testing.assert_allclose(grad, finite_difference_grad(phi, X), rtol=1e-6, atol=1e-8)


def test_rhg_converges_to_closed_form_hypergradient(quad):
  y0 = jnp.zeros(6)
  _, grad = bda.hypergradient(quad.upper, quad.lower, X, y0, **_kw(quad, steps=800, alpha=0.0))
  np.testing.assert_allclose(grad, quad.hypergradient(X), rtol=1e-9, atol=1e-10)


def test_bda_agrees_with_closed_form_and_rhg_for_large_K(quad):
  """On a strongly convex lower level BDA's bias vanishes as K grows (~1/K)."""
  y0 = jnp.zeros(6)
  exact = quad.hypergradient(X)
  errors = []
  for K in (50, 200, 800, 3200):
    _, g = bda.hypergradient(quad.upper, quad.lower, X, y0, **_kw(quad, steps=K))
    errors.append(float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact)))
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 2e-3, errors
  # Theorem 2's schedule (alpha_k ~ 6.8 / k here) also converges, at rate ~1/K.
  sched = schedules.theorem2(upper_lr=0.5, sigma=1.0, smoothness=1.0)
  thm2 = []
  for K in (800, 3200):
    _, g = bda.hypergradient(quad.upper, quad.lower, X, y0, **_kw(quad, steps=K, alpha=sched))
    thm2.append(float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact)))
  assert thm2[1] < 0.4 * thm2[0] and thm2[1] < 1e-2, thm2


def test_example1_rhg_matches_paper_closed_form():
  """With y0 = (0, 0): [y_K]_1 = (1 - (1 - s_l)^K) x, [y_K]_2 = 0 (Section 2.2),
  so phi_K(x) = x^2/2 + (c x - 1)^2 / 2 with c = 1 - (1 - s_l)^K."""
  K, s_l, x = 16, 0.2, 0.37
  value, grad = bda.hypergradient(
    example1.upper,
    example1.lower,
    jnp.asarray(x),
    jnp.zeros(2),
    steps=K,
    upper_lr=0.7,
    lower_lr=s_l,
    alpha=0.0,
  )
  c = 1 - (1 - s_l) ** K
  np.testing.assert_allclose(value, 0.5 * x**2 + 0.5 * (c * x - 1) ** 2, rtol=1e-12)
  np.testing.assert_allclose(grad, x + c * (c * x - 1), rtol=1e-12)


def test_prox_hypergradient_matches_finite_differences():
  """Lasso lower level with an l1 weight exp(x[0]) and data weight x[1:]."""
  key = jax.random.PRNGKey(3)
  A = jax.random.normal(key, (8, 5))
  b = jax.random.normal(jax.random.PRNGKey(4), (8,))
  lower = lambda x, y: 0.5 * jnp.sum((A @ y - b * x[1]) ** 2)
  upper = lambda x, y: 0.5 * jnp.sum((y - 0.3) ** 2) + 0.1 * x[0] ** 2
  prox = prox_lib.l1(lambda x: jnp.exp(x[0]))
  s_l = float(1 / jnp.linalg.eigvalsh(A.T @ A)[-1])
  kw = dict(steps=40, upper_lr=0.5, lower_lr=s_l, alpha=schedules.harmonic(0.5), prox=prox)
  x = jnp.array([-1.0, 1.3])
  _, grad = bda.hypergradient(upper, lower, x, jnp.zeros(5), **kw)
  phi = lambda x: upper(x, bda.solve(upper, lower, x, jnp.zeros(5), **kw).y)
  np.testing.assert_allclose(grad, finite_difference_grad(phi, x), rtol=1e-5, atol=1e-8)


def test_rhg_with_prox_solves_the_lasso():
  """Orthogonal design: the lasso solution is soft-thresholding."""
  c = jnp.array([2.0, -0.5, 0.2, -3.0])
  lower = lambda x, y: 0.5 * jnp.sum((y - c) ** 2)
  sol = bda.solve(
    lambda x, y: jnp.sum(y**2),
    lower,
    jnp.zeros(()),
    jnp.zeros(4),
    steps=50,
    upper_lr=1.0,
    lower_lr=0.5,
    alpha=0.0,
    prox=prox_lib.l1(0.6),
  )
  np.testing.assert_allclose(sol.y, jnp.sign(c) * jnp.maximum(jnp.abs(c) - 0.6, 0), atol=1e-10)
  assert float(sol.info.residual) < 1e-10


@pytest.mark.parametrize("checkpoint", [True, "step", "sqrt", 4, 7])
def test_checkpoint_gives_identical_gradients(quad, checkpoint):
  y0 = jnp.zeros(6)
  kw = _kw(quad, steps=23)
  ref = bda.hypergradient(quad.upper, quad.lower, X, y0, **kw)
  got = bda.hypergradient(quad.upper, quad.lower, X, y0, checkpoint=checkpoint, **kw)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)


@pytest.mark.parametrize(
  "unroll,checkpoint,truncate",
  [(True, False, None), (5, False, None), (4, "sqrt", None), (3, False, 10)],
)
def test_unroll_gives_the_same_gradients(quad, unroll, checkpoint, truncate):
  y0 = jnp.zeros(6)
  kw = _kw(quad, steps=23)
  ref = bda.hypergradient(
    quad.upper, quad.lower, X, y0, checkpoint=checkpoint, truncate=truncate, **kw
  )
  got = bda.hypergradient(
    quad.upper, quad.lower, X, y0, checkpoint=checkpoint, truncate=truncate, unroll=unroll, **kw
  )
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)


@pytest.mark.parametrize("unroll", [0, -2, 1.5, "all"])
def test_bad_unroll_is_named(quad, unroll):
  with pytest.raises(ValueError, match="`unroll`"):
    bda.solve(quad.upper, quad.lower, X, jnp.zeros(6), unroll=unroll, **_kw(quad))


def test_truncate_equal_to_steps_is_full_backprop(quad):
  y0 = jnp.zeros(6)
  kw = _kw(quad, steps=20)
  full = bda.hypergradient(quad.upper, quad.lower, X, y0, **kw)[1]
  same = bda.hypergradient(quad.upper, quad.lower, X, y0, truncate=20, **kw)[1]
  short = bda.hypergradient(quad.upper, quad.lower, X, y0, truncate=3, **kw)[1]
  np.testing.assert_allclose(same, full, rtol=1e-12)
  assert not np.allclose(short, full)


# ------------------------------------------------------------ transformations
# jit, vmap over x, no retrace, float32: tests/test_contract.py.
def test_vmap_over_datasets_matches_loop():
  problems = [make_quadratic(jax.random.PRNGKey(i), dim_x=3, dim_y=6) for i in range(3)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *problems)
  kw = dict(steps=30, upper_lr=0.5, lower_lr=0.1, alpha=schedules.harmonic(0.5))
  fn = lambda p: bda.hypergradient(p.upper, p.lower, X, jnp.zeros(6), **kw)[1]
  batched = jax.jit(jax.vmap(fn))(stacked)
  for i, p in enumerate(problems):
    np.testing.assert_allclose(batched[i], fn(p), rtol=1e-10)


def test_vmap_over_step_sizes_and_alpha_matches_loop(quad):
  lrs = jnp.array([0.05, 0.1, 0.15])
  alphas = jnp.array([0.0, 0.3, 0.6])
  fn = lambda s, a: bda.hypergradient(
    quad.upper, quad.lower, X, jnp.zeros(6), steps=30, upper_lr=0.5, lower_lr=s, alpha=a
  )[1]
  batched = jax.vmap(fn)(lrs, alphas)
  for i in range(3):
    np.testing.assert_allclose(batched[i], fn(float(lrs[i]), float(alphas[i])), rtol=1e-10)


def test_grad_through_closure_over_traced_data():
  """jit over data, grad w.r.t. data captured by the objectives' closures."""

  def outer(c, x):
    lower = lambda x, y: 0.5 * jnp.sum((y - c * x) ** 2)
    upper = lambda x, y: 0.5 * jnp.sum((y - 1.0) ** 2)
    return bda.hypergradient(
      upper, lower, x, jnp.zeros(3), steps=200, upper_lr=0.5, lower_lr=0.5, alpha=0.0
    )[0]

  c, x = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 0.5, 0.5])
  g = jax.jit(jax.grad(outer))(c, x)
  # phi = 0.5 ||c x - 1||^2 at convergence, so d phi / dc = (c x - 1) x.
  np.testing.assert_allclose(g, (c * x - 1) * x, rtol=1e-9)


def test_pytree_variables():
  """x and y are dicts; the hypergradient has the structure of x."""
  w_true = jnp.array([1.0, -2.0])
  feats = jax.random.normal(jax.random.PRNGKey(2), (10, 2))
  targets = feats @ w_true

  def lower(x, y):
    res = feats @ y["w"] + y["b"] - targets
    return 0.5 * jnp.mean(res**2) + 0.5 * jnp.exp(x["log_l2"]) * jnp.sum(y["w"] ** 2)

  def upper(x, y):
    return jnp.sum((y["w"] - w_true) ** 2) + x["shift"] ** 2 + y["b"] ** 2

  x = {"log_l2": jnp.asarray(-1.0), "shift": jnp.asarray(0.2)}
  y0 = {"w": jnp.zeros(2), "b": jnp.asarray(0.0)}
  kw = dict(steps=40, upper_lr=0.3, lower_lr=0.3, alpha=schedules.harmonic(0.5))
  value, grad = jax.jit(lambda x: bda.hypergradient(upper, lower, x, y0, **kw))(x)
  assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(x)
  flat = lambda v: {"log_l2": v[0], "shift": v[1]}
  phi = lambda v: upper(flat(v), bda.solve(upper, lower, flat(v), y0, **kw).y)
  fd = finite_difference_grad(phi, jnp.array([-1.0, 0.2]))
  np.testing.assert_allclose([grad["log_l2"], grad["shift"]], fd, rtol=1e-6)


def test_info_reports_nonfinite_iterates(quad):
  sol = bda.solve(
    quad.upper, quad.lower, X, jnp.ones(6), steps=2000, upper_lr=0.5, lower_lr=10.0, alpha=0.0
  )
  assert int(sol.info.status) == Status.NONFINITE
  ok = bda.solve(quad.upper, quad.lower, X, jnp.ones(6), **_kw(quad))
  assert int(ok.info.status) == Status.SUCCESS


def test_info_history_and_residual(quad):
  sol = bda.solve(
    quad.upper, quad.lower, X, jnp.zeros(6), record_history=True, **_kw(quad, steps=300, alpha=0.0)
  )
  assert sol.info.upper_history.shape == (300,) and sol.info.lower_history.shape == (300,)
  assert np.all(np.diff(np.asarray(sol.info.lower_history)) <= 1e-12)  # descent
  np.testing.assert_allclose(sol.info.lower_value, quad.lower(X, quad.solution(X)), rtol=1e-10)
  assert float(sol.info.residual) < 1e-8


# ---------------------------------------------------------------- bad inputs
def _call(**overrides):
  kw = dict(
    upper_fn=example1.upper,
    lower_fn=example1.lower,
    x=jnp.asarray(0.0),
    y0=jnp.zeros(2),
    steps=5,
    upper_lr=0.7,
    lower_lr=0.2,
    alpha=0.5,
  )
  kw.update(overrides)
  return bda.solve(**kw)


@pytest.mark.parametrize(
  "overrides, error, match",
  [
    ({"upper_fn": lambda x, y: y}, ValueError, "`upper_fn` must return a scalar"),
    ({"lower_fn": lambda x, y: y * x}, ValueError, "`lower_fn` must return a scalar"),
    ({"upper_fn": lambda x, y: y["w"].sum()}, TypeError, "`upper_fn` failed"),
    ({"y0": jnp.zeros(2, jnp.int32)}, TypeError, "`y0` must have floating-point"),
    ({"steps": 0}, ValueError, "`steps` must be positive"),
    ({"steps": 2.5}, TypeError, "`steps` must be a positive Python int"),
    ({"upper_lr": 0.0}, ValueError, "`upper_lr` must be > 0"),
    ({"lower_lr": -0.1}, ValueError, "`lower_lr` must be > 0"),
    ({"alpha": 1.5}, ValueError, "`alpha` must lie in"),
    ({"alpha": -0.1}, ValueError, "`alpha` must lie in"),
    ({"alpha": lambda k: 2.0 / k}, ValueError, r"values in \[0, 1\], got alpha_1 = 2"),
    ({"alpha": True}, TypeError, "`alpha` must be a number"),
    ({"checkpoint": ""}, ValueError, "`checkpoint`"),
    ({"truncate": 9}, ValueError, "`truncate`"),
    ({"checkpoint": "sometimes"}, ValueError, "`checkpoint`"),
    ({"prox": lambda x, y, s: (y, y)}, ValueError, "`prox`"),
    ({"upper_fn": 3.0}, TypeError, "`upper_fn` must be callable"),
  ],
)
def test_bad_input_names_the_argument(overrides, error, match):
  with pytest.raises(error, match=match):
    _call(**overrides)


def test_bad_input_raises_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="`lower_lr` must be > 0"):
    jax.jit(lambda x: _call(x=x, lower_lr=0.0).y)(jnp.asarray(0.0))


def test_schedule_errors():
  with pytest.raises(ValueError, match="`c` must lie in"):
    schedules.harmonic(1.5)
  with pytest.raises(ValueError, match="`upper_lr` must be <="):
    schedules.theorem2(upper_lr=2.0, sigma=1.0, smoothness=1.0)
  with pytest.raises(ValueError, match="`gamma`"):
    schedules.theorem2(upper_lr=0.5, sigma=1.0, smoothness=1.0, gamma=0.0)


def test_theorem2_schedule_values():
  s_u, sigma, L = 0.5, 0.5, 2.0
  beta = np.sqrt(1 - 2 * s_u * sigma * L / (sigma + L))
  np.testing.assert_allclose(schedules.theorem2_beta(s_u, sigma, L), beta)
  sched = schedules.theorem2(upper_lr=s_u, sigma=sigma, smoothness=L, gamma=0.5, epsilon=0.1)
  k = jnp.arange(1, 50)
  np.testing.assert_allclose(sched(k), np.minimum(1.0 / (k * (1 - beta)), 0.9))
  np.testing.assert_allclose(schedules.harmonic(0.5)(k), 0.5 / k)
  np.testing.assert_allclose(schedules.geometric(0.5, 0.9)(k), 0.5 * 0.9 ** (k - 1))


def test_scalar_schedule_and_numpy_int_checkpoint(quad):
  kw = _kw(quad, steps=10)
  ref = bda.hypergradient(quad.upper, quad.lower, X, jnp.zeros(6), **dict(kw, alpha=0.5))
  got = bda.hypergradient(
    quad.upper, quad.lower, X, jnp.zeros(6), **dict(kw, alpha=lambda k: 0.5, checkpoint=np.int64(3))
  )
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)


def _lower_quadratic(x, y):
  """f = sum_i c_i (y_i - x)^2 / 2 with c = (1, 2, 3): L_f = 3."""
  return 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * (y - x) ** 2)


def _upper_quadratic(x, y):
  return 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * x**2


@pytest.mark.parametrize(
  "lower_lr, exceeds",
  [(0.1, False), (1 / 3, False), (0.5, True), (jnp.array([0.1, 0.1, 0.4]), True)],
)
def test_lower_lr_exceeds_bound_flags_s_l_above_one_over_smoothness(lower_lr, exceeds):
  kw = dict(steps=30, upper_lr=0.5, lower_lr=lower_lr, alpha=schedules.harmonic(0.5))
  sol = bda.solve(_upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), smoothness=3.0, **kw)
  assert sol.info.lower_lr_exceeds_bound.dtype == jnp.bool_
  assert bool(sol.info.lower_lr_exceeds_bound) == exceeds
  # 1/3 < s_l < 2/3 is outside Theorem 2's range but still converges: SUCCESS.
  assert int(sol.info.status) == Status.SUCCESS
  assert bda.solve(_upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), **kw).info[-1] is None


def test_smoothness_may_be_traced_and_is_validated():
  kw = dict(steps=10, upper_lr=0.5, lower_lr=0.5, alpha=0.0)
  flag = jax.jit(
    lambda L: (
      bda.solve(
        _upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), smoothness=L, **kw
      ).info.lower_lr_exceeds_bound
    )
  )
  assert bool(flag(3.0)) and not bool(flag(1.5))
  with pytest.raises(ValueError, match="`smoothness` must be > 0"):
    bda.solve(_upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), smoothness=-1.0, **kw)
  with pytest.raises(ValueError, match="`smoothness` must be a scalar"):
    bda.solve(_upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), smoothness=jnp.ones(2), **kw)
  import optax

  with pytest.raises(ValueError, match="`smoothness` bounds the gradient step"):
    bda.solve(
      _upper_quadratic,
      _lower_quadratic,
      1.0,
      jnp.zeros(3),
      steps=5,
      upper_lr=0.5,
      alpha=0.0,
      lower_optimizer=optax.sgd(0.1),
      smoothness=3.0,
    )


@pytest.mark.parametrize("alpha", [0.0, schedules.harmonic(0.5)], ids=["rhg", "bda"])
def test_step_size_blow_up_is_diverged_not_success(alpha):
  """s_l = 1e4 on a convex quadratic (L_f = 3): the iterates grow like
  (1 - 3e4)^k while staying finite for K = 4 (f ~ 1e35), so only the
  blow-up test can flag them; the same run with s_l = 0.3 succeeds."""
  kw = dict(steps=4, upper_lr=0.5, alpha=alpha)
  bad = bda.solve(_upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), lower_lr=1e4, **kw)
  assert np.isfinite(float(bad.info.lower_value)) and float(bad.info.lower_value) > 1e20
  assert int(bad.info.status) == Status.DIVERGED
  ok = bda.solve(_upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), lower_lr=0.3, **kw)
  assert int(ok.info.status) == Status.SUCCESS
  # Just beyond the stability limit 2 / L_f (|1 - 0.7 * 3| = 1.1 per step)
  # the residual grows slowly; once it exceeds r_0 the run is flagged.
  slow = bda.solve(
    _upper_quadratic, _lower_quadratic, 1.0, jnp.zeros(3), lower_lr=0.7, **{**kw, "steps": 100}
  )
  assert int(slow.info.status) == Status.DIVERGED


def test_bda_compromise_from_the_lower_solution_is_not_diverged():
  """BDA started at the lower solution moves away from it (r_K > r_0 = 0 and
  f grows) by design; with s_l <= 1 / L_f the blow-up test must not fire."""
  y0 = jnp.ones(3) * 2.0  # argmin f at x = 2
  for lower_lr in (0.1, 1 / 3):
    sol = bda.solve(
      _upper_quadratic,
      _lower_quadratic,
      2.0,
      y0,
      steps=50,
      upper_lr=1.0,
      lower_lr=lower_lr,
      alpha=0.5,
    )
    assert float(sol.info.residual) > 0.1
    assert int(sol.info.status) == Status.SUCCESS
