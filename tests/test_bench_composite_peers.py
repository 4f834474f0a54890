"""The cvxpy comparison of Algorithm 1 on the elastic net: the small config
runs with cvxpy (the reference agrees with ours on the hypergradient and, on
the same samples, on lambda) and without it (the peer is skipped, our rows
remain)."""

import os
import sys

import numpy as np
import pytest

from benchmarks import runner
from benchmarks.peers import cvxpy_composite as peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "bench", "composite_peers_small.toml")
FULL = os.path.join(ROOT, "configs", "bench", "composite_peers.toml")


def _ours(rows):
  ours = [r for r in rows if r["impl"] == "bilevel_jax"]
  assert len(ours) == 1
  row = ours[0]
  assert row["median_s"] > 0 and row["compile_s"] > 0 and row["iterations"] == 4
  assert np.isfinite(row["metric"]) and np.isfinite(row["test_error"])
  return row


def test_small_config_with_cvxpy(tmp_path):
  pytest.importorskip("cvxpy")
  payload = runner.run(SMALL, out_dir=str(tmp_path), quiet=True, plot=False)
  ours = _ours(payload["rows"])
  (ref,) = [r for r in payload["rows"] if r["impl"] == "cvxpy"]
  assert ref["speedup"] == ours["speedup"] > 0
  assert ref["iterations"] == ours["iterations"]
  # Same algorithm, same samples: the same lambda to solver accuracy.
  np.testing.assert_allclose(ref["lambda"], ours["lambda"], atol=1e-4)
  assert payload["hypergradient_check"]["passed"]
  assert payload["peer"]["cvxpy"]["status"].startswith("cvxpy ")
  assert "speedup_median" in payload["summary"]
  (counts,) = payload["solve_breakdown"]  # the untimed count on instance 0
  assert counts["solves"] > 0 and counts["newton_steps"] + counts["interior_point_steps"] > 0
  assert 0 <= counts["interior_point_solves"] <= counts["solves"]
  assert len(payload["loadavg_at_start"]) == len(payload["loadavg_at_end"]) == 3
  assert os.path.exists(tmp_path / (runner.result_stem(SMALL) + ".json"))


# Slow (16 s: the whole small suite runs): the missing-peer path of the runner is
# also checked for jaxopt (test_bench_implicit_peers) and BOAT (hypercleaning).
@pytest.mark.slow
def test_small_config_skips_missing_cvxpy(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "cvxpy", None)  # `import cvxpy` raises ImportError
  assert peer.import_cvxpy() is None
  payload = runner.run(SMALL, out_dir=str(tmp_path), quiet=True, plot=False)
  _ours(payload["rows"])
  assert all(r["impl"] == "bilevel_jax" and "speedup" not in r for r in payload["rows"])
  status = payload["peer"]["cvxpy"]["status"]
  assert status.startswith("skipped: cvxpy is not installed") and "[peers]" in status
  assert any(note.startswith("cvxpy reference: skipped") for note in payload["notes"])
  assert "hypergradient_check" not in payload


def test_full_config_is_valid():
  _, name, cfg = runner.read_config(FULL)
  assert name == "composite_peers"
  assert cfg["run"]["instances"] == 20 and cfg["run"]["ref_instances"] >= 3
