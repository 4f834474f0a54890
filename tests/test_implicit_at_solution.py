"""implicit.hypergradient_at: the hypergradient at a y the user trained, by CG,
Neumann or the darts approximation, with warm-started adjoints and batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import Status, SolverError, implicit
from tests.helpers import finite_difference_grad

KEY = jax.random.PRNGKey(0)
A = jax.random.normal(KEY, (40, 6))
B = jax.random.normal(jax.random.PRNGKey(1), (40,))
A_VAL = jax.random.normal(jax.random.PRNGKey(2), (20, 6))
B_VAL = jax.random.normal(jax.random.PRNGKey(3), (20,))


def lower(x, w, batch=None):
  a, b = (A, B) if batch is None else batch
  return 0.5 * jnp.sum((a @ w - b) ** 2) + 0.5 * jnp.exp(x) * jnp.sum(w**2)


def upper(x, w):
  return 0.5 * jnp.sum((A_VAL @ w - B_VAL) ** 2)


def ridge_solution(x, a=A, b=B):
  return jnp.linalg.solve(a.T @ a + jnp.exp(x) * jnp.eye(a.shape[1]), a.T @ b)


def exact(x):
  return jax.grad(lambda x: upper(x, ridge_solution(x)))(x)


X = jnp.asarray(0.3)
L_MAX = float(jnp.linalg.eigvalsh(A.T @ A)[-1] + jnp.exp(X))


def test_cg_and_neumann_match_the_closed_form_and_finite_differences():
  y = ridge_solution(X)
  fd = finite_difference_grad(lambda x: upper(x, ridge_solution(x)), X)
  np.testing.assert_allclose(exact(X), fd, rtol=1e-6)
  cg = implicit.hypergradient_at(upper, lower, X, y, tol=1e-12)
  assert int(cg.info.status) == Status.SUCCESS and cg.info.residual <= 1e-12
  np.testing.assert_allclose(cg.grad, exact(X), rtol=1e-9)
  neumann = implicit.hypergradient_at(
    upper, lower, X, y, adjoint="neumann", neumann_lr=1.0 / L_MAX, max_steps=3000, tol=1e-8
  )
  assert int(neumann.info.status) == Status.SUCCESS
  np.testing.assert_allclose(neumann.grad, exact(X), rtol=1e-6)
  assert cg.info.lower_grad_norm < 1e-10 and not bool(cg.info.approximate)


def test_a_truncated_neumann_series_is_inaccurate_not_success():
  sol = implicit.hypergradient_at(
    upper, lower, X, ridge_solution(X), adjoint="neumann", neumann_lr=1.0 / L_MAX, max_steps=3
  )
  assert int(sol.info.status) == Status.INACCURATE and sol.info.residual > 1e-6
  with pytest.raises(SolverError, match="INACCURATE"):
    implicit.hypergradient_at(
      upper,
      lower,
      X,
      ridge_solution(X),
      adjoint="neumann",
      neumann_lr=1.0 / L_MAX,
      max_steps=3,
      throw=True,
    )


def test_warm_started_adjoint_saves_steps_across_upper_steps():
  """The adjoint of the previous upper step starts the next solve: CG needs
  fewer steps, and one Neumann step per upper step (SOBA's single loop)
  tracks the exact adjoint as x moves slowly."""
  a = jax.random.normal(KEY, (120, 60)) * jnp.linspace(0.2, 3.0, 60)[None, :]
  b = jax.random.normal(jax.random.PRNGKey(4), (120,))
  f = lambda x, w: lower(x, w, (a, b))
  F = lambda x, w: 0.5 * jnp.sum((w - 1.0) ** 2)
  x0, x1 = X, X + 1e-3
  first = implicit.hypergradient_at(F, f, x0, ridge_solution(x0, a, b), tol=1e-10)
  cold = implicit.hypergradient_at(F, f, x1, ridge_solution(x1, a, b), tol=1e-10)
  warm = implicit.hypergradient_at(F, f, x1, ridge_solution(x1, a, b), tol=1e-10, v0=first.adjoint)
  assert int(warm.info.status) == int(cold.info.status) == Status.SUCCESS
  assert int(warm.info.num_steps) < int(cold.info.num_steps), (warm.info, cold.info)
  np.testing.assert_allclose(warm.grad, cold.grad, rtol=1e-8)
  v = implicit.hypergradient_at(upper, lower, X, ridge_solution(X)).adjoint
  xs = X + 1e-4 * jnp.arange(1, 200)

  def soba(v, x):  # one Neumann step per upper step, v carried along
    sol = implicit.hypergradient_at(
      upper,
      lower,
      x,
      ridge_solution(x),
      adjoint="neumann",
      neumann_lr=1.0 / L_MAX,
      max_steps=1,
      v0=v,
      tol=float("inf"),
    )
    return sol.adjoint, sol.grad

  _, grads = jax.lax.scan(soba, v, xs)
  np.testing.assert_allclose(grads[-1], exact(xs[-1]), rtol=1e-3)


def test_darts_is_labelled_an_approximation_and_its_error_is_measured():
  """darts replaces H^-1 by xi I. Where H = I / xi it is exact; on the ridge
  problem its error against the exact hypergradient is large, and the
  residual of (2) says so: status INACCURATE unless tol is waived."""
  xi = 0.25
  F = lambda x, y: 0.5 * jnp.sum((y - 1.0) ** 2)
  f = lambda x, y: 0.5 / xi * jnp.sum(y**2) - x * jnp.sum(y)
  y_star = lambda x: xi * x * jnp.ones(3)
  sol = implicit.hypergradient_at(F, f, 2.0, y_star(2.0), adjoint="darts", darts_lr=xi)
  true = jax.grad(lambda x: F(x, y_star(x)))(2.0)
  np.testing.assert_allclose(sol.grad, true, rtol=1e-6)
  assert bool(sol.info.approximate) and int(sol.info.status) == Status.SUCCESS

  y = ridge_solution(X)
  approx = implicit.hypergradient_at(upper, lower, X, y, adjoint="darts", darts_lr=1.0 / L_MAX)
  error = float(jnp.abs(approx.grad - exact(X)) / jnp.abs(exact(X)))
  assert int(approx.info.status) == Status.INACCURATE and approx.info.residual > 0.1
  assert 1e-3 < error < 10.0, error
  waived = implicit.hypergradient_at(
    upper, lower, X, y, adjoint="darts", darts_lr=1.0 / L_MAX, tol=float("inf")
  )
  assert int(waived.info.status) == Status.SUCCESS and bool(waived.info.approximate)


def test_batches_reach_the_objectives():
  batch = (A[:25], B[:25])
  y = ridge_solution(X, *batch)
  with_batch = implicit.hypergradient_at(upper, lower, X, y, lower_batch=batch, tol=1e-12)
  closed = implicit.hypergradient_at(upper, lambda x, w: lower(x, w, batch), X, y, tol=1e-12)
  np.testing.assert_allclose(with_batch.grad, closed.grad, rtol=1e-12)
  exact_on_batch = jax.grad(lambda x: upper(x, ridge_solution(x, *batch)))(X)
  np.testing.assert_allclose(with_batch.grad, exact_on_batch, rtol=1e-8)
  up = implicit.hypergradient_at(
    lambda x, w, val: 0.5 * jnp.sum((val[0] @ w - val[1]) ** 2),
    lower,
    X,
    ridge_solution(X),
    upper_batch=(A_VAL, B_VAL),
    tol=1e-12,
  )
  np.testing.assert_allclose(up.grad, exact(X), rtol=1e-9)


def test_pytree_and_model_variables_carry_non_float_leaves():
  """x a dict, y a dict with an integer counter (carried, not differentiated)."""
  x = {"log_lam": X}
  y = {"w": ridge_solution(X), "steps": jnp.asarray(7)}
  f = lambda x, y: lower(x["log_lam"], y["w"])
  F = lambda x, y: upper(x["log_lam"], y["w"])
  sol = implicit.hypergradient_at(F, f, x, y, tol=1e-12)
  np.testing.assert_allclose(sol.grad["log_lam"], exact(X), rtol=1e-9)
  assert set(sol.adjoint) == {"w", "steps"} and sol.adjoint["steps"] is None


def test_jit_vmap_without_retracing():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, y, v0):
    sol = implicit.hypergradient_at(upper, lower, x, y, v0=v0, tol=1e-10)
    return sol.grad, sol.adjoint, sol.info.status

  y = ridge_solution(X)
  g1, v, _ = step(X, y, jnp.zeros(6))
  g2, _, _ = step(X + 1e-3, ridge_solution(X + 1e-3), v)
  np.testing.assert_allclose(g1, exact(X), rtol=1e-8)
  np.testing.assert_allclose(g2, exact(X + 1e-3), rtol=1e-8)
  xs = jnp.array([0.0, 0.3, 1.0])
  grads = jax.vmap(
    lambda x: implicit.hypergradient_at(upper, lower, x, ridge_solution(x), tol=1e-10).grad
  )(xs)
  np.testing.assert_allclose(grads, jnp.stack([exact(x) for x in xs]), rtol=1e-7)


def test_float32_stays_float32():
  with jax.enable_x64(False):
    a32, b32 = A.astype(jnp.float32), B.astype(jnp.float32)
    f = lambda x, w: 0.5 * jnp.sum((a32 @ w - b32) ** 2) + 0.5 * jnp.exp(x) * jnp.sum(w**2)
    F = lambda x, w: 0.5 * jnp.sum(w**2)
    w = jnp.linalg.solve(a32.T @ a32 + jnp.exp(0.3) * jnp.eye(6, dtype=jnp.float32), a32.T @ b32)
    sol = implicit.hypergradient_at(F, f, jnp.float32(0.3), w, tol=1e-4)
    assert sol.grad.dtype == jnp.float32 and sol.adjoint.dtype == jnp.float32
    assert int(sol.info.status) == Status.SUCCESS


def test_non_finite_is_reported_and_bad_arguments_are_named():
  sol = implicit.hypergradient_at(lambda x, y: jnp.nan * jnp.sum(y), lower, X, ridge_solution(X))
  assert int(sol.info.status) == Status.NONFINITE
  y = ridge_solution(X)
  with pytest.raises(ValueError, match="`adjoint`"):
    implicit.hypergradient_at(upper, lower, X, y, adjoint="lbfgs")
  with pytest.raises(ValueError, match="`neumann_lr`"):
    implicit.hypergradient_at(upper, lower, X, y, adjoint="neumann")
  with pytest.raises(ValueError, match="`darts_lr`"):
    implicit.hypergradient_at(upper, lower, X, y, adjoint="darts")
  with pytest.raises(ValueError, match="max_steps"):
    implicit.hypergradient_at(upper, lower, X, y, max_steps=0)
  with pytest.raises(ValueError, match="upper_fn"):
    implicit.hypergradient_at(lambda x, y: y, lower, X, y)


def test_a_stationary_maximum_is_not_convex():
  """At a maximum of f the adjoint system describes no minimum: NOT_CONVEX
  from CG's curvature or the Rayleigh quotient along v, for every adjoint."""
  f = lambda x, y: -0.5 * jnp.sum(y**2) + x * jnp.sum(y)  # stationary at y = x, a maximum
  F = lambda x, y: 0.5 * jnp.sum((y - 1.0) ** 2)
  for kw in ({}, {"adjoint": "neumann", "neumann_lr": 0.5}, {"adjoint": "darts", "darts_lr": 0.5}):
    sol = implicit.hypergradient_at(F, f, 2.0, jnp.full(3, 2.0), **kw)
    assert int(sol.info.status) == Status.NOT_CONVEX, kw
    assert float(sol.info.curvature) <= 0
  ok = implicit.hypergradient_at(upper, lower, X, ridge_solution(X), tol=1e-10)
  assert int(ok.info.status) == Status.SUCCESS and float(ok.info.curvature) > 0
