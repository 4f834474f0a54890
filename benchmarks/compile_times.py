"""Compile time and run time of every public solver on a small problem, float32 and float64.

    python -m benchmarks.compile_times [--repeats 5] [--group small|realistic] [--only TEXT ...]

Two groups of rows.  "small": the problems are the contract test's (`tests/test_contract.py`: every entry
point, on a 3-dimensional problem, with a derivative through it where the method
is differentiable), plus `implicit.hypergradient_at`. For each, in one
process with JAX's caches cleared before each entry:

  * ``trace_s``: ``jax.jit(fn).trace(x0)`` (Python tracing to a jaxpr),
  * ``lower_s``: lowering that to StableHLO, ``compile_s``: XLA's compile,
  * ``first_call_s``: their sum, what a user waits for at the first call,
  * ``trace_lower_cpu_s``, ``compile_cpu_s``: CPU seconds of this process
    (all its threads) in tracing + lowering and in XLA's compile: less
    sensitive than wall time to other jobs on a shared machine,
  * ``run_s``: the median of warm calls (``jax.block_until_ready``),
  * the size of the traced program: jaxpr equations (sub-jaxprs included),
    operations of the StableHLO handed to XLA and instructions of the
    optimized HLO.

"realistic": what a new user compiles first (issue 15; `HEAVY`): the
elastic net of Solla & Royset 6.1 with 10 features, Algorithm 1 around it,
an upper step around it, an implicit hypergradient of a logistic
regression and a BDA hypergradient of an MLP.  These rows also record how
many times the scenario's inner functions were traced (``traced_calls``:
a count of 5 for gradient sampling means fun was traced 5 times, one of
them by the argument check, which adds nothing to the program) and the
largest sub-jaxprs (``largest_sub_jaxprs``), which say what dominates.

JAX's persistent compilation cache is turned off here (every compile is
cold, whatever `experiments.jax_cache` or $JAX_COMPILATION_CACHE_DIR say).

Writes ``benchmarks/results/compile_times_<device>.json``. The targets
(first call <= 3 s per solver, <= 10 s for gradient sampling) are recorded
beside each row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import timing
from experiments import report

TARGET_S = {"upper.gradient_sampling": 10.0, "upper.sqp_gradient_sampling": 10.0}
DEFAULT_TARGET_S = 3.0


def count_equations(jaxpr) -> int:
  """Equations of a (closed) jaxpr, counting those of every sub-jaxpr."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += count_equations(sub)
  return total


def hlo_instructions(compiled) -> int:
  text = compiled.as_text() or ""
  return sum(
    1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//")
  )


def stablehlo_ops(lowered) -> int:
  """Operations of the StableHLO module handed to XLA (before optimization)."""
  text = lowered.as_text() or ""
  return sum(1 for line in text.splitlines() if " = " in line)


def cases() -> dict:
  from tests import test_contract
  from bilevel_jax import implicit

  out = {name: case.make for name, case in test_contract.CASES.items()}

  def at_solution(dtype):
    lower, upper = test_contract._lower, test_contract._upper
    a = test_contract.A.astype(dtype)

    def fn(x, throw=False):
      y = jnp.linalg.solve(a, x)
      sol = implicit.hypergradient_at(upper, lower, x, y, throw=throw)
      return sol.info.status, (sol.grad,)

    x0 = jnp.array([0.3, -0.2, 0.5], dtype)
    return fn, x0, None

  out["implicit.hypergradient_at"] = at_solution
  return out


# ------------------------------------------------- realistic scenarios (issue 15)
# What a new user compiles first: the elastic net of Solla & Royset 6.1 with
# d = 10 features (configs/elasticnet.toml has d = 100), Algorithm 1 around
# it with the config's N_sam = 5, an upper step around composite, an implicit
# hypergradient of a logistic regression, and a BDA hypergradient of a small
# MLP.  Each ``make(dtype)`` returns (fn, x0, counters): fn(x) is what is
# jitted; counters (a dict) counts how often the scenario's inner functions
# are traced while jax.jit(fn).trace runs.

HEAVY_DIM = 10
HEAVY_SAMPLES = 5  # N_sam of configs/elasticnet.toml
HEAVY_GS_STEPS = 50  # max_steps for the run-time column (compile time does not depend on it)


def _elastic_net(dtype, counters):
  from bilevel_jax._src.problems import regression

  data = regression.make_regression(
    jax.random.PRNGKey(0), dim=HEAVY_DIM, n_train=50, n_val=50, n_test=50, dtype=dtype
  )
  low = regression.elastic_net_lower(data)

  def g(x, y):
    counters["g traced"] = counters.get("g traced", 0) + 1
    return low.g(x, y)

  upper_fn = lambda x, y: regression.mse(data.a_val, data.b_val, low.to_model(y))
  return data, low._replace(g=g), upper_fn


def _heavy_composite(dtype):
  from bilevel_jax import composite

  counters: dict = {}
  _, low, upper_fn = _elastic_net(dtype, counters)
  hg = composite.make_hypergradient(upper_fn, low.g, low.G, low.h, alpha=1e-2, beta=1e-2, jit=False)

  def fn(x):
    counters["composite traced"] = counters.get("composite traced", 0) + 1
    value, grad, sol = hg(x, low.y0)
    return value, grad, sol.info.status

  return fn, jnp.zeros(2, dtype), counters


def _heavy_warm_solve(dtype):
  """The lower solve gradient sampling calls (composite.solve, method="warm"),
  forward only: the floor of the gradient-sampling row, which holds it once
  forward and once with its derivative."""
  from bilevel_jax import composite

  counters: dict = {}
  _, low, upper_fn = _elastic_net(dtype, counters)

  def fn(x):
    sol = composite.solve(low.g, low.G, low.h, x, low.y0, alpha=1e-2, beta=1e-2, method="warm")
    return upper_fn(x, sol.y), sol.info.status

  return fn, jnp.zeros(2, dtype), counters


def _heavy_gradient_sampling(dtype):
  from bilevel_jax import upper
  from experiments import composite_common as cc
  from bilevel_jax._src.problems import regression

  counters: dict = {}
  data, low, _ = _elastic_net(dtype, counters)
  fun, state0 = cc.hyper_objective(
    low, lambda coef: regression.mse(data.a_val, data.b_val, coef), warm_start=True
  )

  def counted(*args):
    counters["composite traced"] = counters.get("composite traced", 0) + 1
    return fun(*args)

  def fn(x):
    sol = upper.gradient_sampling(
      counted,
      x,
      key=jax.random.PRNGKey(1),
      num_samples=HEAVY_SAMPLES,
      state0=state0,
      batching="map",
      max_steps=HEAVY_GS_STEPS,
    )
    return sol.x, sol.value, sol.info.status

  return fn, jnp.zeros(2, dtype), counters


def _heavy_upper_step(dtype):
  import optax
  from bilevel_jax import composite, upper

  counters: dict = {}
  _, low, upper_fn = _elastic_net(dtype, counters)
  hg = composite.make_hypergradient(
    upper_fn, low.g, low.G, low.h, alpha=1e-2, beta=1e-2, method="warm", jit=False
  )

  def counted(x, y0):
    counters["composite traced"] = counters.get("composite traced", 0) + 1
    return hg(x, y0)

  stepper = upper.make_step(counted, optax.adam(0.1), warm_start=True)

  def fn(x):
    state, info = stepper.step(stepper.init(x, low.y0))
    return state.x, state.y, info.status

  return fn, jnp.zeros(2, dtype), counters


def _logistic_data(dtype, n=200, d=64, classes=10):
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  a = jax.random.normal(k1, (n, d), dtype)
  labels = jax.random.randint(k2, (n,), 0, classes)
  return a, jax.nn.one_hot(labels, classes, dtype=dtype)


def _heavy_implicit(dtype):
  from bilevel_jax import implicit

  counters: dict = {}
  a, onehot = _logistic_data(dtype)
  a_val, onehot_val = a[::-1], onehot[::-1]

  def xent(w, a, onehot):
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(a @ w), -1))

  def f(x, w):  # multinomial logistic regression, one l2 weight per feature
    counters["lower traced"] = counters.get("lower traced", 0) + 1
    return xent(w, a, onehot) + 0.5 * jnp.sum(jnp.exp(x)[:, None] * w**2)

  F = lambda x, w: xent(w, a_val, onehot_val)
  y0 = jnp.zeros((a.shape[1], onehot.shape[1]), dtype)

  def fn(x):
    value, grad, sol = implicit.hypergradient(F, f, x, y0, return_info=True)
    return value, grad, sol.info.status

  return fn, jnp.full((a.shape[1],), -2.0, dtype), counters


def _heavy_bda(dtype, sizes=(784, 32, 10), n=128, steps=50):
  from bilevel_jax import bda

  counters: dict = {}
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  a = jax.random.normal(k1, (n, sizes[0]), dtype)
  onehot = jax.nn.one_hot(jax.random.randint(k2, (n,), 0, sizes[-1]), sizes[-1], dtype=dtype)
  keys = jax.random.split(k3, len(sizes) - 1)
  y0 = [
    (jax.random.normal(k, (m, p), dtype) / jnp.sqrt(m), jnp.zeros(p, dtype))
    for k, m, p in zip(keys, sizes[:-1], sizes[1:])
  ]

  def mlp(params, inputs):
    for i, (w, b) in enumerate(params):
      inputs = inputs @ w + b
      if i < len(params) - 1:
        inputs = jax.nn.relu(inputs)
    return inputs

  def loss(params, weights):
    per = -jnp.sum(onehot * jax.nn.log_softmax(mlp(params, a)), -1)
    return jnp.mean(weights * per)

  def f(x, y):  # data hyper-cleaning: x are per-example weight logits
    counters["lower traced"] = counters.get("lower traced", 0) + 1
    return loss(y, jax.nn.sigmoid(x))

  F = lambda x, y: loss(y, jnp.ones_like(x))

  def fn(x):
    value, grad, sol = bda.hypergradient(
      F, f, x, y0, return_info=True, steps=steps, upper_lr=0.1, lower_lr=0.1, alpha=0.5
    )
    return value, grad, sol.info.status

  return fn, jnp.zeros(n, dtype), counters


HEAVY = {
  "composite.make_hypergradient (elastic net, d=10)": _heavy_composite,
  "composite.solve (method='warm', forward only, elastic net d=10)": _heavy_warm_solve,
  "upper.gradient_sampling (Alg. 1, elastic net d=10, N_sam=5)": _heavy_gradient_sampling,
  "upper.make_step (adam, composite elastic net d=10)": _heavy_upper_step,
  "implicit.hypergradient (logistic regression 64x10)": _heavy_implicit,
  "bda.hypergradient (MLP 784-32-10, K=50)": _heavy_bda,
}
HEAVY_TARGET_S = {"upper.gradient_sampling (Alg. 1, elastic net d=10, N_sam=5)": 10.0}


def breakdown(jaxpr, top: int = 8) -> list:
  """Where the equations are: the largest sub-jaxprs (``primitive@depth``,
  their equation count, sub-jaxprs included), largest first."""
  found = []

  def visit(jp, depth, path):
    jp = getattr(jp, "jaxpr", jp)
    for eqn in jp.eqns:
      subs = []
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
            subs.append(sub)
      if subs:
        name = eqn.params.get("name") or str(eqn.primitive)
        label = f"{path}/{name}" if path else str(name)
        found.append((sum(count_equations(s) for s in subs), label, depth))
        for s in subs:
          visit(s, depth + 1, label)

  visit(jaxpr, 0, "")
  found.sort(key=lambda t: -t[0])
  return [{"sub_jaxpr": label, "equations": n, "depth": d} for n, label, d in found[:top]]


def measure(name: str, make, dtype, repeats: int, group: str = "small") -> dict:
  jax.clear_caches()
  with jax.enable_x64(dtype == jnp.float64):
    fn, x0, extra = make(dtype)
    counters = extra if group == "realistic" else {}
    jitted = jax.jit(lambda x: fn(x))
    cpu0 = time.process_time()
    tic = time.perf_counter()
    traced = jitted.trace(x0)
    trace_s = time.perf_counter() - tic
    traces = dict(counters)
    tic = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - tic
    cpu1 = time.process_time()
    tic = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - tic
    cpu2 = time.process_time()
    timing.time_call(compiled, x0)
    runs = [timing.time_call(compiled, x0) for _ in range(repeats)]
    first = trace_s + lower_s + compile_s
    targets = HEAVY_TARGET_S if group == "realistic" else TARGET_S
    target = targets.get(name, DEFAULT_TARGET_S)
    row = {
      "entry_point": name,
      "group": group,
      "dtype": jnp.dtype(dtype).name,
      "trace_s": trace_s,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "first_call_s": first,
      "trace_lower_cpu_s": cpu1 - cpu0,
      "compile_cpu_s": cpu2 - cpu1,
      "run_s": statistics.median(runs),
      "repeats": repeats,
      "jaxpr_equations": count_equations(traced.jaxpr),
      "stablehlo_ops": stablehlo_ops(lowered),
      "hlo_instructions": hlo_instructions(compiled),
      "target_s": target,
      "meets_target": first <= target,
    }
    if group == "realistic":
      row["traced_calls"] = traces
      row["largest_sub_jaxprs"] = breakdown(traced.jaxpr)
    return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--only", nargs="*", help="rows whose name contains one of these (default: all)"
  )
  parser.add_argument(
    "--group", choices=("small", "realistic"), help="one group of rows (default: both)"
  )
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)  # cold compiles only
  groups = [("small", cases()), ("realistic", HEAVY)]
  if args.group:
    groups = [(g, c) for g, c in groups if g == args.group]
  rows = []
  load_start = os.getloadavg()
  for group, table in groups:
    for name, make in table.items():
      if args.only and not any(part in name for part in args.only):
        continue
      for dtype in (jnp.float32, jnp.float64):
        row = measure(name, make, dtype, args.repeats, group)
        rows.append(row)
        print(
          f"{name:40s} {row['dtype']:8s} first call {row['first_call_s']:6.2f} s "
          f"(trace {row['trace_s']:.2f}, lower {row['lower_s']:.2f}, compile "
          f"{row['compile_s']:.2f}), run {1e3 * row['run_s']:8.3f} ms, "
          f"{row['jaxpr_equations']} eqns, {row['hlo_instructions']} HLO"
          + (f", traced {row['traced_calls']}" if row.get("traced_calls") else ""),
          flush=True,
        )
  machine = timing.machine()
  machine["loadavg_start"] = load_start
  machine["loadavg_end"] = os.getloadavg()
  out = args.out or timing.results_path("compile_times")
  report.write_json(
    out,
    {"machine": machine, "rows": rows, "command": "python -m benchmarks.compile_times"},
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
