"""Implicit hypergradients: closed forms, finite differences, BDA, pytrees,
transformations, float32, status codes and argument errors."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax._src.implicit.solver as implicit_solver
from bilevel_jax import Status, bda, implicit, upper
from bilevel_jax.problems import make_quadratic
from tests.helpers import finite_difference_grad

RNG = np.random.default_rng(0)
N, D = 30, 5
A_TR = jnp.asarray(RNG.normal(size=(N, D)))
B_TR = jnp.asarray(RNG.normal(size=N))
A_VAL = jnp.asarray(RNG.normal(size=(N, D)))
B_VAL = jnp.asarray(RNG.normal(size=N))
LAM = jnp.asarray(0.3 * RNG.normal(size=D))


def ridge_lower(lam, w):
  """Ridge with one log-regularization weight per feature."""
  return 0.5 * jnp.sum((A_TR @ w - B_TR) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def ridge_upper(lam, w):
  return 0.5 * jnp.sum((A_VAL @ w - B_VAL) ** 2) + 0.05 * jnp.sum(lam**2)


def ridge_exact(lam):
  """phi(lam) with w*(lam) = (A^T A + diag(e^lam))^{-1} A^T b."""
  w = jnp.linalg.solve(A_TR.T @ A_TR + jnp.diag(jnp.exp(lam)), A_TR.T @ B_TR)
  return ridge_upper(lam, w)


def relative_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------- derivatives
@pytest.mark.parametrize(
  "kw", [dict(solver="lbfgs"), dict(solver="gd"), dict(solver="newton", linear_solver="dense")]
)
def test_ridge_hypergradient_matches_closed_form(kw):
  value, grad, sol = implicit.hypergradient(
    ridge_upper, ridge_lower, LAM, jnp.zeros(D), tol=1e-11, return_info=True, **kw
  )
  assert int(sol.info.status) == Status.SUCCESS
  assert float(sol.info.linear_residual) < 1e-10 and int(sol.info.linear_steps) >= 1
  np.testing.assert_allclose(value, ridge_exact(LAM), rtol=1e-12)
  assert relative_error(grad, jax.grad(ridge_exact)(LAM)) < 1e-9


def _logistic_data():
  x = jnp.asarray(RNG.normal(size=(40, 4)))
  labels = jnp.asarray(np.sign(RNG.normal(size=40)))
  return x[:30], labels[:30], x[30:], labels[30:]


def test_logistic_hypergradient_matches_finite_differences():
  x_tr, t_tr, x_val, t_val = _logistic_data()
  lower = lambda lam, w: (
    jnp.mean(jnp.logaddexp(0.0, -t_tr * (x_tr @ w))) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)
  )
  upper_fn = lambda lam, w: jnp.mean(jnp.logaddexp(0.0, -t_val * (x_val @ w)))
  lam = jnp.asarray([-1.0, -2.0, -0.5, -1.5])
  kw = dict(solver="newton", tol=1e-13)
  _, grad = implicit.hypergradient(upper_fn, lower, lam, jnp.zeros(4), **kw)
  phi = jax.jit(lambda l: upper_fn(l, implicit.solve(lower, l, jnp.zeros(4), **kw).y))
  np.testing.assert_allclose(
    grad, finite_difference_grad(phi, lam, eps=1e-5), rtol=1e-7, atol=1e-10
  )
  _, grad_lbfgs = implicit.hypergradient(upper_fn, lower, lam, jnp.zeros(4), tol=1e-12)
  np.testing.assert_allclose(grad_lbfgs, grad, rtol=1e-9, atol=1e-12)


def test_grad_through_solve_and_closed_over_data():
  """jax.grad through `solve` equals `hypergradient`, and the data lower_fn
  closes over get exact cotangents (closure_convert)."""

  def phi(lam, b_tr):
    lower = lambda l, w: 0.5 * jnp.sum((A_TR @ w - b_tr) ** 2) + 0.5 * jnp.sum(jnp.exp(l) * w**2)
    return ridge_upper(lam, implicit.solve(lower, lam, jnp.zeros(D), solver="newton", tol=1e-11).y)

  def exact(lam, b_tr):
    w = jnp.linalg.solve(A_TR.T @ A_TR + jnp.diag(jnp.exp(lam)), A_TR.T @ b_tr)
    return ridge_upper(lam, w)

  g_lam, g_b = jax.grad(phi, argnums=(0, 1))(LAM, B_TR)
  e_lam, e_b = jax.grad(exact, argnums=(0, 1))(LAM, B_TR)
  assert relative_error(g_lam, e_lam) < 1e-9 and relative_error(g_b, e_b) < 1e-9
  _, h = implicit.hypergradient(
    ridge_upper, ridge_lower, LAM, jnp.zeros(D), solver="newton", tol=1e-11
  )
  np.testing.assert_allclose(g_lam, h, rtol=1e-12, atol=1e-14)


def test_agrees_with_bda_at_large_K():
  quad = make_quadratic(jax.random.PRNGKey(0), dim_x=3, dim_y=6, condition=5.0)
  x, y0 = jnp.array([0.3, -0.7, 1.1]), jnp.zeros(6)
  _, g_implicit = implicit.hypergradient(quad.upper, quad.lower, x, y0, solver="gd", tol=1e-12)
  lower_lr = float(1 / quad.lower_smoothness())
  _, g_bda = jax.jit(
    lambda x: bda.hypergradient(
      quad.upper, quad.lower, x, y0, steps=800, upper_lr=0.5, lower_lr=lower_lr, alpha=0.0
    )
  )(x)
  np.testing.assert_allclose(g_implicit, quad.hypergradient(x), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(g_implicit, g_bda, rtol=1e-9, atol=1e-10)


def test_dense_and_cg_agree():
  grads = [
    implicit.hypergradient(
      ridge_upper, ridge_lower, LAM, jnp.zeros(D), tol=1e-11, solver="newton", linear_solver=ls
    )[1]
    for ls in ("cg", "dense")
  ]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_pytree_x_and_y():
  """x = {"log_l2", "shift"}, y = (w, bias); against the flat closed form."""

  def lower(x, y):
    w, bias = y
    r = A_TR @ w + bias - B_TR - x["shift"]
    return 0.5 * jnp.sum(r**2) + 0.5 * jnp.exp(x["log_l2"]) * (jnp.sum(w**2) + bias**2)

  def upper_fn(x, y):
    w, bias = y
    return 0.5 * jnp.sum((A_VAL @ w + bias - B_VAL) ** 2)

  def exact(x):
    a = jnp.concatenate([A_TR, jnp.ones((N, 1))], axis=1)
    z = jnp.linalg.solve(a.T @ a + jnp.exp(x["log_l2"]) * jnp.eye(D + 1), a.T @ (B_TR + x["shift"]))
    return upper_fn(x, (z[:D], z[D]))

  x = {"log_l2": jnp.asarray(0.2), "shift": jnp.asarray(0.1 * RNG.normal(size=N))}
  y0 = (jnp.zeros(D), jnp.zeros(()))
  value, grad, sol = implicit.hypergradient(
    upper_fn, lower, x, y0, solver="gd", tol=1e-11, return_info=True
  )
  assert isinstance(sol.y, tuple) and sol.y[0].shape == (D,) and sol.y[1].shape == ()
  expected = jax.grad(exact)(x)
  assert set(grad) == {"log_l2", "shift"}
  np.testing.assert_allclose(value, exact(x), rtol=1e-12)
  for key in grad:
    np.testing.assert_allclose(grad[key], expected[key], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- drivers
def test_make_hypergradient_drives_upper_optimize():
  fn = implicit.make_hypergradient(ridge_upper, ridge_lower, solver="newton", tol=1e-10)
  result = upper.optimize(fn, LAM, optax.adam(0.1), steps=15, y0=jnp.zeros(D), warm_start=True)
  assert result.history["value"][-1] < result.history["value"][0]
  np.testing.assert_allclose(result.history["value"][0], ridge_exact(LAM), rtol=1e-10)
  assert result.info.status == Status.SUCCESS and result.y.shape == (D,)
  np.testing.assert_array_equal(result.history["lower_status"], Status.SUCCESS)
  assert np.all(result.history["lower_residual"] < 1e-10)


# --------------------------------------------------------------------- status
def test_nonconvergence_and_nonfinite_are_reported():
  sol = implicit.solve(ridge_lower, LAM, jnp.zeros(D), solver="gd", stepsize=1e-4, max_steps=3)
  assert int(sol.info.status) == Status.MAX_STEPS and int(sol.info.num_steps) == 3
  assert float(sol.info.residual) > 1e-8
  assert np.isnan(float(sol.info.linear_residual)) and int(sol.info.linear_steps) == -1
  bad = implicit.solve(
    lambda lam, w: ridge_lower(lam, w) + jnp.log(lam[0]),
    LAM.at[0].set(-1.0),
    jnp.zeros(D),
    solver="newton",
  )
  assert int(bad.info.status) == Status.NONFINITE


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(tol=0.0), ValueError, "`tol`"),
    (dict(tol=-1e-3), ValueError, "`tol`"),
    (dict(linear_tol=0.0), ValueError, "`linear_tol`"),
    (dict(solver="bfgs"), ValueError, "`solver`"),
    (dict(linear_solver="gmres"), ValueError, "`linear_solver`"),
    (dict(max_steps=0), ValueError, "`max_steps`"),
    (dict(max_steps=2.5), TypeError, "`max_steps`"),
    (dict(stepsize=0.1), ValueError, "`stepsize`"),
    (dict(solver="gd", stepsize=-0.1), ValueError, "`stepsize`"),
  ],
)
def test_bad_options_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    implicit.solve(ridge_lower, LAM, jnp.zeros(D), **kwargs)


def test_bad_functions_and_shapes_raise():
  with pytest.raises(ValueError, match="`lower_fn` must return a scalar"):
    implicit.solve(lambda lam, w: w**2, LAM, jnp.zeros(D))
  with pytest.raises(TypeError, match="`y0`"):
    implicit.solve(ridge_lower, LAM, jnp.zeros(D + 1))
  with pytest.raises(TypeError, match="`lower_fn` must be callable"):
    implicit.solve(None, LAM, jnp.zeros(D))
  with pytest.raises(TypeError, match="`y0`"):
    implicit.solve(ridge_lower, LAM, jnp.zeros(D, jnp.int32))
  with pytest.raises(ValueError, match="`upper_fn` must return a scalar"):
    implicit.hypergradient(lambda lam, w: w, ridge_lower, LAM, jnp.zeros(D))
  with pytest.raises(TypeError, match="unknown keyword"):
    implicit.hypergradient(ridge_upper, ridge_lower, LAM, jnp.zeros(D), steps=3)
  with pytest.raises(TypeError, match="unknown keyword"):
    implicit.make_hypergradient(ridge_upper, ridge_lower, steps=3)


def test_docstring_examples():
  result = doctest.testmod(implicit_solver, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
