"""Compile time and run time of every public solver on a small problem, float32 and float64.

    python -m benchmarks.compile_times [--repeats 5] [--only NAME ...]

The problems are the contract test's (`tests/test_contract.py`: every entry
point, on a 3-dimensional problem, with a derivative through it where the method
is differentiable), plus `implicit.hypergradient_at`. For each, in one
process with JAX's caches cleared before each entry:

  * ``trace_s``: ``jax.jit(fn).trace(x0)`` (Python tracing to a jaxpr),
  * ``lower_s``: lowering that to StableHLO, ``compile_s``: XLA's compile,
  * ``first_call_s``: their sum, what a user waits for at the first call,
  * ``run_s``: the median of warm calls (``jax.block_until_ready``),
  * the size of the traced program: jaxpr equations (sub-jaxprs included)
    and instructions of the optimized HLO.

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


def measure(name: str, make, dtype, repeats: int) -> dict:
  jax.clear_caches()
  with jax.enable_x64(dtype == jnp.float64):
    fn, x0, _ = make(dtype)
    jitted = jax.jit(lambda x: fn(x))
    tic = time.perf_counter()
    traced = jitted.trace(x0)
    trace_s = time.perf_counter() - tic
    tic = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - tic
    tic = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - tic
    timing.time_call(compiled, x0)
    runs = [timing.time_call(compiled, x0) for _ in range(repeats)]
    first = trace_s + lower_s + compile_s
    target = TARGET_S.get(name, DEFAULT_TARGET_S)
    return {
      "entry_point": name,
      "dtype": jnp.dtype(dtype).name,
      "trace_s": trace_s,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "first_call_s": first,
      "run_s": statistics.median(runs),
      "repeats": repeats,
      "jaxpr_equations": count_equations(traced.jaxpr),
      "hlo_instructions": hlo_instructions(compiled),
      "target_s": target,
      "meets_target": first <= target,
    }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", nargs="*", help="entry points to measure (default: all)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = parser.parse_args(argv)
  rows = []
  for name, make in cases().items():
    if args.only and name not in args.only:
      continue
    for dtype in (jnp.float32, jnp.float64):
      row = measure(name, make, dtype, args.repeats)
      rows.append(row)
      print(
        f"{name:30s} {row['dtype']:8s} first call {row['first_call_s']:6.2f} s "
        f"(trace {row['trace_s']:.2f}, lower {row['lower_s']:.2f}, compile "
        f"{row['compile_s']:.2f}), run {1e3 * row['run_s']:8.3f} ms, "
        f"{row['jaxpr_equations']} eqns, {row['hlo_instructions']} HLO",
        flush=True,
      )
  out = args.out or timing.results_path("compile_times")
  report.write_json(
    out,
    {"machine": timing.machine(), "rows": rows, "command": "python -m benchmarks.compile_times"},
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
