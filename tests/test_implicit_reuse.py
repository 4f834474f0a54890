"""Doing less work in the implicit adjoint solve: warm starts from the previous
adjoint (``v0``), CG preconditioned by the L-BFGS memory of the lower solve
(SHINE as a preconditioner), Newton's LU factors reused ("factor"), SHINE's
inverse estimate alone ("shine", an approximation), and the upper step that
carries the adjoint across steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import Status, implicit, upper
from bilevel_jax._src import implicit_diff
from tests.helpers import finite_difference_grad

RNG = np.random.default_rng(3)
N, D = 40, 12
A_TR = jnp.asarray(RNG.normal(size=(N, D)))
B_TR = jnp.asarray(RNG.normal(size=N))
A_VAL = jnp.asarray(RNG.normal(size=(N, D)))
B_VAL = jnp.asarray(RNG.normal(size=N))
LAM = jnp.asarray(-1.0 + 0.3 * RNG.normal(size=D))


def lower(lam, w):
  """Logistic-type smooth, strongly convex lower level (not quadratic, so
  L-BFGS's memory is only an estimate of the inverse Hessian)."""
  margins = A_TR @ w * jnp.sign(B_TR)
  return jnp.mean(jnp.logaddexp(0.0, -margins)) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def upper_fn(lam, w):
  return 0.5 * jnp.mean((A_VAL @ w - B_VAL) ** 2)


@jax.jit
def exact(lam):
  """The hypergradient by Newton to machine precision and a dense solve."""
  w = jnp.zeros(D)
  f = lambda ww: lower(lam, ww)
  newton = lambda _, w: w - jnp.linalg.solve(jax.hessian(f)(w), jax.grad(f)(w))
  w = jax.lax.fori_loop(0, 30, newton, w)
  gy = jax.grad(upper_fn, argnums=1)(lam, w)
  v = jnp.linalg.solve(jax.hessian(f)(w), gy)
  _, vjp = jax.vjp(lambda ll: jax.grad(lower, argnums=1)(ll, w), lam)
  return jax.grad(upper_fn)(lam, w) - vjp(v)[0]


EXACT = exact(LAM)
OPTIONS = {
  "pcg": dict(solver="lbfgs", preconditioner="lbfgs"),
  "factor": dict(solver="newton", linear_solver="factor"),
  "cg": dict(solver="lbfgs"),
}


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", ["pcg", "factor"])
def test_exact_options_match_the_exact_hypergradient_and_finite_differences(name):
  kw = dict(tol=1e-11, **OPTIONS[name])
  _, grad, sol = implicit.hypergradient(upper_fn, lower, LAM, jnp.zeros(D), return_info=True, **kw)
  assert int(sol.info.status) == Status.SUCCESS
  assert rel(grad, EXACT) < 1e-8
  assert float(sol.info.linear_residual) <= 1e-10
  # Through `solve`'s custom VJP too, against central differences.
  phi = lambda lam: upper_fn(lam, implicit.solve(lower, lam, jnp.zeros(D), **kw).y)
  fd = finite_difference_grad(phi, LAM, eps=1e-5)
  np.testing.assert_allclose(jax.grad(phi)(LAM), fd, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(jax.grad(phi)(LAM), EXACT, rtol=1e-8, atol=1e-12)


def test_factor_reuses_newtons_factors_without_iterating():
  _, _, sol = implicit.hypergradient(
    upper_fn, lower, LAM, jnp.zeros(D), return_info=True, tol=1e-11, **OPTIONS["factor"]
  )
  assert int(sol.info.linear_steps) == 1
  assert float(sol.info.linear_residual) < 1e-12


def test_lbfgs_preconditioner_saves_cg_iterations():
  counts = {}
  for name in ("cg", "pcg"):
    _, grad, sol = implicit.hypergradient(
      upper_fn, lower, LAM, jnp.zeros(D), return_info=True, tol=1e-11, **OPTIONS[name]
    )
    counts[name] = int(sol.info.linear_steps)
    assert rel(grad, EXACT) < 1e-8
  assert counts["pcg"] < counts["cg"], counts


def test_shine_is_an_approximation_with_its_residual_measured():
  _, grad, sol = implicit.hypergradient(
    upper_fn, lower, LAM, jnp.zeros(D), return_info=True, tol=1e-11, linear_solver="shine"
  )
  # The status says it is not the solve of (2), and the residual is the true one.
  assert int(sol.info.status) == Status.INACCURATE
  w, v = sol.y, sol.adjoint
  hv = jax.jvp(lambda ww: jax.grad(lower, argnums=1)(LAM, ww), (w,), (v,))[1]
  b = jax.grad(upper_fn, argnums=1)(LAM, w)
  np.testing.assert_allclose(
    sol.info.linear_residual, jnp.linalg.norm(hv - b) / jnp.linalg.norm(b), rtol=1e-10
  )
  assert float(sol.info.linear_residual) > 1e-6  # m = 10 pairs on a 12-dim y: not exact
  assert rel(grad, EXACT) > 1e-6
  with pytest.raises(ValueError, match="approximation"):
    implicit.solve(lower, LAM, jnp.zeros(D), linear_solver="shine")


def test_warm_adjoint_gives_the_same_gradient_in_fewer_steps():
  kw = dict(tol=1e-11, **OPTIONS["pcg"])
  _, _, first = implicit.hypergradient(upper_fn, lower, LAM, jnp.zeros(D), return_info=True, **kw)
  lam = LAM + 0.01
  _, cold, cold_sol = implicit.hypergradient(upper_fn, lower, lam, first.y, return_info=True, **kw)
  _, warm, warm_sol = implicit.hypergradient(
    upper_fn, lower, lam, first.y, v0=first.adjoint, return_info=True, **kw
  )
  assert rel(warm, cold) < 1e-8 and rel(warm, exact(lam)) < 1e-8
  assert float(warm_sol.info.linear_residual) <= 1e-10
  assert int(warm_sol.info.linear_steps) < int(cold_sol.info.linear_steps)
  # The exact adjoint as v0 at the same point: nothing left to do.
  _, _, again = implicit.hypergradient(
    upper_fn, lower, lam, warm_sol.y, v0=warm_sol.adjoint, return_info=True, **kw
  )
  assert int(again.info.linear_steps) <= 1


def test_adjoint_has_the_structure_of_the_float_leaves_of_y():
  y0 = {"w": jnp.zeros(D), "count": jnp.array(3)}
  lo = lambda lam, y: lower(lam, y["w"])
  up = lambda lam, y: upper_fn(lam, y["w"])
  _, grad, sol = implicit.hypergradient(up, lo, LAM, y0, return_info=True, tol=1e-11)
  assert sol.adjoint["count"] is None and sol.adjoint["w"].shape == (D,)
  _, grad2, _ = implicit.hypergradient(
    up, lo, LAM, sol.y, v0=sol.adjoint, return_info=True, tol=1e-11
  )
  assert rel(grad2, grad) < 1e-8
  assert implicit.solve(lo, LAM, y0).adjoint is None


def test_cg_warm_start_and_preconditioner_solve_to_tol():
  m = jnp.asarray(RNG.normal(size=(D, D)))
  h = m @ m.T + 0.1 * jnp.eye(D)
  b = jnp.asarray(RNG.normal(size=D))
  exact_v = jnp.linalg.solve(h, b)
  jacobi = lambda r: r / jnp.diag(h)
  for kw in (dict(), dict(x0=exact_v + 1e-3), dict(preconditioner=jacobi)):
    v, steps, res = implicit_diff.cg(lambda p: h @ p, b, tol=1e-12, max_steps=200, **kw)
    assert float(res) <= 1e-12
    np.testing.assert_allclose(v, exact_v, rtol=1e-8)
  v, steps, res = implicit_diff.cg(lambda p: h @ p, b, tol=1e-12, max_steps=200, x0=exact_v)
  assert int(steps) <= 1


def test_transformations_and_no_retrace():
  kw = dict(tol=1e-11, preconditioner="lbfgs")
  traces = []

  def hg(lam, y0, v0):
    traces.append(1)
    return implicit.hypergradient(upper_fn, lower, lam, y0, v0=v0, return_info=True, **kw)

  jitted = jax.jit(hg)
  _, g1, s1 = jitted(LAM, jnp.zeros(D), jnp.zeros(D))
  _, g2, s2 = jitted(LAM + 0.01, s1.y, s1.adjoint)
  assert len(traces) == 1
  assert rel(g1, EXACT) < 1e-8
  lams = jnp.stack([LAM, LAM + 0.1])
  _, gv, _ = jax.vmap(hg)(lams, jnp.zeros((2, D)), jnp.zeros((2, D)))
  np.testing.assert_allclose(gv[0], g1, rtol=1e-8)
  # Differentiable in x (second order: the value through solve's rule).
  phi = lambda lam: upper_fn(lam, implicit.solve(lower, lam, jnp.zeros(D), **kw).y)
  np.testing.assert_allclose(jax.jit(jax.grad(phi))(LAM), EXACT, rtol=1e-8, atol=1e-12)


def test_make_step_carries_the_adjoint_with_optax():
  hg = implicit.make_hypergradient(upper_fn, lower, jit=False, tol=1e-11)
  runs = {}
  for warm in (False, True):
    stepper = upper.make_step(hg, optax.adam(0.05), warm_start=True, warm_start_adjoint=warm)
    step = jax.jit(stepper.step)
    state = stepper.init(LAM, jnp.zeros(D))
    if warm:
      np.testing.assert_array_equal(state.adjoint, jnp.zeros(D))
    else:
      assert state.adjoint is None
    for _ in range(5):
      previous = state
      state, info = step(state)
      assert int(info.status) == Status.SUCCESS
    assert step._cache_size() == 1
    runs[warm] = (previous, state)
  # The same iterates with and without the adjoint warm start (it only saves work).
  np.testing.assert_allclose(runs[True][1].x, runs[False][1].x, rtol=1e-8)
  # The carried adjoint is the last step's v, which solves (2) there.
  previous, state = runs[True]
  _, _, sol = hg(previous.x, previous.y0, v0=previous.adjoint)
  np.testing.assert_allclose(state.adjoint, sol.adjoint, rtol=1e-10)
  assert float(sol.info.linear_residual) <= 1e-10
  # Many tasks at once: vmap over states.
  stepper = upper.make_step(hg, optax.sgd(0.1), warm_start=True, warm_start_adjoint=True)
  states = jax.vmap(stepper.init)(jnp.stack([LAM, LAM + 0.1]), jnp.zeros((2, D)))
  states, infos = jax.vmap(stepper.step)(states)
  assert states.adjoint.shape == (2, D) and bool(jnp.all(infos.status == Status.SUCCESS))


@pytest.mark.parametrize("degree", [1, 2])
def test_make_step_extrapolates_both_starts(degree):
  hg = implicit.make_hypergradient(upper_fn, lower, jit=False, tol=1e-11)
  finals = {}
  for extrapolate in (0, degree):
    stepper = upper.make_step(
      hg, optax.adam(0.05), warm_start=True, warm_start_adjoint=True, extrapolate=extrapolate
    )
    step = jax.jit(stepper.step)
    state = stepper.init(LAM, jnp.zeros(D))
    state, _ = step(state)
    # After the first step there is one solution only: no extrapolation yet.
    np.testing.assert_array_equal(state.y0, state.y)
    np.testing.assert_array_equal(state.v0, state.adjoint)
    ys, vs = [state.y], [state.adjoint]
    for _ in range(4):
      state, info = step(state)
      ys.append(state.y)
      vs.append(state.adjoint)
      assert int(info.status) == Status.SUCCESS
    weights = {0: (1.0,), 1: (2.0, -1.0), 2: (3.0, -3.0, 1.0)}[extrapolate]
    for start, past in ((state.y0, ys), (state.v0, vs)):
      guess = sum(w * s for w, s in zip(weights, past[::-1]))
      np.testing.assert_allclose(start, guess, rtol=1e-12, atol=1e-14)
    assert step._cache_size() == 1
    finals[extrapolate] = state.x
  # Only the starting points differ: the same iterates to the solves' tolerances.
  np.testing.assert_allclose(finals[degree], finals[0], rtol=1e-7)


def test_extrapolate_errors():
  hg = implicit.make_hypergradient(upper_fn, lower, jit=False)
  with pytest.raises(ValueError, match="needs `warm_start"):
    upper.make_step(hg, optax.sgd(0.1), extrapolate=1)
  for bad in (3, True, 1.0):
    with pytest.raises(ValueError, match="`extrapolate` must be 0, 1 or 2"):
      upper.make_step(hg, optax.sgd(0.1), warm_start=True, extrapolate=bad)


def test_make_step_adjoint_errors():
  stepper = upper.make_step(lambda x, y0, v0: (0.0, x, y0), optax.sgd(0.1), warm_start_adjoint=True)
  with pytest.raises(ValueError, match="warm_start_adjoint"):
    stepper.init(jnp.ones(2))
  with pytest.raises(TypeError, match="returns its adjoint"):
    stepper.step(stepper.init(jnp.ones(2), jnp.zeros(2)))
  with pytest.raises(TypeError, match="warm_start_adjoint"):
    upper.make_step(lambda x: (0.0, x), optax.sgd(0.1), warm_start_adjoint=1)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(linear_solver="factor"), "solver='newton'"),
    (dict(linear_solver="shine", solver="newton"), "solver='lbfgs'"),
    (dict(preconditioner="lbfgs", solver="gd"), "solver='lbfgs'"),
    (dict(preconditioner="lbfgs", linear_solver="dense"), "linear_solver='cg'"),
    (dict(preconditioner="jacobi"), "`preconditioner`"),
  ],
)
def test_option_errors_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    implicit.hypergradient(upper_fn, lower, LAM, jnp.zeros(D), **kwargs)


def test_v0_of_the_wrong_size_is_refused():
  with pytest.raises(ValueError, match="`v0`"):
    implicit.hypergradient(upper_fn, lower, LAM, jnp.zeros(D), v0=jnp.zeros(D + 1))


def test_optimize_carries_the_adjoint_and_extrapolates_and_resumes(tmp_path):
  """upper.optimize passes warm_start_adjoint/extrapolate to its step: the
  same iterates as without them (only starting points change), and a run
  resumed from a checkpoint (adjoint restarted from zeros) agrees too."""
  hg = implicit.make_hypergradient(upper_fn, lower, jit=False, tol=1e-11)
  kw = dict(steps=6, y0=jnp.zeros(D), warm_start=True)
  plain = upper.optimize(hg, LAM, optax.adam(0.05), **kw)
  fast = upper.optimize(hg, LAM, optax.adam(0.05), warm_start_adjoint=True, extrapolate=2, **kw)
  assert int(fast.info.status) == Status.SUCCESS
  np.testing.assert_allclose(fast.x, plain.x, rtol=1e-7)
  path = str(tmp_path / "run.npz")
  opts = dict(warm_start_adjoint=True, extrapolate=2, checkpoint_path=path, checkpoint_every=1)
  upper.optimize(hg, LAM, optax.adam(0.05), **{**kw, "steps": 3}, **opts)
  resumed = upper.optimize(hg, LAM, optax.adam(0.05), **kw, **opts)
  assert int(resumed.info.resumed_from) == 3
  np.testing.assert_allclose(resumed.x, plain.x, rtol=1e-7)
  with pytest.raises(ValueError, match="`warm_start_adjoint=True` needs `y0`"):
    upper.optimize(hg, LAM, optax.adam(0.05), steps=2, warm_start_adjoint=True)
