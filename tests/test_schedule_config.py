"""Every schedule of `bilevel_jax.schedules` can be written in a config, and a
bad schedule table is one ConfigError naming its key."""

import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import schedules
from experiments import cli
from experiments import config

KS = jnp.arange(1, 40)


def _write(tmp_path, alphas: str):
  path = tmp_path / "exp.toml"
  path.write_text(f'experiment = "example1"\n[lower]\nupper_lr = 0.7\nalphas = {alphas}\n')
  return str(path)


@pytest.mark.parametrize(
  "table, expected",
  [
    ({"schedule": "constant", "value": 0.3}, schedules.constant(0.3)),
    ({"schedule": "harmonic", "c": 0.9}, schedules.harmonic(0.9)),
    ({"schedule": "geometric", "alpha0": 0.5, "decay": 0.9}, schedules.geometric(0.5, 0.9)),
    (
      {"schedule": "theorem2", "sigma": 1.0, "smoothness": 1.0, "gamma": 1.0},
      schedules.theorem2(upper_lr=0.7, sigma=1.0, smoothness=1.0, gamma=1.0),
    ),
    (
      {"schedule": "theorem2", "sigma": 0.5, "smoothness": 2.0, "upper_lr": 0.3, "epsilon": 0.1},
      schedules.theorem2(upper_lr=0.3, sigma=0.5, smoothness=2.0, epsilon=0.1),
    ),
  ],
)
def test_each_schedule_table_builds_the_library_schedule(table, expected):
  built = config.alpha_schedule(config.parse_schedule(table), upper_lr=0.7)
  np.testing.assert_allclose(built(KS), expected(KS), rtol=1e-6)


def test_strings_and_numbers_still_work():
  np.testing.assert_allclose(config.alpha_schedule("0.5/k")(KS), 0.5 / KS, rtol=1e-6)
  assert config.alpha_schedule(0.5) == 0.5 and config.alpha_schedule("0") == 0.0
  assert config.alpha_label("0.9/k") == "0.9/k" and config.alpha_is_zero(0)
  label = config.alpha_label({"schedule": "theorem2", "sigma": 1.0, "smoothness": 1.0})
  assert label == "theorem2(sigma=1, smoothness=1)"
  assert not config.alpha_is_zero({"schedule": "harmonic", "c": 0.5})
  assert config.alpha_is_zero({"schedule": "constant", "value": 0})


def test_theorem2_table_in_a_config_file(tmp_path):
  path = _write(
    tmp_path, '["0.5/k", { schedule = "theorem2", sigma = 1.0, smoothness = 1.0, gamma = 1.0 }]'
  )
  _, _, cfg = cli.load_experiment_config(path)
  table = cfg["lower"]["alphas"][1]
  assert table == {"schedule": "theorem2", "sigma": 1.0, "smoothness": 1.0, "gamma": 1.0}
  alpha = config.alpha_schedule(table, upper_lr=cfg["lower"]["upper_lr"])
  beta = schedules.theorem2_beta(0.7, 1.0, 1.0)
  np.testing.assert_allclose(alpha(jnp.array([1, 10])), [0.99, 2 / (10 * (1 - beta))], rtol=1e-6)


@pytest.mark.parametrize(
  "alphas, match",
  [
    ("[{ sigma = 1.0 }]", r"`alphas`.*needs the key `schedule`"),
    ('[{ schedule = "cosine" }]', r"`alphas`.*`schedule` = 'cosine' must be one of"),
    (
      '[{ schedule = "theorem2", sigma = 1.0, smoothnes = 1.0 }]',
      r"`alphas`.*unknown key `smoothnes` for schedule 'theorem2'",
    ),
    ('[{ schedule = "theorem2", sigma = 1.0 }]', r"needs the key `smoothness`"),
    ('[{ schedule = "harmonic", c = "big" }]', r"`c` = 'big' must be a finite number"),
    ('[{ schedule = "harmonic", c = 1.5 }]', r"schedule 'harmonic'.*`c` must lie in"),
    (
      '[{ schedule = "theorem2", sigma = 2.0, smoothness = 1.0 }]',
      r"`sigma` \(2.0\) cannot exceed `smoothness`",
    ),
    ('[{ schedule = "theorem2", sigma = 1.0, smoothness = 1.0, gamma = 2.0 }]', r"`gamma`"),
  ],
)
def test_bad_schedule_tables_name_the_key(tmp_path, alphas, match):
  with pytest.raises(config.ConfigError, match=match):
    cli.load_experiment_config(_write(tmp_path, alphas))


def test_theorem2_step_too_large_for_the_experiment_is_named():
  table = {"schedule": "theorem2", "sigma": 1.0, "smoothness": 3.0}
  with pytest.raises(config.ConfigError, match=r"theorem2.*`upper_lr` must be <= 2 / "):
    config.alpha_schedule(table, upper_lr=0.7)  # 2 / (3 + 1) = 0.5 < 0.7
  assert float(config.alpha_schedule(table, upper_lr=0.5)(jnp.array(1))) == pytest.approx(0.99)


def test_example1_with_theorem2_schedule_from_a_config(tmp_path, capsys):
  """Example 1 at K = 16: Theorem 2's schedule (sigma = L_F = 1, exact for
  F = (x - y_2)^2/2 + (y_1 - 1)^2/2) reaches x* = 1; 0.5/k stops short."""
  import json

  path = tmp_path / "ex1.toml"
  path.write_text(
    'experiment = "example1"\n[lower]\nK = [16]\n'
    'alphas = ["0.5/k", { schedule = "theorem2", sigma = 1.0, smoothness = 1.0, gamma = 1.0 }]\n'
    "[upper]\nsteps = 200\n[figures]\nenabled = false\n"
  )
  out = tmp_path / "out"
  assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--no-plot"]) == 0
  summary = json.loads((out / "results.json").read_text())["summary"]["K16"]
  assert abs(summary["theorem2"]["x"] - 1.0) < 1e-3 and summary["theorem2"]["F_gap"] < 1e-6
  assert abs(summary["0p5_k"]["x"] - 1.0) > 0.05
  capsys.readouterr()
