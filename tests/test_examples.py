"""The scripts in examples/ run at their smallest size (``--small``).

Slow-marked: each loads its data set and compiles an unrolled hypergradient
(tens of seconds on two shared CPU cores); run with ``-m slow``."""

import importlib.util
import os

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_data_reweighting_small(capsys):
  pytest.importorskip("mlxtend")
  rows = _load("data_reweighting").main(["--small"])
  assert [r[0][:3] for r in rows] == ["uni", "cle", "RHG", "BDA"]
  assert all(0.0 <= r[1] <= 1.0 for r in rows)  # test accuracy
  assert all(0.0 <= r[2] <= 1.0 and r[3] > 0 for r in rows[2:])  # F1, ms per step
  assert "F1 corrupted" in capsys.readouterr().out


@pytest.mark.slow
def test_learn_optimizer_hyperparameters_small(capsys):
  pytest.importorskip("sklearn")
  result = _load("learn_optimizer_hyperparameters").main(["--small"])
  assert np.isfinite(result["lr"]) and np.isfinite(result["weight_decay"])
  assert result["lr"] != pytest.approx(1e-3)  # the hypergradient moved it
  assert "learning rate" in capsys.readouterr().out
