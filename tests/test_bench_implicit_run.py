"""The full-upper-run part of the jaxopt benchmark (implicit_peers with
[upper_run]): a tiny config runs, every step's error is measured against an
exact hypergradient, and the matched rows compare like with like."""

import pytest

from benchmarks import runner
from benchmarks.suites import implicit_peers as suite

TINY = """
suite = "implicit_peers"
[problems]
names = ["ridge", "quadratic"]
[ridge]
n_train = 40
n_val = 20
dim = 5
[quadratic]
n_samples = 32
dim_inner = 5
dim_outer = 4
[lbfgs]
enabled = false
max_steps = 200
[gd]
enabled = false
[linear]
max_steps = 100
[upper_run]
enabled = true
steps = 3
tols = [1e-6]
linear_tols = [1e-8]
variants = ["cg_warm", "shine", "cg_warm_extrap2"]
jaxopt_extrapolate = [0, 2]
repeats = 1
targets = [1e-4]
"""


@pytest.mark.slow  # about 30 s: 5 implementations x 2 problems compiled
def test_tiny_upper_run(tmp_path):
  pytest.importorskip("jaxopt")
  path = tmp_path / "tiny_run.toml"
  path.write_text(TINY)
  payload = runner.run(str(path), out_dir=str(tmp_path), quiet=True, plot=False)
  runs = [r for r in payload["rows"] if r["per"] == "upper_step"]
  assert {(r["impl"], r["method"]) for r in runs} == {
    ("bilevel_jax", "upper run cg_warm"),
    ("bilevel_jax", "upper run shine"),
    ("bilevel_jax", "upper run cg_warm_extrap2"),
    ("jaxopt", "upper run cg"),
    ("jaxopt", "upper run extrap2"),
  }
  for r in runs:
    assert r["median_s"] > 0 and r["steps"] == 3 and r["lower_steps"] > 0
    assert r["reference_grad_norm"] < 1e-9  # the reference is exact
    if "shine" in r["method"]:
      assert r["metric"] > 1e-3  # an approximation, and measured as one
    else:
      assert r["metric"] < 1e-4 and r["speedup"] > 0
  matched = [r for r in payload["rows"] if r["per"] == "upper_step_matched"]
  assert {r["method"] for r in matched} == {
    "upper run cg_warm matched",
    "upper run cg_warm_extrap2 matched",
  }
  for r in matched:
    same_start = "extrapolated (degree 2)" if "extrap" in r["method"] else "previous"
    assert r["peer_setting"].endswith(same_start) and r["speedup"] > 0
  assert len(payload["load_average"]["start"]) == 3


def test_upper_run_pairs_must_match():
  cfg = runner.read_config(str(runner.SCRIPTS_DIR + "/../configs/bench/implicit_peers_run.toml"))[2]
  cfg["upper_run"]["linear_tols"] = cfg["upper_run"]["linear_tols"][:1]
  with pytest.raises(ValueError, match="same length"):
    suite.upper_run_rows(suite.BUILDERS["quadratic"](cfg["quadratic"]), cfg, None, None)
