"""Algorithm 1 on the elastic net (6.1) in NumPy + cvxpy: the reference that
`bilevel_jax.composite` + `upper.gradient_sampling` are timed against.

The paper's approach (Solla & Royset, Section 6), plain Python, one instance
at a time.  At every point it solves the regularized lower level (3.1) in the
joint (y, w) form of Section 5.1 with cvxpy,

    min_{y, w} |A y - b|^2 + (e^{l2} + beta)/2 |y|^2 + sum_i max(w1_i, w2_i)
               + |w - G(y)|^2 / (2 alpha),      G(y) = e^{l1} (y, -y),

written with cvxpy Parameters (DPP: canonicalized once per instance), sets
p = (G - w)/alpha, reads the active pieces off w (both pieces of block i when
|w1_i - w2_i| <= tol (1 + |w|_inf), else the larger) and computes the
hypergradient (3.6) in NumPy with the x-derivatives written out by hand.  The
minimum-norm element of the sampled hypergradients' hull is a small cvxpy QP.
The samples are the JAX side's: `sample_noise` replays the unit directions and
radius factors that `gradient_sampling` draws from the same key.

cvxpy is optional (``pip install -e .[peers]``): `import_cvxpy` returns None
without it.
"""

from __future__ import annotations

import numpy as np

# Algorithm 1's parameters (Section 6.1), the defaults of upper.gradient_sampling.
GS = {
  "eps0": 1.0,
  "eps_opt": 1e-5,
  "alpha0": 1.0,
  "alpha_opt": 1e-5,
  "beta0": 1.0,
  "beta_opt": 1e-5,
  "eta0": 1.0,
  "eta_opt": 1e-5,
  "mu_eps": 0.5,
  "mu_alpha": 0.5,
  "mu_beta": 0.5,
  "mu_eta": 0.5,
  "delta": 1e-4,
  "gamma": 0.5,
  "max_backtracks": 30,
}


def import_cvxpy():
  """cvxpy, or None when it is not installed."""
  try:
    import cvxpy
  except ImportError:
    return None
  return cvxpy


def sample_noise(key, num_samples, max_steps, n=2):
  """The unit directions and radius factors u^(1/n) that `gradient_sampling`
  draws at each iteration from ``key`` (`sampling.ball`), as NumPy arrays
  of shapes (max_steps, num_samples, n) and (max_steps, num_samples, 1)."""
  import jax
  import jax.numpy as jnp

  def step(key, _):
    key, sample_key = jax.random.split(key)
    k1, k2 = jax.random.split(sample_key)
    direction = jax.random.normal(k1, (num_samples, n), jnp.float64)
    direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
    factor = jax.random.uniform(k2, (num_samples, 1), jnp.float64) ** (1.0 / n)
    return key, (direction, factor)

  _, (dirs, factors) = jax.lax.scan(step, key, None, length=max_steps)
  return np.asarray(dirs), np.asarray(factors)


class CvxpyElasticNet:
  """The regularized lower level (3.1) of (6.1) in the joint (y, w) form,
  solved by cvxpy, and the hypergradient (3.6) in NumPy."""

  def __init__(self, cp, data, solver="default", active_tol=1e-6):
    self.cp = cp
    self.a, self.b = np.asarray(data.a_train), np.asarray(data.b_train)
    self.a_val, self.b_val = np.asarray(data.a_val), np.asarray(data.b_val)
    self.a_test, self.b_test = np.asarray(data.a_test), np.asarray(data.b_test)
    self.solver = None if solver == "default" else solver
    self.active_tol = active_tol
    d = self.a.shape[1]
    self.d = d
    self.ata2 = 2 * self.a.T @ self.a
    self.y, self.w = cp.Variable(d), cp.Variable(2 * d)
    # DPP parameters: ridge = (e^{l2} + beta)/2, s = 1/sqrt(2 alpha), t = e^{l1} s.
    self.ridge = cp.Parameter(nonneg=True)
    self.s, self.t = cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
    objective = (
      cp.sum_squares(self.a @ self.y - self.b)
      + self.ridge * cp.sum_squares(self.y)
      + cp.sum(cp.maximum(self.w[:d], self.w[d:]))
      + cp.sum_squares(self.s * self.w - self.t * cp.hstack([self.y, -self.y]))
    )
    self.problem = cp.Problem(cp.Minimize(objective))
    self.solves = self.unpolished = 0
    self.solver_name = None

  def lower(self, x, alpha, beta):
    """(y, w, p) of (3.1) at x = (l1, l2), or None when cvxpy fails."""
    e1, e2 = np.exp(x[0]), np.exp(x[1])
    self.ridge.value = 0.5 * (e2 + beta)
    self.s.value = 1.0 / np.sqrt(2.0 * alpha)
    self.t.value = e1 / np.sqrt(2.0 * alpha)
    self.problem.solve(solver=self.solver)
    self.solves += 1
    stats = self.problem.solver_stats
    self.solver_name = stats.solver_name
    polish = getattr(getattr(stats.extra_stats, "info", None), "status_polish", None)
    self.unpolished += polish is not None and polish != 1  # OSQP: 1 = polished
    if self.problem.status not in ("optimal", "optimal_inaccurate"):
      return None
    y, w = self.y.value, self.w.value
    g_val = e1 * np.concatenate([y, -y])
    return y, w, (g_val - w) / alpha

  def value(self, x, alpha, beta):
    sol = self.lower(x, alpha, beta)
    if sol is None:
      return np.nan
    r = self.a_val @ sol[0] - self.b_val
    return r @ r / self.b_val.size

  def value_and_grad(self, x, alpha, beta):
    """f(x, Y_{alpha,beta}(x)) and its gradient by (3.6)."""
    sol = self.lower(x, alpha, beta)
    if sol is None:
      return np.nan, np.full(2, np.nan)
    y, w, p = sol
    d = self.d
    e1, e2 = np.exp(x[0]), np.exp(x[1])
    r = self.a_val @ y - self.b_val
    value = r @ r / self.b_val.size
    c_y = 2 * self.a_val.T @ r / self.b_val.size  # grad_y f
    # Active pieces per block: both when w1_i = w2_i (to tol), else the larger.
    both = np.abs(w[:d] - w[d:]) <= self.active_tol * (1 + np.max(np.abs(w)))
    # P: projector onto span{e_1i - e_2i : both pieces of block i active}.
    proj = np.zeros((2 * d, 2 * d))
    idx = np.nonzero(both)[0]
    proj[idx, idx] = proj[d + idx, d + idx] = 0.5
    proj[idx, d + idx] = proj[d + idx, idx] = -0.5
    jac = e1 * np.vstack([np.eye(d), -np.eye(d)])  # grad_y G
    hess = self.ata2 + (e2 + beta) * np.eye(d)  # hess_yy L
    u_y = np.linalg.solve(hess + jac.T @ proj @ jac / alpha, c_y)
    u_p = proj @ (jac @ u_y) / alpha
    # x-bar = -d/dx [grad_y L; G]^T (u_y, u_p) at fixed (y, p), with
    # grad_y L = 2 A^T (A y - b) + (e^{l2} + beta) y + e^{l1} (p1 - p2) and
    # G = e^{l1} (y, -y):  d/dl1 = (e^{l1} (p1 - p2), G),  d/dl2 = (e^{l2} y, 0).
    g_val = e1 * np.concatenate([y, -y])
    grad = -np.array([u_y @ (e1 * (p[:d] - p[d:])) + u_p @ g_val, u_y @ (e2 * y)])
    return value, grad

  def retrain(self, lam):
    """The elastic net (6.1) itself at lambda; validation and test mse."""
    cp = self.cp
    y = cp.Variable(self.d)
    cp.Problem(
      cp.Minimize(
        cp.sum_squares(self.a @ y - self.b)
        + np.exp(lam[0]) * cp.norm1(y)
        + 0.5 * np.exp(lam[1]) * cp.sum_squares(y)
      )
    ).solve(solver=self.solver)
    mse = lambda a, b: float(np.mean((a @ y.value - b) ** 2))
    return mse(self.a_val, self.b_val), mse(self.a_test, self.b_test)


class MinNorm:
  """min |W^T lam| over the simplex, a cvxpy QP (DPP in W)."""

  def __init__(self, cp, num, n, solver):
    self.points = cp.Parameter((num, n))
    self.lam = cp.Variable(num)
    self.problem = cp.Problem(
      cp.Minimize(cp.sum_squares(self.points.T @ self.lam)), [self.lam >= 0, cp.sum(self.lam) == 1]
    )
    self.solver = solver

  def __call__(self, grads):
    self.points.value = grads
    self.problem.solve(solver=self.solver)
    lam = np.clip(self.lam.value, 0, None)
    return grads.T @ (lam / lam.sum())


def algorithm1(lower, dirs, factors, num_samples, max_steps, solver="default"):
  """Algorithm 1 in plain Python, the parameters of GS, the samples of JAX.

  f(x) at the current (x, alpha, beta) is reused from the accepted line-search
  trial when neither x nor the regularization changed since; the line search
  is skipped on target hits.
  """
  hull = MinNorm(lower.cp, num_samples, 2, None if solver == "default" else solver)
  x = np.zeros(2)
  eps, alpha, beta, eta = GS["eps0"], GS["alpha0"], GS["beta0"], GS["eta0"]
  fx = None
  hits = failures = 0
  status = "max_steps"
  k = 0
  for k in range(max_steps):
    points = x[None, :] + (eps * factors[k]) * dirs[k]
    grads = np.array([lower.value_and_grad(pt, alpha, beta)[1] for pt in points])
    if not np.all(np.isfinite(grads)):
      status = "nonfinite"
      break
    w = hull(grads)
    norm_w = float(np.linalg.norm(w))
    if (
      norm_w <= GS["eta_opt"]
      and eps <= GS["eps_opt"]
      and alpha <= GS["alpha_opt"]
      and beta <= GS["beta_opt"]
    ):
      status = "success"
      break
    if norm_w <= eta:
      eps, alpha = GS["mu_eps"] * eps, GS["mu_alpha"] * alpha
      beta, eta = GS["mu_beta"] * beta, GS["mu_eta"] * eta
      hits += 1
      fx = None
      continue
    if fx is None:
      fx = lower.value(x, alpha, beta)
    d = -w / norm_w
    t, ok = 1.0, False
    for _ in range(GS["max_backtracks"]):
      trial = lower.value(x + t * d, alpha, beta)
      if trial < fx - t * GS["delta"] * norm_w:
        ok = True
        break
      t *= GS["gamma"]
    if ok:
      x, fx = x + t * d, trial
    else:
      failures += 1
  return {
    "x": x,
    "iterations": k + 1,
    "status": status,
    "hits": hits,
    "linesearch_failures": failures,
    "alpha": alpha,
    "eps": eps,
    "solves": lower.solves,
    "solves_not_polished": lower.unpolished,
    "solver_name": lower.solver_name,
  }
