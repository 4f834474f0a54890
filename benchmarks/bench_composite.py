"""Algorithm 1 on the elastic net (6.1): our JAX implementation against a
NumPy + cvxpy reference of the same algorithm (Solla & Royset 2026).

JAX side: `upper.gradient_sampling` on f(x, Y_{alpha,beta}(x)) with
`composite.solve` (interior point + Newton, custom VJP (3.6)).  Timed two
ways, compile time (``lower().compile()``) apart from run time
(``block_until_ready``): one jitted single-instance call per instance (all
``instances``), and the first ``vmap_instances`` in one
``jax.jit(jax.vmap(...))`` call over the data and the keys.  The vmapped
``while_loop`` runs every lane until the slowest instance stops, so its cost
is (lanes) x (largest iteration count): on this data one instance in 20 needs
343 iterations where the median is ~43, which makes a 20-lane vmapped call
cost several times the loop of single calls; hence the small default.

Reference (the paper's approach, Section 6): plain Python, one instance at a
time.  At every point it solves the regularized lower level (3.1) in the joint
(y, w) form of Section 5.1 with cvxpy,

    min_{y, w} |A y - b|^2 + (e^{l2} + beta)/2 |y|^2 + sum_i max(w1_i, w2_i)
               + |w - G(y)|^2 / (2 alpha),      G(y) = e^{l1} (y, -y),

written with cvxpy Parameters (DPP: canonicalized once per instance), sets
p = (G - w)/alpha, reads the active pieces off w (both pieces of block i
when |w1_i - w2_i| <= tol, else the larger) and computes the hypergradient
(3.6) in NumPy with the x-derivatives written out by hand.  The minimum-norm
element of the sampled hypergradients' hull is a small cvxpy QP.  Same
parameters as the JAX side, and the same samples: the unit directions and
radius factors of the uniform-in-the-ball draws are generated from the same
JAX keys (outside the timed region), so both sides start on the same path.
Only ``ref_instances`` instances run, the first ones of the same stacked data;
on those, the jitted single-instance JAX call and the reference alternate,
instance by instance, and their ratio is per instance.

Errors: lambda_opt is retrained without regularization (JAX: composite.solve
with alpha = beta = 1e-10; reference: the elastic net (6.1) itself in cvxpy),
then mse on the validation and test sets.  Retraining is not timed.

Threads: both sides run in this one process with OMP/MKL/OpenBLAS threads set
to ``--threads`` (default 1) and, for 1 thread, XLA's CPU Eigen pool off
(``--xla_cpu_multi_thread_eigen=false``); Clarabel and OSQP are
single-threaded.  The variables are set before numpy and jax are imported.

Usage: python benchmarks/bench_composite.py [configs/bench/composite.toml]
           [--instances N] [--vmap-instances N] [--ref-instances N] [--threads N]
           [--ref-solver S] [--out PATH]
Writes benchmarks/results/composite_<platform>_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("config", nargs="?",
                      default=os.path.join(REPO, "configs", "bench", "composite.toml"))
  parser.add_argument("--instances", type=int, default=None,
                      help="instances, one jitted JAX call each (config: run.instances)")
  parser.add_argument("--vmap-instances", type=int, default=None,
                      help="instances in the one vmapped call (config: run.vmap_instances)")
  parser.add_argument("--ref-instances", type=int, default=None,
                      help="instances for the cvxpy reference (config: run.ref_instances)")
  parser.add_argument("--threads", type=int, default=1,
                      help="BLAS/OpenMP threads for both sides (XLA Eigen pool off when 1)")
  parser.add_argument("--ref-solver", default=None,
                      help="cvxpy solver of the reference (config: reference.solver)")
  parser.add_argument("--out", default=None, help="JSON path (default: results_path)")
  return parser.parse_args(argv)


def set_threads(threads: int) -> dict:
  for var in THREAD_VARS:
    os.environ[var] = str(threads)
  if threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
  return {var: os.environ[var] for var in THREAD_VARS + ("XLA_FLAGS",)}


if __name__ == "__main__":
  ARGS = parse_args()
  THREAD_ENV = set_threads(ARGS.threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from bilevel_jax import composite, upper  # noqa: E402
from bilevel_jax._src import config  # noqa: E402
from bilevel_jax._src.problems import regression  # noqa: E402

try:
  import cvxpy as cp
except ImportError:  # optional extra: pip install bilevel_jax[peers]
  cp = None

F = config.Field
SCHEMA = {
    "problem": {"seed": F("int", 0), "dim": F("int", 100, config.positive)},
    "algorithm": {"num_samples": F("int", 5, config.positive),
                  "max_iter": F("int", 1000, config.positive),
                  "key_seed": F("int", 1)},
    "run": {"instances": F("int", 20, config.positive),
            "vmap_instances": F("int", 4, config.positive),
            "ref_instances": F("int", 3, config.positive),
            "retrain_reg": F("float", 1e-10, config.positive)},
    "reference": {"solver": F("str", "default",
                              config.one_of("CLARABEL", "OSQP", "SCS", "ECOS", "default")),
                  "active_tol": F("float", 1e-6, config.positive)},
    "check": {"points": F("list[float]", [0.0, 0.0, 1.0, -1.0, 2.0, 1.0], None),
              "alphas": F("list[float]", [1.0, 1e-2, 1e-4], config.positive),
              "rtol": F("float", 1e-4, config.positive)},
}
# Table 1 of the paper (Algorithm 1, 20 instances, laptop i5-11357 @ 2.40 GHz).
PAPER = {"seconds_per_instance": 24.8, "validation_error": 7.59, "test_error": 7.73,
         "machine": "Intel i5-11357 @ 2.40 GHz laptop, 8 GB (Table 1)"}
# Algorithm 1's parameters (Section 6.1), the defaults of upper.gradient_sampling.
GS = {"eps0": 1.0, "eps_opt": 1e-5, "alpha0": 1.0, "alpha_opt": 1e-5, "beta0": 1.0,
      "beta_opt": 1e-5, "eta0": 1.0, "eta_opt": 1e-5, "mu_eps": 0.5, "mu_alpha": 0.5,
      "mu_beta": 0.5, "mu_eta": 0.5, "delta": 1e-4, "gamma": 0.5, "max_backtracks": 30}


def instance(data, i):
  return jax.tree_util.tree_map(lambda leaf: leaf[i], data)


# ------------------------------------------------------------------ JAX side


def hyper_objective(data):
  low = regression.elastic_net_lower(data)

  def fun(x, a, b):
    sol = composite.solve(low.g, low.G, low.h, x, y0=low.y0, alpha=a, beta=b)
    return regression.mse(data.a_val, data.b_val, low.to_model(sol.y))
  return fun


def jax_algorithm1(num_samples, max_iter):
  def one(data, key):
    res = upper.gradient_sampling(hyper_objective(data), jnp.zeros(2, data.a_train.dtype),
                                  key=key, num_samples=num_samples, max_iter=max_iter, **GS)
    info = res.info
    return {"x": res.x, "value": res.value, "iterations": info.iterations,
            "status": info.status, "hits": info.target_hits,
            "linesearch_failures": info.linesearch_failures, "alpha": info.alpha,
            "eps": info.eps}
  return one


def jax_retrain(reg):
  """Validation and test mse of the elastic net retrained at lambda."""
  def one(data, lam):
    low = regression.elastic_net_lower(data)
    sol = composite.solve(low.g, low.G, low.h, lam, y0=low.y0, alpha=reg, beta=reg)
    y = low.to_model(sol.y)
    return (regression.mse(data.a_val, data.b_val, y), regression.mse(data.a_test, data.b_test, y),
            sol.info.status)
  return one


def sample_noise(key, num_samples, max_iter, n=2):
  """The unit directions and radius factors u^(1/n) that `gradient_sampling`
  draws at each iteration from the same key (its `_sample_ball`)."""
  def step(key, _):
    key, sample_key = jax.random.split(key)
    k1, k2 = jax.random.split(sample_key)
    direction = jax.random.normal(k1, (num_samples, n), jnp.float64)
    direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
    factor = jax.random.uniform(k2, (num_samples, 1), jnp.float64) ** (1.0 / n)
    return key, (direction, factor)
  _, (dirs, factors) = jax.lax.scan(step, key, None, length=max_iter)
  return np.asarray(dirs), np.asarray(factors)


# ------------------------------------------------------- reference (cvxpy)


class CvxpyElasticNet:
  """The regularized lower level (3.1) of (6.1) in the joint (y, w) form,
  solved by cvxpy, and the hypergradient (3.6) in NumPy."""

  def __init__(self, data, solver, active_tol):
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
    objective = (cp.sum_squares(self.a @ self.y - self.b) + self.ridge * cp.sum_squares(self.y)
                 + cp.sum(cp.maximum(self.w[:d], self.w[d:]))
                 + cp.sum_squares(self.s * self.w - self.t * cp.hstack([self.y, -self.y])))
    self.problem = cp.Problem(cp.Minimize(objective))
    self.solves = self.unpolished = 0
    self.solver_name = None

  def lower(self, x, alpha, beta):
    """(y, w, p) of (3.1) at x = (l1, l2)."""
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
    c_y = 2 * self.a_val.T @ r / self.b_val.size                       # grad_y f
    # Active pieces per block: both when w1_i = w2_i (to tol), else the larger.
    both = np.abs(w[:d] - w[d:]) <= self.active_tol * (1 + np.max(np.abs(w)))
    # P: projector onto span{e_1i - e_2i : both pieces of block i active}.
    proj = np.zeros((2 * d, 2 * d))
    idx = np.nonzero(both)[0]
    proj[idx, idx] = proj[d + idx, d + idx] = 0.5
    proj[idx, d + idx] = proj[d + idx, idx] = -0.5
    jac = e1 * np.vstack([np.eye(d), -np.eye(d)])                        # grad_y G
    hess = self.ata2 + (e2 + beta) * np.eye(d)                           # hess_yy L
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
    y = cp.Variable(self.d)
    cp.Problem(cp.Minimize(cp.sum_squares(self.a @ y - self.b) + np.exp(lam[0]) * cp.norm1(y)
                           + 0.5 * np.exp(lam[1]) * cp.sum_squares(y))).solve(solver=self.solver)
    mse = lambda a, b: float(np.mean((a @ y.value - b) ** 2))
    return mse(self.a_val, self.b_val), mse(self.a_test, self.b_test)


class MinNorm:
  """min |W^T lam| over the simplex, a cvxpy QP (DPP in W)."""

  def __init__(self, num, n, solver):
    self.points = cp.Parameter((num, n))
    self.lam = cp.Variable(num)
    self.problem = cp.Problem(cp.Minimize(cp.sum_squares(self.points.T @ self.lam)),
                              [self.lam >= 0, cp.sum(self.lam) == 1])
    self.solver = solver

  def __call__(self, grads):
    self.points.value = grads
    self.problem.solve(solver=self.solver)
    lam = np.clip(self.lam.value, 0, None)
    return grads.T @ (lam / lam.sum())


def reference_algorithm1(lower, dirs, factors, num_samples, max_iter, solver):
  """Algorithm 1 in plain Python, the parameters of GS, the samples of JAX.

  f(x) at the current (x, alpha, beta) is reused from the accepted line-search
  trial when neither x nor the regularization changed since (the JAX loop
  recomputes it); the line search is skipped on target hits.
  """
  hull = MinNorm(num_samples, 2, None if solver == "default" else solver)
  x = np.zeros(2)
  eps, alpha, beta, eta = GS["eps0"], GS["alpha0"], GS["beta0"], GS["eta0"]
  fx = None
  hits = failures = 0
  status = "max_iter"
  k = 0
  for k in range(max_iter):
    points = x[None, :] + (eps * factors[k]) * dirs[k]
    grads = np.array([lower.value_and_grad(pt, alpha, beta)[1] for pt in points])
    if not np.all(np.isfinite(grads)):
      status = "nonfinite"
      break
    w = hull(grads)
    norm_w = float(np.linalg.norm(w))
    if (norm_w <= GS["eta_opt"] and eps <= GS["eps_opt"] and alpha <= GS["alpha_opt"]
        and beta <= GS["beta_opt"]):
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
  iterations = k + 1
  return {"x": x, "iterations": iterations, "status": status, "hits": hits,
          "linesearch_failures": failures, "alpha": alpha, "eps": eps, "solves": lower.solves,
          "solves_not_polished": lower.unpolished, "solver_name": lower.solver_name}


# ------------------------------------------------------------------- checks


def check_hypergradients(data, cfg):
  """Reference (3.6) in NumPy against jax.grad through composite.solve."""
  fun = hyper_objective(data)
  grad = jax.jit(jax.value_and_grad(fun))
  lower = CvxpyElasticNet(data, cfg["reference"]["solver"], cfg["reference"]["active_tol"])
  pts = np.asarray(cfg["check"]["points"], np.float64).reshape(-1, 2)
  rows = []
  for x in pts:
    for a in cfg["check"]["alphas"]:
      v_jax, g_jax = grad(jnp.asarray(x), a, a)
      v_ref, g_ref = lower.value_and_grad(x, a, a)
      g_jax = np.asarray(g_jax)
      rel = float(np.linalg.norm(g_ref - g_jax) / max(np.linalg.norm(g_jax), 1e-12))
      rows.append({"x": x.tolist(), "alpha": a, "beta": a, "grad_jax": g_jax.tolist(),
                   "grad_ref": g_ref.tolist(), "value_jax": float(v_jax),
                   "value_ref": float(v_ref), "rel_err": rel})
      print(f"  x=({x[0]:+.2f},{x[1]:+.2f}) alpha=beta={a:.0e}: grad jax "
            f"({g_jax[0]:+.6e},{g_jax[1]:+.6e}) ref ({g_ref[0]:+.6e},{g_ref[1]:+.6e}) "
            f"rel err {rel:.1e}", flush=True)
  return rows


def to_py(tree):
  return jax.tree_util.tree_map(lambda v: np.asarray(v).tolist(), tree)


def main(args):
  with open(args.config, "rb") as handle:
    raw = config.tomllib.load(handle)
  raw.pop("description", None)
  cfg = config.validate(raw, SCHEMA, args.config)
  run = cfg["run"]
  for key in ("instances", "vmap_instances", "ref_instances"):
    if getattr(args, key) is not None:
      run[key] = getattr(args, key)
  if args.ref_solver is not None:
    cfg["reference"]["solver"] = args.ref_solver
  count = run["instances"]
  n_vmap, n_ref = min(run["vmap_instances"], count), min(run["ref_instances"], count)
  alg = cfg["algorithm"]
  num_samples, max_iter = alg["num_samples"], alg["max_iter"]
  if cp is None:
    print("cvxpy is not installed (pip install 'bilevel_jax[peers]'): JAX side only.")
    n_ref = 0

  data = regression.make_instances(cfg["problem"]["seed"], count, dim=cfg["problem"]["dim"])
  keys = jax.random.split(jax.random.PRNGKey(alg["key_seed"]), count)
  out = {"machine": _common.machine(), "config": cfg, "threads": THREAD_ENV,
         "load_average_start": os.getloadavg(),
         "cvxpy": getattr(cp, "__version__", None), "paper": PAPER, "parameters": GS,
         "problem": "elastic net (6.1), formulation 1 (h = sum max(z1, z2))"}
  print(f"machine: {out['machine']['processor']}, {out['machine']['cpu_count']} cpus, "
        f"jax {jax.__version__}, cvxpy {out['cvxpy']}, threads {args.threads}", flush=True)

  # 1. Hypergradient agreement (instance 0).
  if n_ref:
    print("hypergradient check (reference (3.6) in NumPy vs jax.grad):", flush=True)
    rows = check_hypergradients(instance(data, 0), cfg)
    worst = max(r["rel_err"] for r in rows)
    out["hypergradient_check"] = {"rows": rows, "max_rel_err": worst,
                                  "rtol": cfg["check"]["rtol"],
                                  "passed": bool(worst <= cfg["check"]["rtol"])}
    print(f"  max relative error {worst:.1e} "
          f"({'<=' if worst <= cfg['check']['rtol'] else '>'} {cfg['check']['rtol']:.0e})",
          flush=True)

  # 2. JAX, one jitted single-instance call per instance; on the first n_ref
  #    instances the reference runs right after it (alternating).
  one = jax_algorithm1(num_samples, max_iter)
  single, single_compile_s = _common.compile_fn(one, instance(data, 0), keys[0])
  print(f"JAX single instance: compiled in {single_compile_s:.1f} s", flush=True)
  retrain = jax.jit(jax_retrain(run["retrain_reg"]))
  jax_rows, ref_rows = [], []
  solver = cfg["reference"]["solver"]
  for i in range(count):
    di = instance(data, i)
    tic = time.perf_counter()
    res = jax.block_until_ready(single(di, keys[i]))
    t_jax = time.perf_counter() - tic
    val, test, status = retrain(di, res["x"])
    res = to_py(res)
    row = {"instance": i, "seconds": t_jax, "lambda": res.pop("x"), **res,
           "validation_error": float(val), "test_error": float(test),
           "retrain_status": int(status)}
    jax_rows.append(row)
    line = (f"instance {i:2d}: JAX {t_jax:6.2f} s ({row['iterations']} it), lambda "
            f"({row['lambda'][0]:+.3f},{row['lambda'][1]:+.3f}), val {float(val):.3f}, "
            f"test {float(test):.3f}")
    if i < n_ref:
      dirs, factors = sample_noise(keys[i], num_samples, max_iter)
      tic = time.perf_counter()
      lower = CvxpyElasticNet(di, solver, cfg["reference"]["active_tol"])
      ref = reference_algorithm1(lower, dirs, factors, num_samples, max_iter, solver)
      t_ref = time.perf_counter() - tic
      lam = ref.pop("x")
      r_val, r_test = lower.retrain(lam)
      j_val, j_test, _ = retrain(di, jnp.asarray(lam))
      ref.update({"instance": i, "seconds": t_ref, "lambda": lam.tolist(),
                  "lambda_max_abs_diff_vs_jax": float(np.max(np.abs(lam - row["lambda"]))),
                  "validation_error": r_val, "test_error": r_test,
                  "validation_error_jax_retrain": float(j_val),
                  "test_error_jax_retrain": float(j_test), "ratio_ref_over_jax": t_ref / t_jax})
      ref_rows.append(ref)
      line += (f" | reference {t_ref:6.2f} s ({ref['iterations']} it, {ref['solves']} solves, "
               f"{ref['status']}), lambda ({lam[0]:+.3f},{lam[1]:+.3f}), val {r_val:.3f}, "
               f"test {r_test:.3f} | ratio ref/JAX {t_ref / t_jax:.2f}x")
    print(line, flush=True)
  jax_s = [r["seconds"] for r in jax_rows]
  out["jax"] = {"instances": count, "compile_s": single_compile_s,
                "seconds_per_instance_mean": float(np.mean(jax_s)),
                "seconds_per_instance_median": float(np.median(jax_s)),
                "mean_validation_error": float(np.mean([r["validation_error"] for r in jax_rows])),
                "mean_test_error": float(np.mean([r["test_error"] for r in jax_rows])),
                "mean_iterations": float(np.mean([r["iterations"] for r in jax_rows])),
                "max_iterations": int(max(r["iterations"] for r in jax_rows)),
                "rows": jax_rows}
  print(f"JAX over {count} instances: {np.mean(jax_s):.2f} s/instance (mean), "
        f"{np.median(jax_s):.2f} s (median); val {out['jax']['mean_validation_error']:.3f}, "
        f"test {out['jax']['mean_test_error']:.3f}, iterations mean "
        f"{out['jax']['mean_iterations']:.1f}, max {out['jax']['max_iterations']}", flush=True)

  # 3. JAX, the first n_vmap instances in one jax.jit(jax.vmap(...)) call.  The
  #    batched while_loop runs until its slowest lane stops.
  if n_vmap:
    sub = jax.tree_util.tree_map(lambda leaf: leaf[:n_vmap], data)
    batched, compile_s = _common.compile_fn(jax.vmap(one), sub, keys[:n_vmap])
    tic = time.perf_counter()
    res = jax.block_until_ready(batched(sub, keys[:n_vmap]))
    total = time.perf_counter() - tic
    loop_s = float(np.sum(jax_s[:n_vmap]))
    out["jax_vmapped"] = {"instances": n_vmap, "compile_s": compile_s, "run_s": total,
                          "seconds_per_instance": total / n_vmap,
                          "iterations": np.asarray(res["iterations"]).tolist(),
                          "same_lambda_as_single": bool(np.allclose(
                              np.asarray(res["x"]), [r["lambda"] for r in jax_rows[:n_vmap]])),
                          "loop_of_single_calls_s": loop_s,
                          "ratio_vmapped_over_loop": total / loop_s}
    print(f"JAX vmapped over {n_vmap} instances: compiled in {compile_s:.1f} s, ran in "
          f"{total:.1f} s = {total / n_vmap:.2f} s/instance (loop of single calls on the same "
          f"instances: {loop_s:.1f} s; slowest lane {max(out['jax_vmapped']['iterations'])} "
          f"iterations)", flush=True)

  if n_ref:
    out["reference"] = {"instances": n_ref, "solver": solver, "rows": ref_rows}
    ref_s = [r["seconds"] for r in ref_rows]
    ratios = [r["ratio_ref_over_jax"] for r in ref_rows]
    ref_val = [r["validation_error"] for r in ref_rows]
    jax_val = [r["validation_error"] for r in jax_rows[:n_ref]]
    summary = {
        "reference_seconds_per_instance_median": float(np.median(ref_s)),
        "jax_seconds_per_instance_median_same_instances": float(np.median(jax_s[:n_ref])),
        "jax_seconds_per_instance_median_all": float(np.median(jax_s)),
        "ratio_ref_over_jax_per_instance": ratios,
        "ratio_ref_over_jax_median": float(np.median(ratios)),
        "reference_mean_validation_error": float(np.mean(ref_val)),
        "reference_mean_test_error": float(np.mean([r["test_error"] for r in ref_rows])),
        "jax_mean_validation_error_same_instances": float(np.mean(jax_val)),
        "jax_mean_test_error_same_instances": float(np.mean(
            [r["test_error"] for r in jax_rows[:n_ref]])),
        "paper_seconds_per_instance": PAPER["seconds_per_instance"],
        "ratio_paper_over_jax_median": PAPER["seconds_per_instance"] / float(np.median(jax_s)),
    }
    # "equal" validation error: within 1% of the reference's, same instances.
    summary["target_100x_met"] = bool(summary["ratio_ref_over_jax_median"] >= 100
                                      and np.mean(jax_val) <= 1.01 * np.mean(ref_val))
    out["summary"] = summary
    print(f"medians: reference {summary['reference_seconds_per_instance_median']:.2f} "
          f"s/instance, JAX {summary['jax_seconds_per_instance_median_same_instances']:.2f} s "
          f"(same instances), {np.median(jax_s):.2f} s (all {count}); paper: "
          f"{PAPER['seconds_per_instance']} s on a laptop i5", flush=True)
    print(f"ratio reference/JAX: median {summary['ratio_ref_over_jax_median']:.2f}x; validation "
          f"error reference {np.mean(ref_val):.3f} vs JAX {np.mean(jax_val):.3f}; 100x target "
          f"{'met' if summary['target_100x_met'] else 'NOT met'}", flush=True)

  out["load_average_end"] = os.getloadavg()
  target = args.out or _common.results_path("composite")
  _common.report.write_json(target, out)
  print(f"wrote {target}")


if __name__ == "__main__":
  main(ARGS)
