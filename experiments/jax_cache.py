"""JAX's persistent compilation cache for the CLI, the benchmarks, the
examples and the tests: the one place that sets it up.

A program whose XLA compile took at least ``BILEVEL_JAX_CACHE_MIN_COMPILE_S``
seconds (default 0.5) is written to a directory, and a later process that
compiles the same program (same jaxpr, shapes, dtypes, JAX version, XLA flags
and device) loads it instead of compiling it again: a second run of a config,
of an example or of the test suite (and the `-m extended` run after the
default one, and every pytest-xdist worker) reuses what the first compiled.
Loaded executables are those XLA compiled; the results are the same.

    from experiments import jax_cache
    jax_cache.enable()          # before the first jit call

Environment:
  BILEVEL_JAX_CACHE_DIR: the directory (default ``.jax_cache/`` in the
    repository, gitignored).
  BILEVEL_JAX_NO_CACHE=1: opt out (nothing is read or written).
  BILEVEL_JAX_CACHE_MIN_COMPILE_S: the compile-time threshold in seconds.
  BILEVEL_JAX_CACHE_MAX_MB: bound on the directory (default 2048); when
    `enable(prune=True)` finds it larger, the least recently written entries
    are deleted until it is under half the bound. (JAX's own bound,
    ``jax_compilation_cache_max_size``, needs the ``filelock`` package.)

Importing `bilevel_jax` never changes JAX's configuration; only a call to
`enable` does, in the process that makes it.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, ".jax_cache")
DEFAULT_MIN_COMPILE_S = 0.5
DEFAULT_MAX_MB = 2048.0


def cache_dir() -> str:
  """The cache directory: ``$BILEVEL_JAX_CACHE_DIR`` or ``<repo>/.jax_cache``."""
  return os.environ.get("BILEVEL_JAX_CACHE_DIR") or DEFAULT_DIR


def disabled() -> bool:
  """``BILEVEL_JAX_NO_CACHE`` is set to something other than "", "0", "false"."""
  return os.environ.get("BILEVEL_JAX_NO_CACHE", "").strip().lower() not in ("", "0", "false", "no")


def size_mb(path: str | None = None) -> float:
  """Megabytes of the files in the cache directory (0 if there is none)."""
  path = path or cache_dir()
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # removed by another process meanwhile
        pass
  return total / 2**20


def prune(path: str | None = None, max_mb: float | None = None) -> int:
  """Deletes the oldest entries (by modification time) while the directory
  is over ``max_mb`` (default ``$BILEVEL_JAX_CACHE_MAX_MB`` or 2048), down
  to half of it; returns the number of files deleted."""
  path = path or cache_dir()
  if max_mb is None:
    max_mb = float(os.environ.get("BILEVEL_JAX_CACHE_MAX_MB", DEFAULT_MAX_MB))
  if not os.path.isdir(path) or size_mb(path) <= max_mb:
    return 0
  entries = []
  for name in os.listdir(path):
    full = os.path.join(path, name)
    try:
      stat = os.stat(full)
    except OSError:
      continue
    if os.path.isfile(full):
      entries.append((stat.st_mtime, stat.st_size, full))
  entries.sort()
  total = sum(size for _, size, _ in entries)
  removed = 0
  for _, size, full in entries:
    if total <= max_mb * 2**20 / 2:
      break
    try:
      os.remove(full)
      total -= size
      removed += 1
    except OSError:
      pass
  return removed


def enable(path: str | None = None, *, prune_first: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache in this process.

  Returns the directory, or None when ``BILEVEL_JAX_NO_CACHE`` opts out.
  ``prune_first``: bound the directory first (`prune`); pass False from
  processes that run beside others on the same directory (pytest-xdist
  workers), where only the first process should delete.
  """
  if disabled():
    return None
  import jax

  path = path or cache_dir()
  os.makedirs(path, exist_ok=True)
  if prune_first:
    prune(path)
  min_s = float(os.environ.get("BILEVEL_JAX_CACHE_MIN_COMPILE_S", DEFAULT_MIN_COMPILE_S))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
  return path


def active() -> str | None:
  """The directory JAX's persistent cache uses in this process, or None
  (recorded beside benchmark results: with a warm cache, a compile time is
  the time to load the program, not to compile it)."""
  import jax

  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir
