"""Command line of the paper experiments, run from a clone of the repository.

``python -m experiments run CONFIG`` runs the experiment a TOML config in
``configs/`` describes; ``python -m experiments list`` lists the configs.
Benchmarks have their own: ``python -m benchmarks CONFIG``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from experiments import config
from experiments import report


def _experiments():
  from experiments import example1, hypercleaning, quadratic
  from experiments import value_doublewell, value_example1, value_hyper, value_nonsmooth
  from experiments import value_unbounded

  value_experiments = {
    m.__name__.rsplit(".", 1)[-1]: m
    for m in (value_doublewell, value_example1, value_hyper, value_nonsmooth, value_unbounded)
  }
  from experiments import fewshot
  from experiments import elasticnet, poisoning

  return {
    "example1": example1,
    "hypercleaning": hypercleaning,
    "quadratic": quadratic,
    "fewshot": fewshot,
    "elasticnet": elasticnet,
    "poisoning": poisoning,
    **value_experiments,
  }


def load_experiment_config(path: str):
  """Reads and validates a config; returns (experiment module, name, cfg)."""
  name, raw = config.read(path)
  experiments = _experiments()
  if name not in experiments:
    raise config.ConfigError(f"{path}: unknown experiment {name!r}; known: {sorted(experiments)}.")
  module = experiments[name]
  return module, name, config.validate(raw, module.SCHEMA, path)


def cmd_run(args) -> int:
  module, name, cfg = load_experiment_config(args.config)
  if args.x64 or getattr(module, "X64", False):
    import jax

    jax.config.update("jax_enable_x64", True)
  stem = os.path.splitext(os.path.basename(args.config))[0]
  out_dir = args.out or os.path.join("runs", stem)
  config.check_out_dir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  print(
    f"experiments: running {args.config} (experiment {name}) -> {out_dir}",
    file=sys.stderr,
    flush=True,
  )
  tic = time.perf_counter()
  result = module.run(cfg, quiet=args.quiet)
  wall = time.perf_counter() - tic
  table = report.markdown_table(result.columns, result.rows)
  print(f"\n{result.title}\n")
  print(table)
  for note in result.notes:
    print(f"\n{note}")
  payload = {
    "config": args.config,
    "experiment": name,
    "settings": cfg,
    "machine": report.machine_info(),
    "wall_time_s": wall,
    "title": result.title,
    "rows": result.rows,
    "notes": result.notes,
    "histories": result.histories,
    **result.extra,
  }
  report.write_json(os.path.join(out_dir, "results.json"), payload)
  with open(os.path.join(out_dir, "table.md"), "w") as handle:
    handle.write(f"# {result.title}\n\n{table}\n\n" + "\n".join(result.notes) + "\n")
  pngs = [] if args.no_plot else report.save_figures(out_dir, result.figures)
  print(
    f"\nwrote {out_dir}/results.json, {out_dir}/table.md"
    + (
      f" and {len(pngs)} PNG figure(s)"
      if pngs
      else " (install matplotlib for figures)"
      if result.figures and not args.no_plot
      else ""
    )
    + f" in {wall:.1f} s"
  )
  return 0


def cmd_list(args) -> int:
  paths = sorted(glob.glob(os.path.join(args.dir, "**", "*.toml"), recursive=True))
  bench = [p for p in paths if os.sep + "bench" + os.sep in p]
  paths = [p for p in paths if p not in bench]
  if not paths:
    print(f"no configs under {args.dir}/")
    return 1
  for path in paths:
    try:
      _, name, _ = load_experiment_config(path)
      description = config.description(path)
      print(f"{path:45s} {name:14s} {description}")
    except config.ConfigError as err:
      print(f"{path:45s} INVALID: {err}")
  from benchmarks import runner

  for path in bench:
    try:
      _, suite, _ = runner.read_config(path)
      print(f"{path:45s} {'bench:' + suite:14s} {config.description(path)}")
    except config.ConfigError:
      print(f"{path:45s} {'bench:script':14s} {config.description(path)}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  run_p = sub.add_parser("run", help="run the experiment a TOML config describes")
  run_p.add_argument("config")
  run_p.add_argument("--out", help="output folder (default runs/<config name>)")
  run_p.add_argument("--quiet", action="store_true", help="no progress lines")
  run_p.add_argument("--no-plot", action="store_true", help="skip PNG figures")
  run_p.add_argument("--x64", action="store_true", help="enable float64")
  run_p.set_defaults(func=cmd_run)
  list_p = sub.add_parser("list", help="list the configs in a folder")
  list_p.add_argument("--dir", default="configs")
  list_p.set_defaults(func=cmd_list)
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except config.ConfigError as err:
    print(f"python -m experiments: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
