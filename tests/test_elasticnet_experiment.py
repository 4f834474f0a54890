"""The elastic-net experiment's bookkeeping (Table 1 of Solla & Royset):
spreads, paired ratios and the per-iteration diagnostics, on hand-made
inputs (no solve, no compile)."""

import types

import numpy as np
import pytest

from experiments import composite_common as cc
from experiments import elasticnet


def test_spread_and_ratio_of_means():
  v = np.array([1.0, 2.0, 4.0, 9.0])
  s = cc.spread(v)
  assert s["mean"] == 4.0 and s["median"] == 3.0 and s["n"] == 4
  assert s["se"] == pytest.approx(np.std(v, ddof=1) / 2)
  assert np.isnan(cc.spread([3.0])["se"])
  # Delta method against a Monte Carlo over resampled pairs.
  rng = np.random.default_rng(0)
  b = rng.uniform(1, 2, 20)
  a = 0.3 * b + rng.normal(0, 0.05, 20)
  r = cc.ratio_of_means(a, b)
  assert r["ratio"] == pytest.approx(a.mean() / b.mean())
  idx = rng.integers(0, 20, (4000, 20))
  boot = a[idx].mean(1) / b[idx].mean(1)
  assert r["se"] == pytest.approx(np.std(boot), rel=0.15)


def test_diagnostics_counts():
  # Instance 0: 4 iterations: a move with t = 1 (1 trial), a move with
  # t = 1/8 (4 trials), a target hit, a null step (max_backtracks trials).
  steps = np.full((2, 6), np.nan)
  steps[0, :4] = [1.0, 0.125, 0.0, 0.0]
  steps[1, :2] = [0.5, 0.0]
  alpha = np.full((2, 6), np.nan)
  alpha[0, :4] = [1.0, 1e-3, 1e-3, 1e-5]
  alpha[1, :2] = [1.0, 1.0]
  info = types.SimpleNamespace(
    num_steps=np.array([4, 2]),
    target_hits=np.array([1, 1]),
    linesearch_failures=np.array([1, 0]),
    history=types.SimpleNamespace(step=steps, alpha=alpha),
  )
  d = elasticnet.diagnostics(info, num_samples=5, gamma=0.5, max_backtracks=30)
  assert d["iterations"] == [4, 2] and d["moves"] == [2, 1] and d["null_steps"] == [1, 0]
  assert d["trials"] == [1 + 4 + 30, 2]
  assert d["solves"] == [4 * 6 + 35, 2 * 6 + 2]
  assert d["median_step"] == [pytest.approx(0.5625), 0.5]
  assert d["iters_alpha_above_1e-2"] == [1, 2]
  assert d["iters_alpha_1e-4_to_1e-2"] == [2, 0] and d["iters_alpha_below_1e-4"] == [1, 0]
