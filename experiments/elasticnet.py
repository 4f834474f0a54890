"""Elastic-net hyperparameter tuning, Section 6.1 / Table 1 of Solla & Royset.

Algorithm 1 on (6.1) ("1"), on the reformulation (6.2) ("1R"), stopped at
the first |w| <= eta ("1E", swept over eta^0, which the paper does not
give), and with a fixed sampling radius ("1F", mu_eps = 1, Theorem 5.7; not
run in the paper).  Every method runs warm-started (lower solves start from
the previous solution) on each instance in turn through one compiled
program per method, so that each instance's time is measured on its own
(mean, standard error and median over instances).  Reported errors are
those of the model retrained at lambda_opt (alpha = beta = `retrain_reg`),
as in the paper.  Reference: a grid search over lambda in [-5, 5]^2 (21 x 21
points).  The diagnostics explain Algorithm 1R's iteration count: target
hits, null steps (line-search failures), accepted step lengths, lower solves
per iteration and per-solve cost, and the lower bound on the condition
number of the Hessian of the regularized lower objective (the Newton matrix)
at lambda_opt for alpha = beta in `condition_regs`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from bilevel_jax._src import gradient_sampling as gs
from bilevel_jax._src.composite import polyhedral as poly
from bilevel_jax._src.composite import solver
from experiments import common
from experiments import composite_common as cc
from bilevel_jax._src.problems import regression

F = config.Field
X64 = True  # the CLI runs this experiment in float64 (alpha, beta reach 1e-6)
METHODS = ("1", "1R", "1E", "1F")
# Solla & Royset, Table 1: (time s, validation error, test error) over 20
# instances; the paper reports no iteration counts and does not run 1F.
PAPER_TABLE1 = {"1": (24.8, 7.59, 7.73), "1R": (28.2, 7.32, 7.65), "1E": (5.2, 7.88, 8.07)}
NAMES = {
  "1": "Algorithm 1",
  "1R": "Algorithm 1R (6.2)",
  "1E": "Algorithm 1E",
  "1F": "Algorithm 1, fixed radius (Thm 5.7)",
}

SCHEMA = {
  "problem": cc.problem_schema(dim=100),
  "algorithm": {
    "methods": F("list[str]", list(METHODS), config.one_of(*METHODS)),
    "num_samples": F("int", 5, config.positive, "N_sam"),
    "max_steps": F("int", 1000, config.positive),
    "eps0": F("float", 1.0, config.positive),
    "eps_opt": F("float", 1e-5, config.positive),
    "reg0": F("float", 1.0, config.positive, "alpha0 = beta0"),
    "reg_opt": F("float", 1e-5, config.positive, "alpha_opt = beta_opt"),
    "eta0": F("float", 1.0, config.positive, "not given in the paper (1, 1R, 1F)"),
    "eta0_grid": F(
      "list[float]",
      [],
      config.positive,
      "1E: the eta0 values swept (empty: eta0 alone); the Table 1 row takes the one "
      "whose mean-time ratio 1E / Algorithm 1 is nearest the paper's 5.2 / 24.8",
    ),
    "eta_opt": F("float", 1e-5, config.positive, "not given in the paper"),
    "fixed_eps": F(
      "float",
      0.1,
      config.positive,
      "1F: eps0 = eps_opt = fixed_eps and mu_eps = 1 (Theorem 5.7; the paper gives no value)",
    ),
    "mu": F("float", 0.5, config.unit_interval, "all four reduction factors"),
    "gamma": F("float", 0.5, config.unit_interval),
    "delta": F("float", 1e-4, config.unit_interval),
    "x0": F("list[float]", [0.0, 0.0], doc="starting (lambda_1, lambda_2)"),
    **cc.warm_start_schema(),
    "max_backtracks": F("int", 30, config.positive, "Armijo trials before a null step"),
  },
  "reference": {
    "grid_points": F("int", 21, config.positive, "per axis; 0 skips the grid"),
    "grid_low": F("float", -5.0),
    "grid_high": F("float", 5.0),
    "retrain_reg": F("float", 1e-8, config.positive),
    "condition_regs": F(
      "list[float]",
      [1e-1, 1e-3, 1e-5],
      config.positive,
      "alpha = beta at which the lower Newton matrix's condition bound is read "
      "(at Algorithm 1's lambda_opt, for (6.1) and (6.2))",
    ),
  },
}


def algorithm1(
  data,
  key,
  *,
  reformulated: bool = False,
  warm_start: bool = True,
  x0=(0.0, 0.0),
  batching: str = "map",
  **kwargs,
) -> gs.GradientSamplingSolution:
  """Algorithm 1 on one instance of (6.1) (or (6.2) with ``reformulated``):
  `gradient_sampling` on the validation error of Y_{alpha,beta}(lambda),
  lower-level solves warm-started from the previous solution by default
  (`composite_common.hyper_objective`), the sampled hypergradients one
  after another (``batching="map"``: on a CPU a vmapped batch runs every lane
  through the slowest lane's interior-point fallback); ``kwargs`` go to
  `gradient_sampling` (num_samples, max_steps, eps0, ...)."""
  low = regression.elastic_net_lower(data, reformulated)
  x0 = jnp.asarray(x0, data.a_train.dtype)
  fun, state0 = cc.hyper_objective(
    low, lambda coef: regression.mse(data.a_val, data.b_val, coef), warm_start
  )
  return gs.gradient_sampling(fun, x0, key=key, state0=state0, batching=batching, **kwargs)


def _one_run(data, key, eta0, method, a):
  """One instance of ``method``; eta0 is traced (one compile for a sweep)."""
  fixed = method == "1F"
  return algorithm1(
    data,
    key,
    reformulated=method == "1R",
    warm_start=a["warm_start"],
    x0=a["x0"],
    batching=a["sample_batching"],
    num_samples=a["num_samples"],
    eps0=a["fixed_eps"] if fixed else a["eps0"],
    eps_opt=a["fixed_eps"] if fixed else a["eps_opt"],
    alpha0=a["reg0"],
    alpha_opt=a["reg_opt"],
    beta0=a["reg0"],
    beta_opt=a["reg_opt"],
    eta0=eta0,
    eta_opt=a["eta_opt"],
    mu_eps=1.0 if fixed else a["mu"],
    mu_alpha=a["mu"],
    mu_beta=a["mu"],
    mu_eta=a["mu"],
    delta=a["delta"],
    gamma=a["gamma"],
    max_steps=a["max_steps"],
    max_backtracks=a["max_backtracks"],
    early_stop=method == "1E",
  )


def _instance(data, i):
  return jax.tree_util.tree_map(lambda leaf: leaf[i], data)


def compile_one(fn, data, keys, *args):
  """fn(data_i, key_i, *args) compiled for one instance: (executable,
  compile seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(_instance(data, 0), keys[0], *args).compile()
  return compiled, time.perf_counter() - start


def per_instance(compiled, data, keys, *args):
  """The compiled program on each instance in turn: (outputs stacked over
  instances as NumPy arrays, per-instance run seconds)."""
  outs, times = [], []
  for i in range(keys.shape[0]):
    d = jax.block_until_ready(_instance(data, i))
    start = time.perf_counter()
    outs.append(jax.block_until_ready(compiled(d, keys[i], *args)))
    times.append(time.perf_counter() - start)
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *outs)
  return stacked, np.asarray(times)


def diagnostics(info, num_samples: int, gamma: float, max_backtracks: int) -> dict:
  """Per-instance counts from Algorithm 1's info and history (lists over
  instances): iterations, target hits, null steps (line-search failures),
  accepted moves, accepted step lengths, lower solves.

  Lower solves per iteration: N_sam samples (each with its gradient), the
  Armijo trials (1 + log_{1/gamma}(1/t) for an accepted step t,
  max_backtracks for a null step, none at a target hit) and f at the next
  iterate (one per iteration, warm from the accepted trial's solution)."""
  steps = np.asarray(info.num_steps)
  hist = np.asarray(info.history.step)
  out = {k: [] for k in ("iterations", "hits", "null_steps", "moves", "median_step")}
  out.update({k: [] for k in ("small_steps", "trials", "solves")})
  bins = {
    "iters_alpha_above_1e-2": 1e-2,
    "iters_alpha_1e-4_to_1e-2": 1e-4,
    "iters_alpha_below_1e-4": 0,
  }
  out.update({k: [] for k in bins})
  alphas = np.asarray(info.history.alpha)
  for i, k in enumerate(steps):
    t = hist[i, :k]
    a = alphas[i, :k]
    out["iters_alpha_above_1e-2"].append(int(np.sum(a > 1e-2)))
    out["iters_alpha_1e-4_to_1e-2"].append(int(np.sum((a > 1e-4) & (a <= 1e-2))))
    out["iters_alpha_below_1e-4"].append(int(np.sum(a <= 1e-4)))
    moved = t[t > 0]
    hits = int(np.asarray(info.target_hits)[i])
    nulls = int(np.asarray(info.linesearch_failures)[i])
    trials = float(np.sum(1 + np.round(np.log(moved) / np.log(gamma)))) + nulls * max_backtracks
    out["iterations"].append(int(k))
    out["hits"].append(hits)
    out["null_steps"].append(nulls)
    out["moves"].append(int(moved.size))
    out["median_step"].append(float(np.median(moved)) if moved.size else float("nan"))
    out["small_steps"].append(int(np.sum(moved < 1e-3)))
    out["trials"].append(trials)
    out["solves"].append(float(k * (num_samples + 1) + trials))
  return out


def condition_numbers(data, lam, regs) -> dict:
  """The condition number of the Hessian of the regularized lower objective
  phi(y) = g + e_alpha h(G) + beta/2 |y|^2 at Y_{alpha,beta}(lam) (the
  Newton matrix of (3.1); dense eigenvalues of the forward-mode Jacobian of
  grad phi), for (6.1) and (6.2) and alpha = beta in regs: per formulation
  and reg, the median over instances of lam (one row per instance) of
  (condition number, smallest eigenvalue, largest eigenvalue)."""

  def one(d, x, reg, reformulated):
    low = regression.elastic_net_lower(d, reformulated)
    sol = solver.solve(low.g, low.G, low.h, x, low.y0, alpha=reg, beta=reg)

    def grad_phi(y):
      z = low.G(x, y)
      _, states = poly.prox(low.h, z, reg)
      p = poly.multiplier(low.h, states, z)
      return jax.grad(low.g, 1)(x, y) + reg * y + jax.vjp(lambda v: low.G(x, v), y)[1](p)[0]

    hess = jax.jacfwd(grad_phi)(sol.y)
    ev = jnp.linalg.eigvalsh(0.5 * (hess + hess.T))
    return jnp.stack([ev[-1] / ev[0], ev[0], ev[-1]])

  out = {}
  for name, reform in (("1", False), ("1R", True)):
    fn = jax.jit(jax.vmap(lambda d, x, r, reform=reform: one(d, x, r, reform), (0, 0, None)))
    out[name] = [
      np.median(np.asarray(fn(data, jnp.asarray(lam), jnp.asarray(reg))), axis=0).tolist()
      for reg in regs
    ]
  return out


def _cell(s: dict, fmt: str) -> str:
  """'mean ± se' of a spread dict."""
  return f"{s['mean']:{fmt}} ± {s['se']:{fmt}}"


def _row(method, times, val, test, sol_info, paper, extra=None) -> dict:
  iters = cc.spread(sol_info.num_steps)
  stopped = int(np.sum(np.asarray(cc.met_stopping_rule(jnp.asarray(sol_info.status)))))
  row = {
    "method": method,
    "time_s": _cell(cc.spread(times), ".3f"),
    "time_median_s": float(np.median(times)),
    "val_error": _cell(cc.spread(val), ".2f"),
    "test_error": _cell(cc.spread(test), ".2f"),
    "iterations": _cell(iters, ".1f"),
    "iterations_median": iters["median"],
    "stopped": f"{stopped} of {len(times)}",
    "paper_time_s": paper[0] if paper else float("nan"),
    "paper_val": paper[1] if paper else float("nan"),
    "paper_test": paper[2] if paper else float("nan"),
  }
  row.update(extra or {})
  return row


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  p, a, ref = cfg["problem"], cfg["algorithm"], cfg["reference"]
  data = regression.make_instances(
    p["seed"],
    p["instances"],
    dim=p["dim"],
    n_train=p["n_train"],
    n_val=p["n_val"],
    n_test=p["n_test"],
  )
  keys = jax.random.split(jax.random.PRNGKey(p["seed"] + 1), p["instances"])
  count = p["instances"]
  dtype = data.a_train.dtype
  retrain = jax.jit(
    jax.vmap(lambda d, x: cc.retrain(d, regression.elastic_net_lower, x, ref["retrain_reg"]))
  )
  per_method, histories = {}, {}

  def record(method, eta0, compiled, compile_s):
    sol, times = per_instance(compiled, data, keys, jnp.asarray(eta0, dtype))
    val, test, status = (np.asarray(v) for v in retrain(data, jnp.asarray(sol.x)))
    diag = diagnostics(sol.info, a["num_samples"], a["gamma"], a["max_backtracks"])
    return {
      "sol": sol,
      "times": times,
      "val": val,
      "test": test,
      "retrain_status": status,
      "compile_s": compile_s,
      "diag": diag,
      "eta0": eta0,
    }

  sweep = []
  for method in a["methods"]:
    grid = a["eta0_grid"] if method == "1E" and a["eta0_grid"] else [a["eta0"]]
    fn = lambda d, k, e, method=method: _one_run(d, k, e, method, a)
    compiled, compile_s = compile_one(fn, data, keys, jnp.asarray(grid[0], dtype))
    for eta0 in grid:
      common.progress(f"[elasticnet] {NAMES[method]} (eta0 = {eta0:g}): {count} instances", quiet)
      out = record(method, eta0, compiled, compile_s)
      if method == "1E":
        sweep.append(out)
      else:
        per_method[method] = out
  paper_ratio = PAPER_TABLE1["1E"][0] / PAPER_TABLE1["1"][0]
  sweep_rows = []
  if sweep:
    for out in sweep:
      ratio = (
        cc.ratio_of_means(out["times"], per_method["1"]["times"]) if "1" in per_method else None
      )
      sweep_rows.append(
        {
          "eta0": out["eta0"],
          "time_s": _cell(cc.spread(out["times"]), ".4f"),
          "ratio_to_alg1": f"{ratio['ratio']:.3f} ± {ratio['se']:.3f}" if ratio else "",
          "ratio": ratio["ratio"] if ratio else float("nan"),
          "ratio_se": ratio["se"] if ratio else float("nan"),
          "val_error": _cell(cc.spread(out["val"]), ".2f"),
          "test_error": _cell(cc.spread(out["test"]), ".2f"),
          "iterations": _cell(cc.spread(out["sol"].info.num_steps), ".2f"),
        }
      )
    pick = (
      int(np.argmin([abs(r["ratio"] - paper_ratio) for r in sweep_rows]))
      if ("1" in per_method)
      else 0
    )
    per_method["1E"] = sweep[pick]
    for i, r in enumerate(sweep_rows):
      r["chosen"] = "yes" if i == pick else ""
  rows = []
  for method in a["methods"]:
    out = per_method[method]
    extra = {"eta0": out["eta0"], "compile_s": out["compile_s"]}
    rows.append(
      _row(
        NAMES[method],
        out["times"],
        out["val"],
        out["test"],
        out["sol"].info,
        PAPER_TABLE1.get(method),
        extra,
      )
    )
    info = out["sol"].info
    histories[method] = {
      "lambda": np.asarray(out["sol"].x).tolist(),
      "time_s": out["times"].tolist(),
      "val_error": out["val"].tolist(),
      "test_error": out["test"].tolist(),
      "iterations": np.asarray(info.num_steps).tolist(),
      "stationarity": np.asarray(info.stationarity).tolist(),
      "final_eps": np.asarray(info.eps).tolist(),
      "status": np.asarray(info.status).tolist(),
      "inner_status": np.asarray(info.inner_status).tolist(),
      "inner_failures": np.asarray(info.inner_failures).tolist(),
      "retrain_status": np.asarray(out["retrain_status"]).tolist(),
      **out["diag"],
    }
  grid_out = None
  if ref["grid_points"]:
    common.progress(f"[elasticnet] grid search {ref['grid_points']}^2", quiet)
    axis = jnp.linspace(ref["grid_low"], ref["grid_high"], ref["grid_points"])
    grid = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2).astype(dtype)

    def search(d, _key):
      val, test, _ = jax.lax.map(
        lambda x: cc.retrain(d, regression.elastic_net_lower, x, ref["retrain_reg"]), grid
      )
      best = jnp.argmin(val)
      return val[best], test[best], grid[best]

    compiled, compile_s = compile_one(search, data, keys)
    (val, test, best), times = per_instance(compiled, data, keys)
    grid_out = {"times": times, "val": val, "test": test}

    class _GridInfo:  # the row's iteration column: the grid's points
      num_steps = np.full(count, grid.shape[0])
      status = np.zeros(count, np.int32)

    rows.append(
      _row(
        f"grid search {ref['grid_points']}x{ref['grid_points']}",
        times,
        val,
        test,
        _GridInfo,
        None,
        {"eta0": float("nan"), "compile_s": compile_s},
      )
    )
    histories["grid"] = {
      "lambda": np.asarray(best).tolist(),
      "time_s": times.tolist(),
      "val_error": np.asarray(val).tolist(),
      "test_error": np.asarray(test).tolist(),
    }
  summary = _summary(per_method, grid_out, a, paper_ratio)
  if "1" in per_method and ref["condition_regs"]:
    common.progress("[elasticnet] lower-level condition numbers at Algorithm 1's lambda_opt", quiet)
    cond = condition_numbers(data, per_method["1"]["sol"].x, ref["condition_regs"])
    summary["condition"] = {"regs": list(ref["condition_regs"]), **cond}
    summary["condition_rows"] = [
      {
        "alpha = beta": f"{reg:g}",
        "(6.1): cond": f"{cond['1'][j][0]:.3g}",
        "(6.1): eigenvalues": f"{cond['1'][j][1]:.3g} … {cond['1'][j][2]:.3g}",
        "(6.2): cond": f"{cond['1R'][j][0]:.3g}",
        "(6.2): eigenvalues": f"{cond['1R'][j][1]:.3g} … {cond['1R'][j][2]:.3g}",
      }
      for j, reg in enumerate(ref["condition_regs"])
    ]
  return common.ExperimentResult(
    title="Elastic net (6.1): Algorithm 1, 1R, 1E, fixed radius and grid search (Table 1)",
    columns=[
      "method",
      "time_s",
      "val_error",
      "test_error",
      "iterations",
      "stopped",
      "paper_time_s",
      "paper_val",
      "paper_test",
    ],
    rows=rows,
    histories=histories,
    notes=[
      f"{count} instances, d = {p['dim']}, |I_tr| = {p['n_train']}, |I_val| = "
      f"{p['n_val']}, |I_test| = {p['n_test']}; errors after retraining at "
      f"lambda_opt with alpha = beta = {ref['retrain_reg']:g}; mean ± standard "
      f"error over the {count} instances.",
      "time_s: wall time of one instance's run of the compiled program "
      "(compile time excluded, in results.json), warm-started lower solves. "
      "Paper: cvxpy on a laptop i5.",
      "stopped: instances that met the stopping rule within max_steps.",
    ],
    extra={"summary": summary, "eta0_sweep": sweep_rows},
  )


def _summary(per_method, grid_out, a, paper_ratio) -> dict:
  """The numbers the results template reads: per method the spread of time,
  errors and iterations and the diagnostics; ratios 1R / 1."""
  s: dict = {"paper_ratio_1E": paper_ratio, "paper_ratio_1R": 28.2 / 24.8}
  for method, out in per_method.items():
    entry = {
      "time_s": cc.spread(out["times"]),
      "val_error": cc.spread(out["val"]),
      "test_error": cc.spread(out["test"]),
      "iterations": cc.spread(out["sol"].info.num_steps),
      "eta0": out["eta0"],
    }
    for key, values in out["diag"].items():
      v = np.asarray(values, dtype=float)
      entry[key] = cc.spread(v[np.isfinite(v)]) if np.any(np.isfinite(v)) else None
    paper = PAPER_TABLE1.get(method)
    if paper:
      entry["vs_paper"] = {
        name: {
          "diff": entry[name]["mean"] - value,
          "in_se": (entry[name]["mean"] - value) / entry[name]["se"],
          "paper": value,
        }
        for name, value in (("time_s", paper[0]), ("val_error", paper[1]), ("test_error", paper[2]))
      }
    entry["time_per_solve_ms"] = cc.spread(1e3 * out["times"] / np.asarray(out["diag"]["solves"]))
    entry["stopped"] = int(
      np.sum(np.asarray(cc.met_stopping_rule(jnp.asarray(out["sol"].info.status))))
    )
    s[method] = entry
  s["diagnostic_rows"] = [_diagnostic_row(method, s[method]) for method in per_method]
  if grid_out is not None:
    s["grid"] = {
      "time_s": cc.spread(grid_out["times"]),
      "val_error": cc.spread(grid_out["val"]),
      "test_error": cc.spread(grid_out["test"]),
    }
  if "1" in per_method and "1R" in per_method:
    one, rr = per_method["1"], per_method["1R"]
    s["ratio_1R"] = {
      "time": cc.ratio_of_means(rr["times"], one["times"]),
      "iterations": cc.ratio_of_means(rr["sol"].info.num_steps, one["sol"].info.num_steps),
      "solves": cc.ratio_of_means(rr["diag"]["solves"], one["diag"]["solves"]),
      "time_per_solve": cc.ratio_of_means(
        rr["times"] / np.asarray(rr["diag"]["solves"]),
        one["times"] / np.asarray(one["diag"]["solves"]),
      ),
      "lambda_distance": cc.spread(
        np.linalg.norm(np.asarray(rr["sol"].x) - np.asarray(one["sol"].x), axis=1)
      ),
      "val_diff": cc.spread(rr["val"] - one["val"]),
    }
  for method in ("1", "1R", "1E", "1F"):
    if method in per_method and grid_out is not None:
      s.setdefault("val_minus_grid", {})[method] = cc.spread(
        per_method[method]["val"] - np.asarray(grid_out["val"])
      )
  if "1E" in per_method:
    s["ratio_1E"] = (
      cc.ratio_of_means(per_method["1E"]["times"], per_method["1"]["times"])
      if "1" in per_method
      else None
    )
  return s


def _diagnostic_row(method: str, e: dict) -> dict:
  """One row of the iteration diagnostics (means ± SE over instances)."""
  ms = lambda key, fmt=".1f": _cell(e[key], fmt) if e.get(key) else "–"
  return {
    "method": NAMES[method],
    "iterations (median)": f"{ms('iterations')} ({e['iterations']['median']:.0f})",
    "target hits": ms("hits"),
    "null steps": ms("null_steps"),
    "moves": ms("moves"),
    "median accepted t": ms("median_step", ".3g"),
    "moves with t < 1e-3": ms("small_steps"),
    "iters at alpha > 1e-2 / 1e-4..1e-2 / <= 1e-4": " / ".join(
      f"{e[k]['mean']:.0f}"
      for k in ("iters_alpha_above_1e-2", "iters_alpha_1e-4_to_1e-2", "iters_alpha_below_1e-4")
    ),
    "lower solves": ms("solves", ".0f"),
    "ms per solve": ms("time_per_solve_ms", ".2f"),
  }
