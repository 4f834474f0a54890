"""The persistent compilation cache helper (`experiments.jax_cache`): a
second process loads what the first compiled and gets the same result,
importing bilevel_jax leaves JAX's configuration alone, the opt-out, and the
size bound."""

import json
import os
import subprocess
import sys

import numpy as np

from experiments import jax_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: import bilevel_jax (the cache must still be off), then enable
# the cache and compute a BDA hypergradient whose compile is cached.
SCRIPT = """
import json, os, sys
import jax, jax.numpy as jnp
import bilevel_jax
from bilevel_jax import bda
before = jax.config.jax_compilation_cache_dir
hits = []
jax.monitoring.register_event_listener(
  lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
from experiments import jax_cache
path = jax_cache.enable()
upper_fn = lambda x, y: jnp.sum((y - 1.0) ** 2)
lower_fn = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)
_, grad = jax.jit(lambda x: bda.hypergradient(
  upper_fn, lower_fn, x, jnp.zeros(2), steps=20, upper_lr=0.5, lower_lr=0.5, alpha=0.5))(
  jnp.array([2.0, -1.0]))
print(json.dumps({"before": before, "path": path, "x": [float(v) for v in grad], "hits": len(hits),
                  "entries": sorted(os.listdir(path)) if path else []}))
"""


def _run(env_extra):
  env = dict(os.environ, PYTHONPATH=REPO)
  for name in ("PYTEST_XDIST_WORKER", "BILEVEL_JAX_NO_CACHE", "JAX_COMPILATION_CACHE_DIR"):
    env.pop(name, None)  # the caller's opt-out must not decide this test
  env.update(env_extra)
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_program_and_agrees(tmp_path):
  env = {"BILEVEL_JAX_CACHE_DIR": str(tmp_path), "BILEVEL_JAX_CACHE_MIN_COMPILE_S": "0"}
  first = _run(env)
  assert first["before"] is None  # importing the library changed nothing
  assert first["path"] == str(tmp_path) and first["entries"] and first["hits"] == 0
  second = _run(env)
  assert second["hits"] >= 1 and second["entries"] == first["entries"]  # loaded, not compiled
  np.testing.assert_array_equal(second["x"], first["x"])  # bit for bit
  off = _run({**env, "BILEVEL_JAX_NO_CACHE": "1"})
  assert off["path"] is None and off["hits"] == 0
  np.testing.assert_array_equal(off["x"], first["x"])


def test_opt_out_and_directory(monkeypatch, tmp_path):
  monkeypatch.setenv("BILEVEL_JAX_CACHE_DIR", str(tmp_path))
  assert jax_cache.cache_dir() == str(tmp_path)
  monkeypatch.delenv("BILEVEL_JAX_CACHE_DIR")
  assert jax_cache.cache_dir() == os.path.join(REPO, ".jax_cache")
  for value, off in (("1", True), ("yes", True), ("0", False), ("", False)):
    monkeypatch.setenv("BILEVEL_JAX_NO_CACHE", value)
    assert jax_cache.disabled() is off
  monkeypatch.setenv("BILEVEL_JAX_NO_CACHE", "1")
  assert jax_cache.enable(str(tmp_path / "never")) is None
  assert not (tmp_path / "never").exists()


def test_prune_deletes_the_oldest_entries_down_to_half(tmp_path):
  for i in range(8):  # 8 files of 256 KiB, oldest first
    path = tmp_path / f"entry{i}-cache"
    path.write_bytes(b"\0" * 2**18)
    os.utime(path, (1000 + i, 1000 + i))
  assert jax_cache.prune(str(tmp_path), max_mb=4.0) == 0  # 2 MiB: within the bound
  assert jax_cache.prune(str(tmp_path), max_mb=1.0) == 6  # down to 0.5 MiB
  assert sorted(os.listdir(tmp_path)) == ["entry6-cache", "entry7-cache"]
  assert jax_cache.size_mb(str(tmp_path)) == 0.5
