"""Implicit hypergradients against jaxopt (issue 5): error against time.

Peer: jaxopt's implicit differentiation (`custom_root`, here through its
solvers' ``implicit_diff_solve``) with conjugate gradients, against
`bilevel_jax.implicit.hypergradient`, on smooth, strongly convex lower
levels. Both sides use the same lower-solver family and the same CG for the
adjoint system hess_yy f v = grad_y F (tolerance ``[linear] tol`` relative
to |grad_y F|, at most ``[linear] max_steps`` iterations):

* ``lbfgs``: our L-BFGS (Armijo backtracking from the unit step) against
  `jaxopt.LBFGS` (its default zoom line search, or backtracking with
  ``[lbfgs] jaxopt_linesearch``), memory ``[lbfgs] memory_size``, both
  stopped when |grad_y f|_2 <= tol, swept over ``[lbfgs] tols``;
* ``gd``: gradient descent with the fixed step 1/L on both sides, K steps
  swept over ``[gd] steps``.

Problems (x is the upper variable, y the lower one; all float64):

* ``ridge``: f(x, y) = |A y - b|^2 / (2n) + sum_j exp(x_j) y_j^2 / 2 and
  F = |A_val y - b_val|^2 / (2 n_val), one regularization weight per
  feature. Reference: y* = H^{-1} A^T b / n with H = A^T A / n + diag(e^x),
  grad phi = -e^x * y* * H^{-1} grad_y F (closed form, dense solves).
* ``logistic``: f = mean_i log(1 + exp(-t_i a_i^T y)) + sum_j exp(x_j) y_j^2 / 2,
  F = the validation logistic loss. Reference: Newton's method in NumPy
  (explicit Hessian) to machine precision, then the same dense formula.
* ``quadratic``: benchopt's bilevel benchmark "quadratic" dataset
  (benchopt/benchmark_bilevel, datasets/quadratic.py and
  benchmark_utils/oracles/quadratic.py), full batch: with q(z, x; H, K, C,
  b, c) = z^T H z / 2 + x^T K x / 2 + x^T C z + b^T z + c^T x,
  f(x, y) = q(y, x; inner oracle) and F(x, y) = q(y, x; outer oracle), each
  oracle's matrices the means over n samples of rank-one H_i = a_i a_i^T
  (a_i with covariance of spectrum logspace(mu, L)), K_i likewise with one
  zero eigenvalue, C_i = U D a_i^T a_i V^T (D: logspace(mu, L_cross)), and
  Gaussian b_i, c_i. Default parameters are benchopt's: n = 1024, dim 100,
  mu = 0.1, L = 1, L_cross = 0.1, random_state = 2442, and its loop that
  redraws until the value function's Hessian is positive definite.
  Reference: grad phi = grad_x F + C_in v, v = -H_in^{-1} grad_y F. One
  departure: benchopt draws the singular vectors U, V of the cross matrix
  from NumPy's unseeded global generator; we draw them from
  RandomState(seed + 1) so that the instance is reproducible (every other
  draw is benchopt's, in its order).

Each setting gives one row per implementation: the relative error
|g - g_ref| / |g_ref| of the hypergradient (``metric``), the median time per
hypergradient (value and gradient, jitted, data passed as arguments) over
alternated repeats, compile time apart, and ``speedup`` = jaxopt median /
ours. "matched" rows then take, per problem, family and target error, the
fastest setting of each side whose error is below the target, and compare
their times.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import implicit
from bilevel_jax._src import upper_step
from experiments import config
from benchmarks import timing
from benchmarks import peers
from benchmarks import runner

X64 = True
# Our adjoint options in the full upper run (all with the lower warm start y0 =
# the previous y*): "cg" CG from zero (jaxopt's work), "cg_warm" CG from the
# previous adjoint, "pcg_warm" the same preconditioned by the L-BFGS memory
# (SHINE as a preconditioner), "shine" the L-BFGS inverse alone (an
# approximation; its error is measured like every other); "_extrap<p>": both
# solves start from the extrapolation of degree p of the last p + 1
# solutions (`upper.make_step(..., extrapolate=p)`); jaxopt then gets the
# same extrapolated `init_params`.
UPPER_RUN_VARIANTS = (
  "cg",
  "cg_warm",
  "pcg",
  "pcg_warm",
  "shine",
  "cg_extrap2",
  "cg_warm_extrap1",
  "cg_warm_extrap2",
  "pcg_warm_extrap1",
  "pcg_warm_extrap2",
)
TITLE = "Implicit hypergradients vs jaxopt: hypergradient error against time"
PROBLEMS = ("ridge", "logistic", "quadratic")
F = config.Field
SCHEMA = {
  "problems": {"names": F("list[str]", list(PROBLEMS), config.one_of(*PROBLEMS))},
  "ridge": {
    "n_train": F("int", 2000, config.positive),
    "n_val": F("int", 1000, config.positive),
    "dim": F("int", 500, config.positive),
    "correlation": F("float", 0.8, doc="feature correlation rho^|j-k|"),
    "log_reg": F("float", -4.0, doc="mean of x = log regularization weights"),
    "seed": F("int", 0),
  },
  "logistic": {
    "n_train": F("int", 2000, config.positive),
    "n_val": F("int", 1000, config.positive),
    "dim": F("int", 200, config.positive),
    "correlation": F("float", 0.8),
    "log_reg": F("float", -5.0),
    "seed": F("int", 1),
  },
  "quadratic": {
    "n_samples": F("int", 1024, config.positive),
    "dim_inner": F("int", 100, config.positive),
    "dim_outer": F("int", 100, config.positive),
    "mu": F("float", 0.1, config.positive),
    "L_inner_inner": F("float", 1.0, config.positive),
    "L_inner_outer": F("float", 1.0, config.positive),
    "L_outer_inner": F("float", 1.0, config.positive),
    "L_outer_outer": F("float", 1.0, config.positive),
    "L_cross_inner": F("float", 0.1, config.positive),
    "L_cross_outer": F("float", 0.1, config.positive),
    "random_state": F("int", 2442),
  },
  "lbfgs": {
    "enabled": F("bool", True),
    "tols": F("list[float]", [1e-2, 1e-4, 1e-6, 1e-8, 1e-10], config.positive),
    "max_steps": F("int", 2000, config.positive),
    "memory_size": F("int", 10, config.positive),
    "jaxopt_linesearch": F(
      "str",
      "zoom",
      config.one_of("zoom", "backtracking"),
      doc="jaxopt.LBFGS's line search (zoom: its default)",
    ),
  },
  "gd": {
    "enabled": F("bool", True),
    "steps": F("list[int]", [10, 30, 100, 300, 1000, 3000], config.positive),
  },
  "linear": {
    "tol": F("float", 1e-10, config.positive),
    "max_steps": F("int", 1000, config.positive),
  },
  "timing": {"repeats": F("int", 7, config.positive)},
  "matched": {"targets": F("list[float]", [1e-2, 1e-4, 1e-6, 1e-8], config.positive)},
  "upper_run": {
    "enabled": F("bool", False, doc="the full upper run (warm starts across upper steps)"),
    "steps": F("int", 50, config.positive, doc="T upper steps per run"),
    "learning_rate": F("float", 0.05, config.positive, doc="Adam's step on x"),
    "tols": F("list[float]", [1e-6], config.positive, doc="lower tolerances (both sides)"),
    "linear_tols": F(
      "list[float]",
      [1e-10],
      config.positive,
      doc="adjoint CG tolerances, paired with `tols` (both sides)",
    ),
    "variants": F(
      "list[str]",
      ["cg", "cg_warm", "pcg_warm"],
      config.one_of(*UPPER_RUN_VARIANTS),
      doc="ours: the adjoint of each (see UPPER_RUN_VARIANTS)",
    ),
    "jaxopt_extrapolate": F(
      "list[int]",
      [0],
      config.one_of(0, 1, 2),
      doc="jaxopt's init_params: the previous y* (0) and/or its extrapolation of degree 1, 2",
    ),
    "repeats": F("int", 5, config.positive),
    "reference_newton_steps": F("int", 3, config.positive),
    "targets": F("list[float]", [1e-3, 1e-5, 1e-7], config.positive, doc="matched errors"),
  },
}
COLUMNS = [
  "problem",
  "impl",
  "method",
  "size_name",
  "size",
  "linear_tol",
  "compile_s",
  "median_s",
  "q25_s",
  "q75_s",
  "lower_steps",
  "linear_steps",
  "metric",
  "speedup",
]
METRIC = "hypergradient relative error"


class Problem(NamedTuple):
  """A bilevel instance: objectives of (x, y, data), a point x, y0, the
  reference hypergradient at x and the Lipschitz constant of grad_y f."""

  name: str
  lower: Callable
  upper: Callable
  data: dict
  x: Any
  y0: Any
  reference: np.ndarray
  lipschitz: float


# ------------------------------------------------------------------ problems


def _features(rng, n, dim, correlation):
  """Gaussian rows with covariance correlation^|j-k|."""
  idx = np.arange(dim)
  chol = np.linalg.cholesky(correlation ** np.abs(idx[:, None] - idx[None, :]))
  return rng.normal(size=(n, dim)) @ chol.T


def _ridge(c) -> Problem:
  rng = np.random.default_rng(c["seed"])
  n, m, d = c["n_train"], c["n_val"], c["dim"]
  a = _features(rng, n + m, d, c["correlation"])
  truth = rng.normal(size=d) / np.sqrt(d)
  b = a @ truth + 0.5 * rng.normal(size=n + m)
  data = {"a": a[:n], "b": b[:n], "a_val": a[n:], "b_val": b[n:]}
  x = c["log_reg"] + 0.5 * rng.normal(size=d)

  hess = data["a"].T @ data["a"] / n + np.diag(np.exp(x))
  y = np.linalg.solve(hess, data["a"].T @ data["b"] / n)
  grad_upper = data["a_val"].T @ (data["a_val"] @ y - data["b_val"]) / m
  reference = -np.exp(x) * y * np.linalg.solve(hess, grad_upper)

  def lower(x, y, data):
    r = data["a"] @ y - data["b"]
    return 0.5 * jnp.vdot(r, r) / r.shape[0] + 0.5 * jnp.sum(jnp.exp(x) * y**2)

  def upper(x, y, data):
    r = data["a_val"] @ y - data["b_val"]
    return 0.5 * jnp.vdot(r, r) / r.shape[0]

  return Problem(
    "ridge",
    lower,
    upper,
    _to_jax(data),
    jnp.asarray(x),
    jnp.zeros(d),
    reference,
    float(np.linalg.eigvalsh(hess)[-1]),
  )


def _logistic_newton(a, t, reg, tol=1e-15, max_steps=100):
  """min_y mean log(1 + exp(-t a^T y)) + sum reg y^2 / 2 by damped Newton (NumPy)."""
  n = a.shape[0]
  fun = lambda y: np.mean(np.logaddexp(0.0, -t * (a @ y))) + 0.5 * np.sum(reg * y**2)
  y = np.zeros(a.shape[1])
  for _ in range(max_steps):
    s = 1.0 / (1.0 + np.exp(t * (a @ y)))  # sigma(-t a^T y)
    grad = -a.T @ (t * s) / n + reg * y
    if np.linalg.norm(grad) <= tol:
      break
    hess = (a.T * (s * (1 - s))) @ a / n + np.diag(reg)
    step = np.linalg.solve(hess, grad)
    size, value = 1.0, fun(y)
    while fun(y - size * step) > value - 1e-4 * size * grad @ step and size > 1e-10:
      size *= 0.5
    y_new = y - size * step
    if np.array_equal(y_new, y):
      break
    y = y_new
  s = 1.0 / (1.0 + np.exp(t * (a @ y)))
  return y, (a.T * (s * (1 - s))) @ a / n + np.diag(reg)


def _logistic(c) -> Problem:
  rng = np.random.default_rng(c["seed"])
  n, m, d = c["n_train"], c["n_val"], c["dim"]
  a = _features(rng, n + m, d, c["correlation"])
  truth = 3 * rng.normal(size=d) / np.sqrt(d)
  t = np.where(a @ truth + rng.normal(size=n + m) > 0, 1.0, -1.0)
  data = {"a": a[:n], "t": t[:n], "a_val": a[n:], "t_val": t[n:]}
  x = c["log_reg"] + 0.5 * rng.normal(size=d)

  y, hess = _logistic_newton(data["a"], data["t"], np.exp(x))
  s_val = 1.0 / (1.0 + np.exp(data["t_val"] * (data["a_val"] @ y)))
  grad_upper = -data["a_val"].T @ (data["t_val"] * s_val) / m
  reference = -np.exp(x) * y * np.linalg.solve(hess, grad_upper)

  def lower(x, y, data):
    loss = jnp.mean(jnp.logaddexp(0.0, -data["t"] * (data["a"] @ y)))
    return loss + 0.5 * jnp.sum(jnp.exp(x) * y**2)

  def upper(x, y, data):
    return jnp.mean(jnp.logaddexp(0.0, -data["t_val"] * (data["a_val"] @ y)))

  lipschitz = np.linalg.eigvalsh(data["a"].T @ data["a"])[-1] / (4 * n) + np.exp(x).max()
  return Problem(
    "logistic",
    lower,
    upper,
    _to_jax(data),
    jnp.asarray(x),
    jnp.zeros(d),
    reference,
    float(lipschitz),
  )


def _benchopt_oracle(n, d_inner, d_outer, l_inner, l_outer, l_cross, mu, seed):
  """The full-batch means of benchopt's `gen_matrices` (oracles/quadratic.py)."""
  rng = np.random.RandomState(seed)
  u, *_ = np.linalg.svd(rng.randn(d_inner, 1))
  half = u @ np.diag(np.logspace(np.log10(mu) / 2, np.log10(l_inner) / 2, d_inner)) @ u.T
  samples = rng.randn(n, d_inner) @ half  # rows a_i, H_i = a_i a_i^T
  hess_inner = samples.T @ samples / n
  u, *_ = np.linalg.svd(rng.randn(d_outer, 1))
  spectrum = np.r_[0, np.logspace(np.log10(mu) / 2, np.log10(l_outer) / 2, d_outer - 1)]
  half = u @ np.diag(spectrum) @ u.T
  samples = rng.randn(n, d_outer) @ half
  hess_outer = samples.T @ samples / n
  # benchopt: np.random.randn (the unseeded global generator); see the docstring.
  u, _, vh = np.linalg.svd(np.random.RandomState(seed + 1).randn(d_outer, d_inner))
  k = min(d_outer, d_inner)
  diag = np.zeros((d_outer, d_inner))
  diag[:k, :k] = np.diag(np.logspace(np.log10(mu), np.log10(l_cross), k))
  g = rng.randn(n, d_inner)  # cross_i = U D g_i^T g_i V^T
  cross = u @ diag @ (g.T @ g / n) @ vh.T
  linear_inner = rng.randn(n, d_inner).mean(axis=0)
  linear_outer = rng.randn(n, d_outer).mean(axis=0)
  return {
    "hess_inner": hess_inner,
    "hess_outer": hess_outer,
    "cross": cross,
    "linear_inner": linear_inner,
    "linear_outer": linear_outer,
  }


def _value_hessian_min_eig(inner, outer):
  """benchopt's `get_hessian_min_eigval`: the value function's Hessian."""
  jac = -np.linalg.solve(inner["hess_inner"], inner["cross"].T)
  hess = jac.T @ outer["hess_inner"] @ jac + outer["hess_outer"]
  tmp = outer["cross"] @ jac
  return np.linalg.eigvalsh(hess + 0.5 * (tmp + tmp.T))[0]


def _quadratic_value(z, x, o):
  return (
    0.5 * z @ (o["hess_inner"] @ z)
    + 0.5 * x @ (o["hess_outer"] @ x)
    + x @ (o["cross"] @ z)
    + o["linear_inner"] @ z
    + o["linear_outer"] @ x
  )


def _quadratic(c) -> Problem:
  rng = np.random.RandomState(c["random_state"])
  dims = (c["n_samples"], c["dim_inner"], c["dim_outer"])
  for _ in range(20):
    inner_seed, outer_seed = rng.randint(2**31 - 1, size=2)
    inner = _benchopt_oracle(
      *dims, c["L_inner_inner"], c["L_inner_outer"], c["L_cross_inner"], c["mu"], inner_seed
    )
    outer = _benchopt_oracle(
      *dims, c["L_outer_inner"], c["L_outer_outer"], c["L_cross_outer"], c["mu"], outer_seed
    )
    if _value_hessian_min_eig(inner, outer) >= 1e-12:
      break
  else:
    raise ValueError(
      "could not draw a quadratic instance with a positive definite "
      "value-function Hessian in 20 trials (benchopt's rule)"
    )
  x = np.random.RandomState(c["random_state"] + 1).randn(c["dim_outer"])
  y = np.linalg.solve(inner["hess_inner"], -inner["linear_inner"] - inner["cross"].T @ x)
  grad_y = outer["hess_inner"] @ y + outer["cross"].T @ x + outer["linear_inner"]
  grad_x = outer["hess_outer"] @ x + outer["cross"] @ y + outer["linear_outer"]
  reference = grad_x + inner["cross"] @ -np.linalg.solve(inner["hess_inner"], grad_y)

  lower = lambda x, y, data: _quadratic_value(y, x, data["inner"])
  upper = lambda x, y, data: _quadratic_value(y, x, data["outer"])
  data = _to_jax({"inner": inner, "outer": outer})
  return Problem(
    "quadratic",
    lower,
    upper,
    data,
    jnp.asarray(x),
    jnp.zeros(c["dim_inner"]),
    reference,
    float(np.linalg.eigvalsh(inner["hess_inner"])[-1]),
  )


def _to_jax(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


BUILDERS = {"ridge": _ridge, "logistic": _logistic, "quadratic": _quadratic}


# ------------------------------------------------------------ the two sides


def _settings(cfg):
  """(family, size_name, size) of every point of the sweep."""
  out = []
  if cfg["lbfgs"]["enabled"]:
    out += [("lbfgs", "tol", tol) for tol in cfg["lbfgs"]["tols"]]
  if cfg["gd"]["enabled"]:
    out += [("gd", "K", k) for k in cfg["gd"]["steps"]]
  return out


def _ours(problem, cfg, family, size):
  """hypergradient(x, data) -> (value, grad, lower steps)."""
  kw = dict(
    linear_solver="cg", linear_tol=cfg["linear"]["tol"], linear_max_steps=cfg["linear"]["max_steps"]
  )
  if family == "lbfgs":
    kw.update(
      solver="lbfgs",
      tol=size,
      max_steps=cfg["lbfgs"]["max_steps"],
      memory_size=cfg["lbfgs"]["memory_size"],
    )
  else:  # K fixed steps: a tolerance no iterate reaches
    kw.update(solver="gd", stepsize=1 / problem.lipschitz, tol=1e-300, max_steps=size)

  def run(x, data):
    value, grad, sol = implicit.hypergradient(
      lambda xx, yy: problem.upper(xx, yy, data),
      lambda xx, yy: problem.lower(xx, yy, data),
      x,
      problem.y0,
      return_info=True,
      **kw,
    )
    return value, grad, sol.info.num_steps

  return run


def import_jaxopt():
  """jaxopt, or None when it is not installed (its import warns that it is
  unmaintained; that warning is silenced)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      import jaxopt
    except ImportError:
      return None
  return jaxopt


def _jaxopt(jaxopt, problem, cfg, family, size):
  """jaxopt's counterpart of `_ours`: the same solver family and CG."""
  cg = functools.partial(
    jaxopt.linear_solve.solve_cg, tol=cfg["linear"]["tol"], maxiter=cfg["linear"]["max_steps"]
  )
  fun = lambda y, x, data: problem.lower(x, y, data)
  if family == "lbfgs":
    solver = jaxopt.LBFGS(
      fun=fun,
      tol=size,
      maxiter=cfg["lbfgs"]["max_steps"],
      history_size=cfg["lbfgs"]["memory_size"],
      linesearch=cfg["lbfgs"]["jaxopt_linesearch"],
      implicit_diff_solve=cg,
    )
  else:
    solver = jaxopt.GradientDescent(
      fun=fun,
      stepsize=1 / problem.lipschitz,
      maxiter=size,
      tol=1e-300,
      acceleration=False,
      implicit_diff_solve=cg,
    )

  def phi(x, data):
    sol = solver.run(problem.y0, x, data)
    return problem.upper(x, sol.params, data), sol.state.iter_num

  def run(x, data):
    (value, steps), grad = jax.value_and_grad(phi, has_aux=True)(x, data)
    return value, grad, steps

  return run


# ------------------------------------------------------------------- timing


def _error(grad, reference):
  return float(np.linalg.norm(np.asarray(grad) - reference) / np.linalg.norm(reference))


def _measure_setting(problem, impls, repeats):
  """Compiles and checks each impl, then times them alternately."""
  rows, calls = {}, {}
  for name, fn in impls.items():
    compiled, compile_s = timing.compile_timed(fn, problem.x, problem.data)
    _, grad, steps = compiled(problem.x, problem.data)
    rows[name] = {
      "compile_s": compile_s,
      "metric": _error(grad, problem.reference),
      "lower_steps": int(steps),
    }
    calls[name] = functools.partial(compiled, problem.x, problem.data)
  samples = timing.time_alternating(calls, repeats)
  for name in impls:
    rows[name].update(timing.summarize(samples[name]))
  return rows


def _problem_rows(problem, cfg, ctx, jaxopt):
  rows = []
  for family, size_name, size in _settings(cfg):
    impls = {"bilevel_jax": _ours(problem, cfg, family, size)}
    if jaxopt is not None:
      impls["jaxopt"] = _jaxopt(jaxopt, problem, cfg, family, size)
    measured = _measure_setting(problem, impls, cfg["timing"]["repeats"])
    for impl, m in measured.items():
      rows.append(
        {
          "problem": problem.name,
          "impl": impl,
          "method": family,
          "size_name": size_name,
          "size": size,
          "per": "hypergradient",
          "metric_name": METRIC,
          **m,
        }
      )
    if jaxopt is not None:
      ratio = measured["jaxopt"]["median_s"] / measured["bilevel_jax"]["median_s"]
      rows[-1]["speedup"] = rows[-2]["speedup"] = ratio
    ctx.log(
      "  "
      + f"{problem.name} {family} {size_name}={size}: "
      + ", ".join(
        f"{impl} {1e3 * m['median_s']:.2f} ms err {m['metric']:.1e}" for impl, m in measured.items()
      )
    )
  return rows


def matched_rows(rows, targets):
  """Per problem, family and target error: the fastest setting of each
  implementation whose error is at most the target, and the time ratio."""
  out = []
  keys = dict.fromkeys((r["problem"], r["method"]) for r in rows if r["per"] == "hypergradient")
  for problem, family in keys:
    for target in targets:
      best = {}
      for impl in ("bilevel_jax", "jaxopt"):
        ok = [
          r
          for r in rows
          if (r["problem"], r["method"], r["impl"]) == (problem, family, impl)
          and r["per"] == "hypergradient"
          and r["metric"] <= target
        ]
        if ok:
          best[impl] = min(ok, key=lambda r: r["median_s"])
      if "bilevel_jax" not in best:
        continue
      ours = best["bilevel_jax"]
      row = {
        "problem": problem,
        "impl": "bilevel_jax",
        "method": f"{family} matched",
        "size_name": "target error",
        "size": target,
        "per": "matched_accuracy",
        "median_s": ours["median_s"],
        "q25_s": ours["q25_s"],
        "q75_s": ours["q75_s"],
        "metric_name": METRIC,
        "metric": ours["metric"],
        "setting": f"{ours['size_name']}={ours['size']}",
      }
      if "jaxopt" in best:
        peer = best["jaxopt"]
        row.update(
          peer_median_s=peer["median_s"],
          peer_metric=peer["metric"],
          peer_setting=f"{peer['size_name']}={peer['size']}",
          speedup=peer["median_s"] / ours["median_s"],
        )
      out.append(row)
  return out


def _figures(rows, problems):
  def draw(plt):
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4), squeeze=False)
    for ax, name in zip(axes[0], problems):
      chosen = [r for r in rows if r["problem"] == name and r["per"] == "hypergradient"]
      for impl, family in dict.fromkeys((r["impl"], r["method"]) for r in chosen):
        # In sweep order (more effort: smaller tol, larger K), not by time.
        effort = lambda r: r["size"] if r["size_name"] == "K" else 1 / r["size"]
        pts = [
          (r["median_s"], max(r["metric"], 1e-17))
          for r in sorted(chosen, key=effort)
          if (r["impl"], r["method"]) == (impl, family)
        ]
        ax.plot(
          *zip(*pts),
          marker="o" if impl == "bilevel_jax" else "s",
          linestyle="-" if impl == "bilevel_jax" else "--",
          label=f"{impl} {family}",
        )
      ax.set(
        xscale="log",
        yscale="log",
        xlabel="median time per hypergradient (s)",
        ylabel="relative error of the hypergradient",
        title=name,
      )
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
      if chosen:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

  return {"error_vs_time.png": draw}


# ------------------------------------------------------- the full upper run


def _ours_hypergradient(problem, cfg, tol, linear_tol, variant):
  """``hg(x, y0, v0, data) -> (value, grad, y, v, lower steps, adjoint steps)``."""
  kw = dict(
    solver="lbfgs",
    tol=tol,
    max_steps=cfg["lbfgs"]["max_steps"],
    memory_size=cfg["lbfgs"]["memory_size"],
    linear_tol=linear_tol,
    linear_max_steps=cfg["linear"]["max_steps"],
  )
  if variant == "shine":
    kw["linear_solver"] = "shine"
  if variant.startswith("pcg"):
    kw["preconditioner"] = "lbfgs"
  warm = "_warm" in variant

  def hg(x, y0, v0, data):
    value, grad, sol = implicit.hypergradient(
      lambda xx, yy: problem.upper(xx, yy, data),
      lambda xx, yy: problem.lower(xx, yy, data),
      x,
      y0,
      v0=v0 if warm else None,
      return_info=True,
      **kw,
    )
    return value, grad, sol.y, sol.adjoint, sol.info.num_steps, sol.info.linear_steps

  return hg


def _jaxopt_hypergradient(jaxopt, problem, cfg, tol, linear_tol):
  """jaxopt's natural usage: LBFGS with implicit_diff_solve = CG, the previous
  y* as ``init_params`` (the lower warm start a jaxopt user passes); its CG
  starts from zero (`jaxopt.linear_solve.solve_cg` is called by
  `custom_root` as solve(matvec, b), with no way to pass an initial v)."""
  cg = functools.partial(
    jaxopt.linear_solve.solve_cg, tol=linear_tol, maxiter=cfg["linear"]["max_steps"]
  )
  solver = jaxopt.LBFGS(
    fun=lambda y, x, data: problem.lower(x, y, data),
    tol=tol,
    maxiter=cfg["lbfgs"]["max_steps"],
    history_size=cfg["lbfgs"]["memory_size"],
    linesearch=cfg["lbfgs"]["jaxopt_linesearch"],
    implicit_diff_solve=cg,
  )

  def hg(x, y0, v0, data):
    def phi(xx):
      sol = solver.run(y0, xx, data)
      return problem.upper(xx, sol.params, data), (sol.params, sol.state.iter_num)

    (value, (y, steps)), grad = jax.value_and_grad(phi, has_aux=True)(x)
    return value, grad, y, v0, steps, jnp.array(-1, jnp.int32)

  return hg


def _upper_run(hg, problem, cfg, extrapolate=0):
  """``run(x0, data)``: T Adam steps on x, each from the previous y* (and v),
  or with ``extrapolate`` = p from their extrapolation of degree p
  (`upper_step.extrapolated`, what `upper.make_step(..., extrapolate=p)`
  does), as one `lax.scan`; returns the iterates, their hypergradients,
  lower solutions and step counts. The same loop for every implementation."""
  import optax

  c = cfg["upper_run"]
  optimizer = optax.adam(c["learning_rate"])
  depth = max(extrapolate, 1)

  def run(x0, data):
    def body(carry, t):
      x, opt_state, y0, ys, v0, vs = carry
      _, grad, y, v, lower_steps, linear_steps = hg(x, y0, v0, data)
      updates, opt_state = optimizer.update(grad, opt_state, x)
      y_next = upper_step.extrapolated(y, ys, t, extrapolate)
      v_next = upper_step.extrapolated(v, vs, t, extrapolate)
      ys, vs = (y,) + ys[:-1], (v,) + vs[:-1]
      carry = (x + updates, opt_state, y_next, ys, v_next, vs)
      return carry, (x, grad, y, lower_steps, linear_steps)

    zeros = jnp.zeros_like(problem.y0)
    init = (x0, optimizer.init(x0), problem.y0, (problem.y0,) * depth, zeros, (zeros,) * depth)
    _, out = jax.lax.scan(body, init, jnp.arange(c["steps"]))
    return out

  return run


def _reference_hypergradients(problem, newton_steps):
  """Exact hypergradients along a trajectory: ``newton_steps`` Newton steps
  on f(x_t, .) from the run's own y_t (dense Hessian; one is exact on the
  quadratic problems), then (4) with a dense solve. Also returns the
  reference's ||grad_y f||."""

  def one(args):
    x, y, data = args
    fy = lambda yy: problem.lower(x, yy, data)
    for _ in range(newton_steps):
      y = y - jnp.linalg.solve(jax.hessian(fy)(y), jax.grad(fy)(y))
    gx, gy = jax.grad(problem.upper, argnums=(0, 1))(x, y, data)
    v = jnp.linalg.solve(jax.hessian(fy)(y), gy)
    _, vjp = jax.vjp(lambda xx: jax.grad(problem.lower, argnums=1)(xx, y, data), x)
    return gx - vjp(v)[0], jnp.linalg.norm(jax.grad(fy)(y))

  @jax.jit
  def along(xs, ys, data):
    return jax.lax.map(lambda xy: one((xy[0], xy[1], data)), (xs, ys))

  return along


def upper_run_rows(problem, cfg, ctx, jaxopt):
  """Time per upper step over T steps with warm starts, and the median
  hypergradient error of the steps, for each variant of ours and jaxopt."""
  c = cfg["upper_run"]
  rows = []
  reference = _reference_hypergradients(problem, c["reference_newton_steps"])
  if len(c["tols"]) != len(c["linear_tols"]):
    raise ValueError("[upper_run] `tols` and `linear_tols` must have the same length (pairs).")
  for tol, linear_tol in zip(c["tols"], c["linear_tols"]):
    impls = {
      f"bilevel_jax {v}": _upper_run(
        _ours_hypergradient(problem, cfg, tol, linear_tol, v),
        problem,
        cfg,
        extrapolate=int(v.split("_extrap")[1]) if "_extrap" in v else 0,
      )
      for v in c["variants"]
    }
    if jaxopt is not None:
      for extrapolate in c["jaxopt_extrapolate"]:
        impls[f"jaxopt extrap{extrapolate}" if extrapolate else "jaxopt"] = _upper_run(
          _jaxopt_hypergradient(jaxopt, problem, cfg, tol, linear_tol),
          problem,
          cfg,
          extrapolate=extrapolate,
        )
    measured, calls = {}, {}
    for name, fn in impls.items():
      compiled, compile_s = timing.compile_timed(fn, problem.x, problem.data)
      xs, grads, ys, lower_steps, linear_steps = compiled(problem.x, problem.data)
      exact, ref_grad_norm = reference(xs, ys, problem.data)
      errors = np.linalg.norm(np.asarray(grads - exact), axis=1) / np.linalg.norm(
        np.asarray(exact), axis=1
      )
      measured[name] = {
        "compile_s": compile_s,
        "metric": float(np.median(errors)),
        "max_error": float(np.max(errors)),
        "reference_grad_norm": float(np.max(ref_grad_norm)),
        "lower_steps": float(np.mean(lower_steps)),
        "linear_steps": float(np.mean(linear_steps)) if int(linear_steps[0]) >= 0 else None,
      }
      calls[name] = functools.partial(compiled, problem.x, problem.data)
    samples = timing.time_alternating(calls, c["repeats"])
    for name in impls:
      per_step = [t / c["steps"] for t in samples[name]]
      measured[name].update(timing.summarize(per_step))
    for name, m in measured.items():
      impl, _, variant = name.partition(" ")
      degree = int(variant.split("extrap")[1]) if "extrap" in variant else 0
      # The peer with the same lower start (extrapolated or the previous y*).
      peer = f"jaxopt extrap{degree}" if f"jaxopt extrap{degree}" in measured else "jaxopt"
      row = {
        "problem": problem.name,
        "impl": impl,
        "method": f"upper run {variant or 'cg'}",
        "lower_start": f"extrapolated (degree {degree})" if degree else "previous",
        "size_name": "tol",
        "size": tol,
        "linear_tol": linear_tol,
        "per": "upper_step",
        "metric_name": "median hypergradient relative error over the run",
        "steps": c["steps"],
        **m,
      }
      if jaxopt is not None:
        row["speedup"] = measured[peer]["median_s"] / m["median_s"]
        row["speedup_vs_jaxopt_previous_y"] = measured["jaxopt"]["median_s"] / m["median_s"]
      rows.append(row)
    ctx.log(
      f"  {problem.name} upper run tol={tol} linear_tol={linear_tol}: "
      + ", ".join(
        f"{name} {1e3 * m['median_s']:.2f} ms/step err {m['metric']:.1e} "
        f"lower {m['lower_steps']:.1f} adj {m['linear_steps']}"
        for name, m in measured.items()
      )
    )
    ctx.save_partial(rows)
  return rows


def upper_run_matched(rows, targets):
  """Per problem, variant of ours and target error: the fastest (tol,
  linear_tol) setting of that variant and of jaxopt whose median error over
  the run is at most the target, and jaxopt's time / ours."""
  out = []
  runs = [r for r in rows if r["per"] == "upper_step"]
  keys = dict.fromkeys((r["problem"], r["method"]) for r in runs if r["impl"] == "bilevel_jax")
  best = lambda pool: min(pool, key=lambda r: r["median_s"]) if pool else None
  for problem, method in keys:
    for target in targets:
      ours = best(
        [
          r
          for r in runs
          if (r["problem"], r["method"], r["impl"]) == (problem, method, "bilevel_jax")
          and r["metric"] <= target
        ]
      )
      if ours is None:
        continue
      peers_ok = [
        r
        for r in runs
        if (r["problem"], r["impl"]) == (problem, "jaxopt") and r["metric"] <= target
      ]
      # jaxopt with the same lower start as ours, and with its plain one.
      peer = best([r for r in peers_ok if r["lower_start"] == ours["lower_start"]])
      plain = best([r for r in peers_ok if r["lower_start"] == "previous"])
      row = {
        "problem": problem,
        "impl": "bilevel_jax",
        "method": f"{method} matched",
        "size_name": "target error",
        "size": target,
        "per": "upper_step_matched",
        "median_s": ours["median_s"],
        "q25_s": ours["q25_s"],
        "q75_s": ours["q75_s"],
        "metric_name": ours["metric_name"],
        "metric": ours["metric"],
        "setting": f"tol={ours['size']:g}, linear_tol={ours['linear_tol']:g}",
      }
      if peer is not None:
        row.update(
          peer_median_s=peer["median_s"],
          peer_metric=peer["metric"],
          peer_setting=f"tol={peer['size']:g}, linear_tol={peer['linear_tol']:g}, "
          f"init_params {peer['lower_start']}",
          speedup=peer["median_s"] / ours["median_s"],
        )
      if plain is not None:
        row["speedup_vs_jaxopt_previous_y"] = plain["median_s"] / ours["median_s"]
      out.append(row)
  return out


def run(cfg, ctx) -> runner.SuiteResult:
  notes = []
  jaxopt = import_jaxopt() if ctx.peers else None
  status = peers.in_process_status("jaxopt", jaxopt, enabled=ctx.peers)
  ctx.log(f"jaxopt: {status}")
  notes.append(f"jaxopt: {status}.")
  load_start = os.getloadavg()
  rows = []
  for name in cfg["problems"]["names"]:
    problem = BUILDERS[name](cfg[name])
    ctx.log(
      f"{name}: x in R^{problem.x.size}, y in R^{problem.y0.size}, L = {problem.lipschitz:.3g}"
    )
    rows += _problem_rows(problem, cfg, ctx, jaxopt)
    if cfg["upper_run"]["enabled"]:
      rows += upper_run_rows(problem, cfg, ctx, jaxopt)
  rows += matched_rows(rows, cfg["matched"]["targets"])
  if cfg["upper_run"]["enabled"]:
    rows += upper_run_matched(rows, cfg["upper_run"]["targets"])
  notes.append(
    "metric: |g - g_ref| / |g_ref| against the float64 reference (closed form for ridge "
    "and quadratic, NumPy Newton + dense solve for logistic). lbfgs: ours (backtracking) "
    f"vs jaxopt.LBFGS (linesearch={cfg['lbfgs']['jaxopt_linesearch']!r}), memory "
    f"{cfg['lbfgs']['memory_size']}, stopped at |grad_y f| <= tol; gd: K steps of size "
    "1/L on both sides. Adjoint: CG on "
    f"both sides, relative tolerance {cfg['linear']['tol']:g}, at most "
    f"{cfg['linear']['max_steps']} iterations. Times: median of {cfg['timing']['repeats']} "
    "alternated repeats after a warm-up, per jitted (value, hypergradient) call with the "
    "data as arguments; compile time apart. speedup = jaxopt median / ours. "
    "'matched' rows: per target error, the fastest setting of each side that reaches it."
  )
  if cfg["upper_run"]["enabled"]:
    c = cfg["upper_run"]
    notes.append(
      f"upper run: T = {c['steps']} Adam steps (learning rate {c['learning_rate']:g}) on x from "
      "the suite's x, as one jitted lax.scan per implementation (the same loop on both sides); "
      "each step's lower solve starts from the previous y* on both sides (jaxopt: "
      "`init_params`), or with `extrap<p>` from the extrapolation of degree p of the last "
      "p + 1 solutions (2 y_t - y_{t-1}, 3 y_t - 3 y_{t-1} + y_{t-2}) on both sides (jaxopt's "
      "`init_params` too: the same lower start; 'speedup' compares with the jaxopt run of the "
      "same lower start, speedup_vs_jaxopt_previous_y with jaxopt's plain warm start); "
      "`_warm` variants of ours also start CG from the previous adjoint v (extrapolated "
      "likewise with `_extrap`) "
      "(jaxopt's `custom_root` calls its solve as solve(matvec, b): its CG cannot be warm "
      "started); `pcg` preconditions CG by the L-BFGS memory of the lower solve (SHINE as a "
      "preconditioner: exact, CG still stops at linear_tol); `shine` uses that inverse estimate "
      "alone (an approximation: its error is in the metric column). (tol, linear_tol) pairs: "
      f"{list(zip(c['tols'], c['linear_tols']))}, the same on both sides. Time: median over "
      f"{c['repeats']} alternated repeats of the whole run / T (compile apart). metric: median "
      "over the T steps of |g_t - g*_t| / |g*_t|, with g*_t the exact hypergradient at the "
      f"run's own x_t ({c['reference_newton_steps']} Newton steps on f(x_t, .) from the run's "
      "y_t, dense solve); max_error its maximum, reference_grad_norm the largest "
      "|grad_y f| of the reference (how exact it is). lower_steps / linear_steps: mean "
      "iterations per upper step (jaxopt does not report its CG count). 'upper run ... matched' "
      "rows: per target error, the fastest pair of that variant and of jaxopt whose median "
      "error reaches it. Shared 2-core machine under load from other jobs: times are noisy; "
      "load averages at start and end are in the JSON."
    )
  return runner.SuiteResult(
    title=TITLE,
    columns=COLUMNS + ["setting", "peer_setting"],
    rows=rows,
    notes=notes,
    figures=_figures(rows, cfg["problems"]["names"]),
    extra={
      "peer": {"jaxopt": {"status": status}},
      "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    },
  )
