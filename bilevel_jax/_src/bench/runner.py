"""``bilevel-jax bench CONFIG``: run a benchmark suite, write JSON, markdown, plot.

A benchmark config names its suite at the top level (``suite = "scaling"``)
and sets keys in sections that the suite's ``SCHEMA`` validates, like an
experiment config. The runner adds what every result needs to be read later:
the machine, the device, the JAX version, the commit and the thread settings.

Every suite returns rows with (a subset of) these keys:

  problem, impl ("bilevel_jax" or the peer's name), method, size_name, size,
  per ("hypergradient", "upper_iteration", "instance", ...), compile_s,
  median_s, q25_s, q75_s, min_s, max_s, repeats, peak_rss_mib,
  device_peak_mib, compiled_mib, metric_name, metric, speedup (peer median /
  our median, on the peer's row and on ours), and on a GPU roofline_s,
  roofline_fraction.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from typing import Any, Callable

from bilevel_jax._src import config
from bilevel_jax._src import report

SUITES = ("scaling", "hypercleaning_peers", "implicit_peers", "composite_peers")


@dataclasses.dataclass
class Context:
  """What a suite may use besides its config."""
  config_path: str
  out_dir: str
  quiet: bool = False
  setup_peers: bool = False
  peers: bool = True

  partial_path: str = ""

  def log(self, message: str) -> None:
    if not self.quiet:
      print(message, file=sys.stderr, flush=True)

  def save_partial(self, rows: list[dict]) -> None:
    """Writes the rows so far (``"partial": true``), so that a run stopped
    by a time limit still leaves its finished sections behind."""
    if self.partial_path:
      from bilevel_jax._src.bench import measure
      report.write_json(self.partial_path, {"config": self.config_path, "partial": True,
                                            "machine": measure.machine(), "rows": rows})


@dataclasses.dataclass
class SuiteResult:
  title: str
  columns: list[str]
  rows: list[dict]
  notes: list[str] = dataclasses.field(default_factory=list)
  figures: dict[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)


def read_config(path: str) -> tuple[Any, str, dict]:
  """Returns (suite module, suite name, validated config)."""
  if not os.path.exists(path):
    raise config.ConfigError(f"config file {path!r} does not exist.")
  with open(path, "rb") as handle:
    try:
      raw = config.tomllib.load(handle)
    except config.tomllib.TOMLDecodeError as err:
      raise config.ConfigError(f"{path}: not valid TOML: {err}") from None
  name = raw.pop("suite", None)
  raw.pop("description", None)
  if name is None:
    raise config.ConfigError(f"{path}: missing top-level key `suite` (one of {list(SUITES)}).")
  if name not in SUITES:
    raise config.ConfigError(f"{path}: unknown suite {name!r}; known: {list(SUITES)}.")
  module = importlib.import_module(f"bilevel_jax._src.bench.suites.{name}")
  return module, name, config.validate(raw, module.SCHEMA, path)


def standalone_script(config_path: str) -> str | None:
  """``benchmarks/bench_<stem>.py`` for a config without a ``suite`` key.

  A few benchmarks are standalone scripts (sharding needs its XLA_FLAGS set
  before JAX starts, so it must be its own process); the runner starts them
  with the same interpreter, so that one command runs every benchmark.
  """
  stem = os.path.splitext(os.path.basename(config_path))[0]
  config_dir = os.path.dirname(os.path.abspath(config_path))
  for root in (os.path.dirname(os.path.dirname(config_dir)), os.getcwd()):
    script = os.path.join(root, "benchmarks", f"bench_{stem}.py")
    if os.path.exists(script):
      return script
  return None


def run_standalone(config_path: str) -> int:
  """Runs the standalone script of a config; returns its exit status."""
  import subprocess
  script = standalone_script(config_path)
  if script is None:
    raise config.ConfigError(f"{config_path}: missing top-level key `suite` (one of "
                             f"{list(SUITES)}), and no benchmarks/bench_<name>.py script "
                             "matches its name.")
  print(f"bilevel-jax bench: {config_path} is run by its script {script}", file=sys.stderr,
        flush=True)
  return subprocess.run([sys.executable, script, config_path], check=False).returncode


def result_stem(config_path: str) -> str:
  from bilevel_jax._src.bench import measure
  stem = os.path.splitext(os.path.basename(config_path))[0]
  return f"{stem}_{measure.device_tag()}"


def run(config_path: str, *, out_dir: str = os.path.join("benchmarks", "results"),
        quiet: bool = False, setup_peers: bool = False, peers: bool = True,
        plot: bool = True) -> dict:
  """Runs the suite a config names and writes ``<stem>_<device>.{json,md,png}``."""
  module, name, cfg = read_config(config_path)
  if getattr(module, "X64", False):
    import jax
    jax.config.update("jax_enable_x64", True)
  from bilevel_jax._src.bench import measure
  stem = os.path.join(out_dir, result_stem(config_path))
  ctx = Context(config_path=config_path, out_dir=out_dir, quiet=quiet,
                setup_peers=setup_peers, peers=peers, partial_path=stem + ".json")
  ctx.log(f"bilevel-jax bench: {config_path} (suite {name}) on {measure.device_tag()}")
  tic = time.perf_counter()
  result: SuiteResult = module.run(cfg, ctx)
  wall = time.perf_counter() - tic
  table = report.markdown_table(result.columns, result.rows)
  payload = {"config": config_path, "suite": name, "settings": cfg,
             "machine": measure.machine(), "wall_time_s": wall, "title": result.title,
             "columns": result.columns, "rows": result.rows, "notes": result.notes,
             **result.extra}
  report.write_json(stem + ".json", payload)
  with open(stem + ".md", "w") as handle:
    handle.write(f"# {result.title}\n\n{markdown_footer(payload)}\n\n{table}\n\n"
                 + "\n\n".join(result.notes) + "\n")
  print(f"\n{result.title}\n\n{table}\n")
  for note in result.notes:
    print(note)
  figures = report.save_figures(out_dir, {os.path.basename(stem) + "_" + k: v
                                          for k, v in result.figures.items()}) if plot else []
  print(f"\nwrote {stem}.json, {stem}.md" + (f" and {len(figures)} PNG figure(s)"
                                              if figures else "") + f" in {wall:.1f} s")
  return payload


def markdown_footer(payload: dict) -> str:
  m = payload["machine"]
  return (f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m.get('cpu_affinity')} usable), "
          f"device {m['device']} ({m['backend']}); JAX {m['jax']}; commit {m['commit']}; "
          f"x64 {m['x64']}. Regenerate: `bilevel-jax bench {payload['config']}`.")
