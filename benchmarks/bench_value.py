"""Smoothed value-function benchmark (issue: smoothed value functions).

1. Entropic v_mu and its gradient against the number of integration nodes N:
   the custom VJP (4.2)-(4.3) of `value.entropic` against plain reverse-mode
   autodiff of the same log-sum-exp, in run time and in XLA's temp memory of
   the compiled value-and-gradient (the custom rule stores no per-node
   residual; autodiff keeps what the backward pass of g needs per node), and
   the custom VJP with ``batch_size`` (g and its VJP on chunks of nodes).
2. Quadratic v_mu (FISTA to tolerance, Proposition 3.4 gradient) on a lasso
   lower level against the dimension of y: compile time, run time, FISTA
   iterations.

Usage: python -m benchmarks.bench_value [configs/bench/value.toml]
Writes benchmarks/results/value_<platform>_<device>.json.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing
from experiments import report

from bilevel_jax import Status, smoothing, value
from experiments import config
from bilevel_jax._src.value import rules

F = config.Field
SCHEMA = {
  "entropic": {
    "panels": F("list[int]", [64, 256, 1024, 4096], config.positive),
    "order": F("int", 8, config.positive),
    "dim_x": F("int", 64, config.positive),
    "mu": F("float", 1e-3, config.positive),
    "batch_size": F("int", 512, config.positive),
    "repeats": F("int", 5, config.positive),
  },
  "quadratic": {
    "dim_y": F("list[int]", [10, 100, 1000], config.positive),
    "mu": F("float", 1e-3, config.positive),
    "repeats": F("int", 5, config.positive),
  },
}


def _memory(compiled) -> int:
  mem = compiled.memory_analysis()
  return int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1


def _timed(fn, *args, repeats):
  compiled, compile_s = timing.compile_timed(fn, *args)
  timing.time_call(compiled, *args)  # warm-up
  samples = [timing.time_call(compiled, *args) for _ in range(repeats)]
  return compiled, compile_s, timing.summarize(samples)


def bench_entropic(cfg):
  e = cfg["entropic"]
  d, mu = e["dim_x"], e["mu"]
  c = jnp.linspace(-1.0, 1.0, d)

  def g(x, y):  # a lower level whose x-gradient has d entries per node
    return jnp.mean((x - c * y[0]) ** 2) + smoothing.abs(y[0] - 0.3, mu)

  x = jnp.full(d, 0.2)
  box = (jnp.array([-2.0]), jnp.array([2.0]))
  rows = []
  for panels in e["panels"]:
    custom, batched = (
      jax.value_and_grad(
        lambda x, bs=bs: (
          value.entropic(g, x, mu=mu, box=box, order=e["order"], panels=panels, batch_size=bs).value
        )
      )
      for bs in (None, e["batch_size"])
    )
    u, w = rules.gauss_legendre((e["order"],), (panels,))
    nodes = jnp.asarray(-2.0 + 4.0 * u)
    logw = jnp.log(jnp.asarray(4.0 * w))

    def naive_value(x):
      gv = jax.vmap(lambda y: g(x, y))(nodes)
      return -mu * logsumexp(logw - gv / mu)

    naive = jax.value_and_grad(naive_value)
    row = {"nodes": int(nodes.shape[0]), "dim_x": d}
    outs = {}
    for name, fn in (("custom_vjp", custom), ("custom_vjp_batched", batched), ("autodiff", naive)):
      compiled, compile_s, stats = _timed(fn, x, repeats=e["repeats"])
      outs[name] = compiled(x)
      row[name] = {"compile_s": compile_s, "temp_bytes": _memory(compiled), **stats}
    # The custom rule adds the coarse-rule error estimate (a second, half-order
    # evaluation) to its forward pass; the values agree up to rounding.
    row["max_grad_difference"] = max(
      float(jnp.max(jnp.abs(outs[k][1] - outs["autodiff"][1])))
      for k in ("custom_vjp", "custom_vjp_batched")
    )
    rows.append(row)
    print(
      f"entropic N={row['nodes']:6d}: custom {1e3 * row['custom_vjp']['median_s']:8.2f} ms "
      f"({row['custom_vjp']['temp_bytes'] / 2**20:7.2f} MiB temp), batched "
      f"{1e3 * row['custom_vjp_batched']['median_s']:8.2f} ms "
      f"({row['custom_vjp_batched']['temp_bytes'] / 2**20:7.2f} MiB), autodiff "
      f"{1e3 * row['autodiff']['median_s']:8.2f} ms ({row['autodiff']['temp_bytes'] / 2**20:7.2f}"
      f" MiB temp), |grad diff| {row['max_grad_difference']:.1e}",
      flush=True,
    )
  return rows


def bench_quadratic(cfg):
  q = cfg["quadratic"]
  rows = []
  for m in q["dim_y"]:
    key_a, key_b = jax.random.split(jax.random.PRNGKey(m))
    n = 2 * m
    A = jax.random.normal(key_a, (n, m)) / jnp.sqrt(n)
    b = jax.random.normal(key_b, (n,))

    def g(x, y, mu):
      return 0.5 * jnp.sum((A @ y - b) ** 2) + x * smoothing.l1(y, mu, "chks")

    fn = lambda x: value.quadratic(g, x, jnp.zeros(m), mu=q["mu"], pass_mu=True)
    vg = jax.value_and_grad(lambda x: fn(x).value)
    x = jnp.asarray(0.1)
    _, compile_s, stats = _timed(vg, x, repeats=q["repeats"])
    info = jax.jit(fn)(x).info
    row = {
      "dim_y": m,
      "compile_s": compile_s,
      "iterations": int(info.num_steps),
      "residual": float(info.residual),
      "status": int(info.status),
      "status_name": Status(int(info.status)).name.lower(),
      **stats,
    }
    rows.append(row)
    print(
      f"quadratic m={m:5d}: {1e3 * stats['median_s']:8.2f} ms, {row['iterations']} FISTA "
      f"iterations, residual {row['residual']:.1e} (compile {compile_s:.2f} s)",
      flush=True,
    )
  return rows


def main(path):
  raw = config.read_toml(path)
  raw.pop("description", None)
  cfg = config.validate(raw, SCHEMA, path)
  jax.config.update("jax_enable_x64", True)
  out = {
    "machine": timing.machine(),
    "config": cfg,
    "dtype": "float64",
    "entropic": bench_entropic(cfg),
    "quadratic": bench_quadratic(cfg),
  }
  target = timing.results_path("value")
  report.write_json(target, out)
  print(f"wrote {target}")


if __name__ == "__main__":
  main(
    sys.argv[1]
    if len(sys.argv) > 1
    else os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench", "value.toml"
    )
  )
