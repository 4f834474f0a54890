"""The jaxopt implicit-differentiation benchmark: the small config runs (with
jaxopt, and without it, skipping the peer), and the problems' references are
right."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import implicit
from experiments import config
from benchmarks import runner
from benchmarks.suites import implicit_peers as suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "bench", "implicit_peers_small.toml")
FULL = os.path.join(ROOT, "configs", "bench", "implicit_peers.toml")


def _check_rows(rows, impls):
  timed = [r for r in rows if r["per"] == "hypergradient"]
  assert {r["impl"] for r in timed} == impls
  assert {r["problem"] for r in timed} == set(suite.PROBLEMS)
  for row in timed:
    assert row["median_s"] > 0 and row["compile_s"] > 0 and row["repeats"] == 2
    assert np.isfinite(row["metric"]) and row["lower_steps"] > 0
    if row["method"] == "gd":
      assert row["lower_steps"] == row["size"]
  lbfgs = [r for r in timed if r["method"] == "lbfgs"]
  assert all(r["metric"] < 1e-4 for r in lbfgs), [(r["problem"], r["metric"]) for r in lbfgs]
  return timed


def test_small_config_with_jaxopt(tmp_path):
  pytest.importorskip("jaxopt")
  payload = runner.run(SMALL, out_dir=str(tmp_path), quiet=True, plot=False)
  timed = _check_rows(payload["rows"], {"bilevel_jax", "jaxopt"})
  for row in timed:
    assert row["speedup"] > 0
  # Same solver family, same settings: the same iterate for GD, so the same error.
  for ours, peer in zip(timed[::2], timed[1::2]):
    assert (ours["impl"], peer["impl"]) == ("bilevel_jax", "jaxopt")
    if ours["method"] == "gd":
      np.testing.assert_allclose(ours["metric"], peer["metric"], rtol=1e-6)
  matched = [r for r in payload["rows"] if r["per"] == "matched_accuracy"]
  assert matched and all("peer_setting" in r and r["speedup"] > 0 for r in matched)
  assert payload["peer"]["jaxopt"]["status"].startswith("jaxopt 0.")
  assert os.path.exists(tmp_path / (runner.result_stem(SMALL) + ".json"))


def test_small_config_skips_missing_jaxopt(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "jaxopt", None)  # `import jaxopt` raises ImportError
  assert suite.import_jaxopt() is None
  payload = runner.run(SMALL, out_dir=str(tmp_path), quiet=True, plot=False)
  timed = _check_rows(payload["rows"], {"bilevel_jax"})
  assert all("speedup" not in r for r in payload["rows"])
  status = payload["peer"]["jaxopt"]["status"]
  assert status.startswith("skipped: jaxopt is not installed") and "[peers]" in status
  assert any(note.startswith("jaxopt: skipped") for note in payload["notes"])
  assert len(timed) == 6


@pytest.mark.parametrize("path", [SMALL, FULL])
def test_configs_validate(path):
  _, name, cfg = runner.read_config(path)
  assert name == "implicit_peers"
  assert cfg["problems"]["names"] == list(suite.PROBLEMS)


def test_full_quadratic_is_benchopts_default():
  _, _, cfg = runner.read_config(FULL)
  q = cfg["quadratic"]
  assert (q["n_samples"], q["dim_inner"], q["dim_outer"], q["random_state"]) == (
    1024,
    100,
    100,
    2442,
  )
  assert (q["mu"], q["L_cross_inner"], q["L_cross_outer"]) == (0.1, 0.1, 0.1)


def _tiny(name, **overrides):
  cfg = config.validate({name: overrides}, suite.SCHEMA, "test")
  return suite.BUILDERS[name](cfg[name])


@pytest.mark.parametrize(
  "name, overrides",
  [
    ("ridge", dict(n_train=40, n_val=20, dim=5)),
    ("logistic", dict(n_train=40, n_val=20, dim=4)),
    ("quadratic", dict(n_samples=50, dim_inner=6, dim_outer=4)),
  ],
)
def test_references_match_an_exact_implicit_hypergradient(name, overrides):
  """Each problem's reference (closed form, or NumPy Newton) agrees with our
  implicit hypergradient solved by Newton to machine precision."""
  problem = _tiny(name, **overrides)
  _, grad = implicit.hypergradient(
    lambda x, y: problem.upper(x, y, problem.data),
    lambda x, y: problem.lower(x, y, problem.data),
    problem.x,
    problem.y0,
    solver="newton",
    tol=1e-13,
    linear_solver="dense",
  )
  np.testing.assert_allclose(grad, problem.reference, rtol=1e-8, atol=1e-12)
  hess = jax.hessian(lambda y: problem.lower(problem.x, y, problem.data))(problem.y0)
  eigs = np.linalg.eigvalsh(np.asarray(hess))
  assert eigs[0] > 0 and problem.lipschitz >= eigs[-1] * (1 - 1e-12)


def test_quadratic_follows_benchopts_generator():
  """Structure of benchopt's oracle: H_in has spectrum within ~[mu, L] (an
  empirical covariance), H_out one (near) zero eigenvalue, the value
  function's Hessian is positive definite."""
  c = config.validate({}, suite.SCHEMA, "test")["quadratic"]
  inner = suite._benchopt_oracle(4000, 10, 8, 1.0, 1.0, 0.1, 0.1, 7)
  eigs = np.linalg.eigvalsh(inner["hess_inner"])
  assert 0.05 < eigs[0] and eigs[-1] < 1.3
  assert abs(np.linalg.eigvalsh(inner["hess_outer"])[0]) < 1e-12
  assert inner["cross"].shape == (8, 10)
  problem = suite._quadratic(dict(c, n_samples=64, dim_inner=8, dim_outer=6))
  assert problem.x.shape == (6,) and problem.y0.shape == (8,)


def test_matched_rows_pick_the_fastest_setting_below_each_target():
  def row(impl, size, median, metric):
    return {
      "problem": "p",
      "impl": impl,
      "method": "lbfgs",
      "size_name": "tol",
      "size": size,
      "per": "hypergradient",
      "median_s": median,
      "q25_s": median,
      "q75_s": median,
      "metric": metric,
    }

  rows = [
    row("bilevel_jax", 1e-2, 1.0, 1e-3),
    row("jaxopt", 1e-2, 2.0, 1e-3),
    row("bilevel_jax", 1e-8, 3.0, 1e-9),
    row("jaxopt", 1e-8, 9.0, 1e-9),
    row("jaxopt", 1e-6, 6.0, 1e-7),
  ]
  out = suite.matched_rows(rows, [1e-2, 1e-6, 1e-12])
  assert [(r["size"], r["setting"], r["peer_setting"], r["speedup"]) for r in out] == [
    (1e-2, "tol=0.01", "tol=0.01", 2.0),
    (1e-6, "tol=1e-08", "tol=1e-06", 2.0),
  ]
  assert jnp.isfinite(out[0]["median_s"])
