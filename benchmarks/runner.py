"""``python -m benchmarks CONFIG``: run a benchmark suite, write JSON, markdown, plot.

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

import argparse
import dataclasses
import importlib
import os
import sys
import time
from typing import Any
from collections.abc import Callable

from experiments import config
from experiments import report

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
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
      from benchmarks import timing

      report.write_json(
        self.partial_path,
        {"config": self.config_path, "partial": True, "machine": timing.machine(), "rows": rows},
      )


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
  raw = config.read_toml(path)
  name = raw.pop("suite", None)
  raw.pop("description", None)
  if name is None:
    raise config.ConfigError(f"{path}: missing top-level key `suite` (one of {list(SUITES)}).")
  if name not in SUITES:
    raise config.ConfigError(f"{path}: unknown suite {name!r}; known: {list(SUITES)}.")
  module = importlib.import_module(f"benchmarks.suites.{name}")
  return module, name, config.validate(raw, module.SCHEMA, path)


def standalone_script(config_path: str) -> str | None:
  """``benchmarks/bench_<stem>.py`` for a config without a ``suite`` key.

  A few benchmarks are standalone scripts (sharding needs its XLA_FLAGS set
  before JAX starts, so it must be its own process); the runner starts them
  with the same interpreter, so that one command runs every benchmark.
  """
  stem = os.path.splitext(os.path.basename(config_path))[0]
  script = os.path.join(SCRIPTS_DIR, f"bench_{stem}.py")
  return script if os.path.exists(script) else None


def run_standalone(config_path: str) -> int:
  """Runs the standalone script of a config; returns its exit status."""
  import subprocess

  script = standalone_script(config_path)
  if script is None:
    raise config.ConfigError(
      f"{config_path}: missing top-level key `suite` (one of "
      f"{list(SUITES)}), and no benchmarks/bench_<name>.py script "
      "matches its name."
    )
  print(f"benchmarks: {config_path} is run by its script {script}", file=sys.stderr, flush=True)
  return subprocess.run(
    [sys.executable, script, os.path.abspath(config_path)], check=False
  ).returncode


def result_stem(config_path: str) -> str:
  from benchmarks import timing

  stem = os.path.splitext(os.path.basename(config_path))[0]
  return f"{stem}_{timing.device_tag()}"


def run(
  config_path: str,
  *,
  out_dir: str = os.path.join("benchmarks", "results"),
  quiet: bool = False,
  setup_peers: bool = False,
  peers: bool = True,
  plot: bool = True,
) -> dict:
  """Runs the suite a config names and writes ``<stem>_<device>.{json,md,png}``."""
  module, name, cfg = read_config(config_path)
  if getattr(module, "X64", False):
    import jax

    jax.config.update("jax_enable_x64", True)
  from benchmarks import timing

  stem = os.path.join(out_dir, result_stem(config_path))
  ctx = Context(
    config_path=config_path,
    out_dir=out_dir,
    quiet=quiet,
    setup_peers=setup_peers,
    peers=peers,
    partial_path=stem + ".json",
  )
  ctx.log(f"benchmarks: {config_path} (suite {name}) on {timing.device_tag()}")
  tic = time.perf_counter()
  result: SuiteResult = module.run(cfg, ctx)
  wall = time.perf_counter() - tic
  table = report.markdown_table(result.columns, result.rows)
  payload = {
    "config": config_path,
    "suite": name,
    "settings": cfg,
    "machine": timing.machine(),
    "wall_time_s": wall,
    "title": result.title,
    "columns": result.columns,
    "rows": result.rows,
    "notes": result.notes,
    **result.extra,
  }
  report.write_json(stem + ".json", payload)
  with open(stem + ".md", "w") as handle:
    handle.write(
      f"# {result.title}\n\n{markdown_footer(payload)}\n\n{table}\n\n"
      + "\n\n".join(result.notes)
      + "\n"
    )
  print(f"\n{result.title}\n\n{table}\n")
  for note in result.notes:
    print(note)
  figures = (
    report.save_figures(
      out_dir, {os.path.basename(stem) + "_" + k: v for k, v in result.figures.items()}
    )
    if plot
    else []
  )
  print(
    f"\nwrote {stem}.json, {stem}.md"
    + (f" and {len(figures)} PNG figure(s)" if figures else "")
    + f" in {wall:.1f} s"
  )
  return payload


def markdown_footer(payload: dict) -> str:
  m = payload["machine"]
  return (
    f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m.get('cpu_affinity')} usable), "
    f"device {m['device']} ({m['backend']}); JAX {m['jax']}; commit {m['commit']}; "
    f"x64 {m['x64']}. Regenerate: `python -m benchmarks {payload['config']}`."
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks",
    description="Runs the benchmark a TOML config in configs/bench/ names.",
  )
  parser.add_argument("config")
  parser.add_argument(
    "--out",
    default=os.path.join("benchmarks", "results"),
    help="output folder (default benchmarks/results)",
  )
  parser.add_argument("--quiet", action="store_true", help="no progress lines")
  parser.add_argument("--no-plot", action="store_true", help="skip the PNG figure")
  parser.add_argument("--x64", action="store_true", help="enable float64")
  parser.add_argument(
    "--setup-peers",
    action="store_true",
    help="create missing peer virtual environments (needs the package index)",
  )
  parser.add_argument("--no-peers", action="store_true", help="run our side only")
  args = parser.parse_args(argv)
  try:
    if "suite" not in config.read_toml(args.config):
      return run_standalone(args.config)
    if args.x64:
      import jax

      jax.config.update("jax_enable_x64", True)
    config.check_out_dir(args.out)
    run(
      args.config,
      out_dir=args.out,
      quiet=args.quiet,
      setup_peers=args.setup_peers,
      peers=not args.no_peers,
      plot=not args.no_plot,
    )
  except config.ConfigError as err:
    print(f"python -m benchmarks: error: {err}", file=sys.stderr)
    return 2
  return 0
