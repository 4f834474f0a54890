"""Atomic save and load of upper-loop state (pytrees of arrays) as .npz.

A save writes a temporary file in the target's folder and renames it over the
target (`os.replace` is atomic on POSIX and Windows), so an interrupted save
leaves the previous checkpoint intact, never a truncated one.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np


def save(path: str, trees: dict[str, Any], meta: dict[str, Any]) -> None:
  """Writes each pytree's leaves and the scalar ``meta`` entries to ``path``."""
  arrays = {}
  for name, tree in trees.items():
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
      arrays[f"{name}/{i}"] = np.asarray(leaf)
  for key, value in meta.items():
    arrays[f"meta/{key}"] = np.asarray(value)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as handle:
      np.savez(handle, **arrays)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load(path: str, templates: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a checkpoint, rebuilding each pytree on the structure of its template.

  Raises:
    ValueError: if the file does not match the templates (another run's file).
  """
  with np.load(path) as data:
    stored = {key: data[key] for key in data.files}
  trees = {}
  for name, template in templates.items():
    leaves, treedef = jax.tree_util.tree_flatten(template)
    keys = [f"{name}/{i}" for i in range(len(leaves))]
    extra = [k for k in stored if k.startswith(name + "/") and k not in keys]
    if any(k not in stored for k in keys) or extra:
      raise ValueError(f"checkpoint {path!r} does not match this run: `{name}` "
                       f"has a different structure. Delete it or pick another path.")
    new_leaves = []
    for key, leaf in zip(keys, leaves):
      value = stored[key]
      if value.shape != np.shape(leaf):
        raise ValueError(f"checkpoint {path!r} does not match this run: a leaf "
                         f"of `{name}` has shape {value.shape}, expected "
                         f"{np.shape(leaf)}.")
      new_leaves.append(jax.numpy.asarray(value, dtype=jax.numpy.result_type(leaf)))
    trees[name] = jax.tree_util.tree_unflatten(treedef, new_leaves)
  meta = {k[len("meta/"):]: v for k, v in stored.items() if k.startswith("meta/")}
  return trees, meta
