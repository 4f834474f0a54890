"""The benchmark runner (`python -m benchmarks`), its measurements and the scaling suite."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config
from benchmarks import roofline, runner, timing
from benchmarks.peers import venv
from benchmarks.suites import scaling

TINY_SCALING = """
suite = "scaling"
description = "tiny"
[problem]
dataset = "digits"
n_train = 60
n_val = 20
[K]
values = [3]
methods = ["bda"]
repeats = 2
roofline = "on"
[dim]
features = [4]
n_train = 30
K = 3
repeats = 2
[vmap]
instances = [1, 3]
K = 4
repeats = 2
[memory]
K = [4]
checkpoint = ["none", "step"]
"""


def _write(tmp_path, text, name="tiny.toml"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_bench_command_writes_json_markdown_and_machine(tmp_path, capsys):
  path = _write(tmp_path, TINY_SCALING)
  out = tmp_path / "out"
  assert runner.main([path, "--out", str(out), "--no-plot", "--quiet"]) == 0
  stem = runner.result_stem(path)
  payload = json.loads((out / f"{stem}.json").read_text())
  for key in ("jax", "device", "commit", "cpu_count", "xla_flags"):
    assert key in payload["machine"]
  sizes = {(r["size_name"], r["method"]) for r in payload["rows"]}
  assert ("K", "bda") in sizes and ("dim(y)", "bda") in sizes
  assert ("instances", "vmap (one call)") in sizes
  assert ("K", "bda checkpoint=step") in sizes
  for row in payload["rows"]:
    assert row["median_s"] > 0 and row["compile_s"] >= 0
  k_row = next(r for r in payload["rows"] if r["size_name"] == "K" and r["method"] == "bda")
  assert 0 <= k_row["metric"] <= 1 and k_row["upper_iter_median_s"] > 0
  # roofline = "on": a CPU has no spec-sheet peaks, which the notes say.
  assert any("No spec-sheet peaks" in n for n in payload["notes"])
  vmap_rows = [r for r in payload["rows"] if r["size_name"] == "instances"]
  assert all(r["metric"] < 1e-10 for r in vmap_rows)  # vmap agrees with the loop
  assert "| problem" in (out / f"{stem}.md").read_text()
  assert "wrote" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(config.ConfigError, match="suite"):
    runner.read_config(_write(tmp_path, "[K]\nvalues = [1]\n"))
  with pytest.raises(config.ConfigError, match="unknown suite 'nope'"):
    runner.read_config(_write(tmp_path, 'suite = "nope"\n'))
  with pytest.raises(config.ConfigError, match="repeats"):
    runner.read_config(_write(tmp_path, 'suite = "scaling"\n[K]\nrepeats = 0\n'))
  with pytest.raises(config.ConfigError, match="does not exist"):
    runner.read_config(str(tmp_path / "missing.toml"))
  assert runner.main([str(tmp_path / "missing.toml")]) == 2


def test_a_config_without_suite_runs_its_standalone_script(tmp_path, monkeypatch):
  (tmp_path / "benchmarks").mkdir()
  (tmp_path / "configs" / "bench").mkdir(parents=True)
  (tmp_path / "benchmarks" / "bench_demo.py").write_text(
    "import sys\nopen(sys.argv[1] + '.ran', 'w').write('ok')\n"
  )
  monkeypatch.setattr(runner, "SCRIPTS_DIR", str(tmp_path / "benchmarks"))
  path = tmp_path / "configs" / "bench" / "demo.toml"
  path.write_text("[section]\nkey = 1\n")
  assert runner.main([str(path)]) == 0
  assert (tmp_path / "configs" / "bench" / "demo.toml.ran").read_text() == "ok"
  orphan = tmp_path / "configs" / "bench" / "orphan.toml"
  orphan.write_text("[section]\nkey = 1\n")
  monkeypatch.chdir(tmp_path)
  assert runner.main([str(orphan)]) == 2  # no suite, no script: a named error


def test_summarize_and_alternation_order():
  stats = timing.summarize([3.0, 1.0, 2.0, 10.0, 4.0])
  assert stats["median_s"] == 3.0 and stats["min_s"] == 1.0 and stats["max_s"] == 10.0
  assert stats["q25_s"] == 2.0 and stats["q75_s"] == 4.0 and stats["repeats"] == 5
  order = []
  samples = timing.time_alternating(
    {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1
  )
  assert order == ["a", "b"] + ["a", "b"] * 3
  assert len(samples["a"]) == len(samples["b"]) == 3


def test_peak_memory_sees_a_large_allocation():
  with timing.peak_memory() as small:
    np.ones(10)
  with timing.peak_memory() as large:
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    block[::512] = 2.0
  del block
  assert large["peak_rss_mib"] >= small["peak_rss_mib"] + 40 or not large["peak_rss_exact"]
  assert large["device_peak_mib"] is None  # CPU


def test_roofline_estimate_arithmetic():
  peaks = {"bandwidth_Bps": 2e12, "fp32_flops": 50e12, "fp64_flops": 25e12}
  est = roofline.estimate(1e-3, flops=1e9, num_bytes=1e9, peaks=peaks)
  assert est["memory_bound_s"] == pytest.approx(5e-4)
  assert est["compute_bound_s"] == pytest.approx(2e-5)
  assert est["bound_by"] == "memory" and est["roofline_fraction"] == pytest.approx(0.5)
  est64 = roofline.estimate(1e-3, flops=1e11, num_bytes=1e9, peaks=peaks, dtype=jnp.float64)
  assert est64["bound_by"] == "compute" and est64["roofline_s"] == pytest.approx(4e-3)


def test_spec_peaks_match_device_kinds():
  class Fake:
    def __init__(self, kind):
      self.device_kind = kind

  assert roofline.spec_peaks(Fake("NVIDIA H100 80GB HBM3"))["bandwidth_Bps"] == 3.35e12
  assert roofline.spec_peaks(Fake("NVIDIA H100 PCIe"))["bandwidth_Bps"] == 2.0e12
  assert roofline.spec_peaks(Fake("NVIDIA H200"))["bandwidth_Bps"] == 4.8e12
  assert roofline.spec_peaks(Fake("cpu")) is None


def test_cost_analysis_needs_the_unrolled_program():
  """XLA counts a loop body once: the reason the roofline compiles unrolled."""
  a = jnp.ones((64, 64))
  body = lambda v, _: (jnp.tanh(a @ v), None)
  looped = lambda v: jax.lax.scan(body, v, None, length=8)[0]
  unrolled = lambda v: jax.lax.scan(body, v, None, length=8, unroll=True)[0]
  v = jnp.ones(64)
  f_loop = roofline.cost(jax.jit(looped).lower(v).compile())["flops"]
  f_full = roofline.cost(jax.jit(unrolled).lower(v).compile())["flops"]
  assert f_full == pytest.approx(8 * f_loop, rel=0.05)


def test_missing_peer_venv_is_reported_not_fatal(tmp_path, monkeypatch):
  monkeypatch.setenv("BILEVEL_JAX_PEERS", str(tmp_path / "peers"))
  messages = []
  assert venv.ensure("boat", ["boat-torch"], setup=False, log=messages.append) is None
  assert "skipped" in messages[0] and "--setup-peers" in messages[0]


def test_ridge_benchmark_problem_has_the_closed_form_hypergradient():
  """RHG with many steps on the vmap benchmark's ridge problems matches
  d/dx F(y*(x)), y* = (A^T A / n + diag(e^x))^{-1} A^T b / n."""
  xs, dat = scaling.ridge_instances(3, 4, 12, jnp.float64)

  def closed(x, d):
    n = d["a"].shape[0]
    y = jnp.linalg.solve(d["a"].T @ d["a"] / n + jnp.diag(jnp.exp(x)), d["a"].T @ d["b"] / n)
    return scaling.ridge_upper(x, y, d)

  want = jax.vmap(jax.grad(closed))(xs, dat)
  _, got = jax.vmap(lambda x, d: scaling.ridge_hypergradient(x, d, steps=3000, alpha=0.0))(xs, dat)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-10)


def test_unrolled_cost_extrapolation_matches_the_full_unroll():
  """cost(K) from 4 and 8 unrolled steps equals the fully unrolled K-step
  hyper-cleaning program's (XLA counts a loop body once, hence unrolling)."""
  prob = scaling._synthetic_cleaning(12, 40, jnp.float32)
  x = jnp.zeros(40, jnp.float32)
  make = lambda k: scaling._cleaning_fns(prob, k, "bda", unroll=True)[0]
  got = scaling.unrolled_cost(make, x, 14)
  want = roofline.cost(jax.jit(make(14)).lower(x).compile())
  assert got["flops"] == pytest.approx(want["flops"], rel=0.01)
  assert got["bytes"] == pytest.approx(want["bytes"], rel=0.01)
