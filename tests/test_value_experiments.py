"""The four value-function experiments run end to end through the CLI on tiny
settings and report what they claim (full runs: configs/value_*.toml)."""

import json

import pytest

from bilevel_jax import Status
from experiments import cli

TINY_VFP = "[vfp]\nmus = [1e-1, 1e-2]\ninner_steps = 20\nouter_steps = 2\nrepeats = 1\n"
CASES = {
  "value_example1": (
    "[entropic]\npanels = 20\nlate_mus = [1e-1, 1e-2]\n[bda]\nsteps = 5\n" + TINY_VFP
  ),
  "value_nonsmooth": "[entropic]\npanels = 4\n[rate]\nmus = [1e-1, 1e-2]\n" + TINY_VFP,
  "value_doublewell": "[problem]\ngrid = 201\n[entropic]\npanels = 16\n[bda]\nsteps = 5\n"
  + TINY_VFP,
  "value_hyper": "[problem]\ndim = 6\nn_train = 10\nn_val = 10\ngrid = 3\n" + TINY_VFP,
}


@pytest.mark.parametrize(
  "name",
  [
    "value_doublewell",
    pytest.param("value_example1", marks=pytest.mark.slow),
    pytest.param("value_hyper", marks=pytest.mark.slow),
    pytest.param("value_nonsmooth", marks=pytest.mark.slow),
  ],
)
def test_value_experiment_runs(tmp_path, capsys, name):
  path = tmp_path / f"{name}.toml"
  path.write_text(f'experiment = "{name}"\n' + CASES[name])
  out = tmp_path / "out"
  assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--no-plot", "--x64"]) == 0
  payload = json.loads((out / "results.json").read_text())
  rows = payload["rows"]
  vfp_rows = [r for r in rows if r["method"].startswith("VFP")]
  assert vfp_rows and all(r["compile_s"] > 0 and r["run_s"] > 0 for r in vfp_rows)
  # The status column names the status (e.g. "not_stationary", "inner_failed (inaccurate)").
  names = {s.name.lower() for s in Status}
  assert all(r["status"].split(" ")[0].rstrip(",") in names for r in vfp_rows)
  for record in payload["per_mu"].values():
    assert record["mus"] == [0.1, 0.01] and len(record["lambdas"]) == 2
    assert all(lam >= 0 for lam in record["lambdas"])
    assert len(record["inner_statuses"]) == 2 and record["kkt_tol"] > 0
    assert record["status"].split(" ")[0] in names
  if name == "value_nonsmooth":
    assert set(payload["value_error"]) == {"mus", "entropic", "quadratic"}
  capsys.readouterr()


@pytest.mark.slow
def test_value_unbounded_experiment(tmp_path, capsys):
  """The unbounded-Y experiment (configs/value_unbounded.toml) on two mu_k:
  distances to partial v(0) = {0} vanish once r_mu exceeds the shift, stay
  near 1 for the fixed radius, and mu ln vol(Y_mu) is reported."""
  path = tmp_path / "value_unbounded.toml"
  path.write_text(
    'experiment = "value_unbounded"\n[consistency]\nmus = [1e-1, 1e-2]\nnum_directions = 2\n'
    "[ball]\nmus = [1e-1]\nnum_directions = 2\n"
  )
  out = tmp_path / "out"
  assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--no-plot", "--x64"]) == 0
  rows = json.loads((out / "results.json").read_text())["rows"]
  by = {(r["case"], r["Y_mu"], r["mu"]): r for r in rows}
  assert by[("abs(y - x - 4), m = 1", "log_radius", 0.1)]["max_distance"] > 0.9  # r = 3.4 < 4
  assert by[("abs(y - x - 4), m = 1", "log_radius", 0.01)]["max_distance"] < 1e-8  # r = 5.6 > 4
  assert by[("abs(y - x - 4), m = 1", "fixed r = 3", 0.01)]["max_distance"] > 0.9
  assert all(r["status"] == "success" and r["mu_log_volume"] > 0 for r in rows)
  box, ball = by[("norm(y - x), m = 2", "box", 0.1)], by[("norm(y - x), m = 2", "ball", 0.1)]
  assert ball["mu_log_volume"] < box["mu_log_volume"] and ball["nodes"] < box["nodes"]
  capsys.readouterr()
