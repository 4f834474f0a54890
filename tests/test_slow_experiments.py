"""Heavy checks that the shipped configs reproduce the README's claims.

Deselected by default; run with ``python -m pytest -m slow``.
"""

import json
import os

import pytest

from experiments import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(name, tmp_path):
  out = tmp_path / name
  assert (
    cli.main(
      [
        "run",
        os.path.join(REPO, "configs", f"{name}.toml"),
        "--out",
        str(out),
        "--quiet",
        "--no-plot",
      ]
    )
    == 0
  )
  return json.loads((out / "results.json").read_text())["rows"]


def test_example1_config(tmp_path):
  rows = {(r["method"], r["K"], r["alpha"]): r for r in _run("example1", tmp_path)}
  assert abs(rows[("BDA", 64, "0.9/k")]["x"] - 1) < 2e-3
  for K in (8, 16, 64):
    assert abs(rows[("RHG", K, "0")]["x"] - 1.5) < 1e-2
  assert (
    rows[("BDA", 8, "0.5/k")]["x_err"]
    > rows[("BDA", 16, "0.5/k")]["x_err"]
    > rows[("BDA", 64, "0.5/k")]["x_err"]
  )


def test_hypercleaning_digits_config(tmp_path):
  rows = _run("hypercleaning_digits", tmp_path)
  bilevel = [r for r in rows if r["method"] in ("RHG", "T-RHG", "BDA")]
  baselines = {r["method"]: r["test_acc"] for r in rows if r not in bilevel}
  assert all(r["f1"] > 0.85 for r in bilevel)
  # Every bilevel method beats both non-oracle baselines.
  floor = max(baselines["validation set only"], baselines["all training data, uniform weights"])
  assert all(r["test_acc"] > floor for r in bilevel), (bilevel, baselines)
