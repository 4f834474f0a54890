"""benchmarks/flop_rate.py: the GEMMs it reads from XLA's optimized HLO and
the hand-written ridge BDA it profiles the library's vmap against."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flop_rate
from benchmarks.suites import scaling


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def test_hlo_dots_reads_shapes_dimensions_and_flops():
  u = jnp.ones((200, 78), jnp.float32)
  w = jnp.ones((10, 78), jnp.float32)
  a = jnp.ones((16, 20, 10), jnp.float32)
  y = jnp.ones((16, 10), jnp.float32)
  fn = lambda u, w, a, y: (u @ w.T, jnp.einsum("bij,bj->bi", a, y))
  dots = flop_rate.hlo_dots(_compiled(fn, u, w, a, y).as_text())
  flops = sorted(d["flops"] for d in dots)
  assert flops == [2 * 16 * 20 * 10, 2 * 200 * 78 * 10]
  gemm = next(d for d in dots if d["flops"] == 2 * 200 * 78 * 10)
  assert sorted([gemm["lhs"], gemm["rhs"]]) == [(10, 78), (200, 78)]
  assert sorted(gemm["out"]) == [10, 200]
  batched = next(d for d in dots if d["flops"] == 2 * 16 * 20 * 10)
  assert batched["dims"][1] == ((0,), (0,))  # batch dimensions
  counts = flop_rate.dot_counts(_compiled(fn, u, w, a, y).as_text())
  assert sum(c["count"] for c in counts.values()) == 2


def test_gemm_rate_runs_the_parsed_dot():
  u = jnp.ones((64, 32), jnp.float32)
  w = jnp.ones((8, 32), jnp.float32)
  (dot,) = flop_rate.hlo_dots(_compiled(lambda u, w: u @ w.T, u, w).as_text())
  rate = flop_rate.gemm_rate(dot, samples=2, sample_s=0.0)
  assert rate["flops"] == 2 * 64 * 32 * 8 and rate["median_s"] > 0
  wide = flop_rate.widened(dot, 4)
  assert wide["flops"] == 4 * dot["flops"] and 32 in wide["out"]
  assert flop_rate.gemm_rate(wide, samples=1, sample_s=0.0)["flops"] == wide["flops"]


def test_ridge_by_hand_is_the_library_hypergradient():
  xs, dat = scaling.ridge_instances(3, 4, 6, jnp.float32)
  ours = jax.vmap(functools.partial(scaling.ridge_hypergradient, steps=7))(xs, dat)
  hand = jax.vmap(functools.partial(flop_rate.ridge_by_hand, steps=7))(xs, dat)
  np.testing.assert_allclose(hand[0], ours[0], rtol=1e-5)
  np.testing.assert_allclose(hand[1], ours[1], rtol=1e-4, atol=1e-7)
