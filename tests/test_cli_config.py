"""Configs validate; the CLI runs one end to end and reports bad keys clearly."""

import glob
import json
import os

import pytest

from experiments import cli
from experiments import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EXPERIMENT_CONFIGS = sorted(
  p
  for p in glob.glob(os.path.join(REPO, "configs", "**", "*.toml"), recursive=True)
  if "/bench/" not in p
)
BENCH_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "bench", "*.toml")))


@pytest.mark.parametrize("path", BENCH_CONFIGS)
def test_benchmark_configs_validate(path):
  """A config naming a `suite` validates against it (`python -m benchmarks`); the
  others against the SCHEMA of their standalone script in benchmarks/."""
  import importlib.util
  from benchmarks import runner

  raw = config.read_toml(path)
  if "suite" in raw:
    runner.read_config(path)
    return
  name = os.path.splitext(os.path.basename(path))[0]
  script = os.path.join(REPO, "benchmarks", f"bench_{name}.py")
  spec = importlib.util.spec_from_file_location(f"bench_{name}", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  raw.pop("description", None)
  config.validate(raw, module.SCHEMA, path)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS)
def test_every_shipped_config_validates(path):
  module, name, cfg = cli.load_experiment_config(path)
  assert name in cli._experiments()
  assert set(cfg) == set(module.SCHEMA)


def _write(tmp_path, text, name="exp.toml"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_unknown_key_names_key_and_file(tmp_path):
  path = _write(tmp_path, 'experiment = "example1"\n[lower]\nK = [4]\nstep_size = 0.1\n')
  with pytest.raises(config.ConfigError, match=r"exp\.toml: unknown key `step_size` in \[lower\]"):
    cli.load_experiment_config(path)


@pytest.mark.parametrize(
  "body, match",
  [
    ("[lower]\nK = [0]", r"\[lower\] `K` = \[0\] must be > 0"),
    ('[lower]\nupper_lr = "fast"', r"\[lower\] `upper_lr` = 'fast' must be a number"),
    ('[lower]\nalphas = ["2/k"]', r"`alphas`"),
    ('[upper]\noptimizer = "lbfgs"', r"`optimizer` = 'lbfgs' must be one of"),
    ("[solver]\nx = 1", r"unknown section \[solver\]"),
  ],
)
def test_bad_values_name_the_key(tmp_path, body, match):
  path = _write(tmp_path, 'experiment = "example1"\n' + body + "\n")
  with pytest.raises(config.ConfigError, match=match):
    cli.load_experiment_config(path)


def test_unknown_experiment_and_missing_file(tmp_path):
  with pytest.raises(config.ConfigError, match="unknown experiment 'nope'"):
    cli.load_experiment_config(_write(tmp_path, 'experiment = "nope"\n'))
  with pytest.raises(config.ConfigError, match="does not exist"):
    cli.load_experiment_config(str(tmp_path / "missing.toml"))


def test_cli_error_exit_code(tmp_path, capsys):
  path = _write(tmp_path, 'experiment = "example1"\n[lower]\nbogus = 1\n')
  assert cli.main(["run", path]) == 2
  assert "unknown key `bogus`" in capsys.readouterr().err


def test_cli_run_writes_results(tmp_path, capsys):
  path = _write(
    tmp_path,
    """
experiment = "example1"
[lower]
K = [4, 8]
alphas = ["0.9/k", 0]
[upper]
steps = 10
[figures]
enabled = false
""",
  )
  out = tmp_path / "out"
  assert cli.main(["run", path, "--out", str(out), "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "| method" in printed and "RHG" in printed and "BDA" in printed
  payload = json.loads((out / "results.json").read_text())
  assert len(payload["rows"]) == 4
  assert payload["machine"]["jax"]
  assert len(payload["histories"]["BDA K=8 alpha=0.9/k"]["x_err"]) == 10
  assert (out / "table.md").exists()


def test_cli_list(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  assert cli.main(["list"]) == 0
  assert "quickstart.toml" in capsys.readouterr().out


# Slow (12 s, two experiments end to end): the CLI's run path is also covered by
# the few-shot and value experiment tests and the README's quick start.
@pytest.mark.slow
def test_cli_hypercleaning_and_quadratic_small(tmp_path, capsys):
  hc = _write(
    tmp_path,
    """
experiment = "hypercleaning"
[data]
dataset = "digits"
n_train = 200
n_val = 20
[lower]
K = [10]
truncate = 5
[upper]
steps = 5
[baselines]
steps = 50
""",
    "hc.toml",
  )
  assert cli.main(["run", hc, "--out", str(tmp_path / "hc"), "--quiet", "--no-plot"]) == 0
  rows = json.loads((tmp_path / "hc" / "results.json").read_text())["rows"]
  assert [r["method"] for r in rows[:3]] == ["RHG", "T-RHG", "BDA"]
  assert all(0 <= r["test_acc"] <= 100 for r in rows)
  assert rows[3]["method"] == "validation set only"
  quad = _write(
    tmp_path,
    """
experiment = "quadratic"
[lower]
K = [1, 400]
alphas = [0]
theorem2 = false
""",
    "quad.toml",
  )
  assert cli.main(["run", quad, "--out", str(tmp_path / "q"), "--quiet", "--no-plot", "--x64"]) == 0
  rows = json.loads((tmp_path / "q" / "results.json").read_text())["rows"]
  assert rows[0]["rel_error"] > 0.1 and rows[1]["rel_error"] < 1e-8
  capsys.readouterr()


def test_python_dash_m_entry_point():
  import subprocess
  import sys

  out = subprocess.run(
    [sys.executable, "-m", "experiments", "list", "--dir", os.path.join(REPO, "configs")],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
    cwd=REPO,
  )
  assert "example1" in out.stdout


@pytest.mark.parametrize(
  "content, match",
  [
    (b'experiment = "example1"\n# \xff\xfe latin-1 bytes\n', "not a UTF-8 text file"),
    (b'experiment = "example1"\n[lower]\nupper_lr = nan\n', "must be a finite number"),
    (b'experiment = "example1"\n[upper]\nlearning_rate = -inf\n', "upper.*learning_rate"),
  ],
)
def test_unreadable_or_non_finite_config_is_one_named_line(tmp_path, capsys, content, match):
  path = tmp_path / "bad.toml"
  path.write_bytes(content)
  assert cli.main(["run", str(path), "--quiet", "--no-plot"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "bad.toml" in err
  assert __import__("re").search(match, err), err


def test_config_folder_and_out_file_are_named(tmp_path, capsys):
  assert cli.main(["run", str(tmp_path)]) == 2
  assert "is a folder" in capsys.readouterr().err
  out_file = tmp_path / "taken"
  out_file.write_text("")
  quick = os.path.join(REPO, "configs", "quickstart.toml")
  assert cli.main(["run", quick, "--out", str(out_file), "--quiet", "--no-plot"]) == 2
  assert "--out" in capsys.readouterr().err
