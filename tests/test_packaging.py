"""The installed package is the library only: no harness in the wheel, no stray imports."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = re.compile(r"(^|/)(bench|benchmarks?|experiments?|peers?|suites|cli)(/|\.py$|_)")
# Harness and peer code may appear nowhere; the optional extras (scikit-learn
# and mlxtend for `bilevel_jax.data`) only inside the function that needs them.
HARNESS_IMPORT = re.compile(
  r"^\s*(import|from)\s+(torch|torchopt|betty|boat|cvxpy|jaxopt|experiments|benchmarks)\b", re.M
)
TOP_LEVEL_OPTIONAL = re.compile(
  r"^(import|from)\s+(sklearn|mlxtend|matplotlib|equinox|flax)\b", re.M
)


def test_wheel_holds_the_library_only(tmp_path):
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "-q", "-w", str(tmp_path)],
    check=True,
    timeout=300,
    capture_output=True,
  )
  (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
  with zipfile.ZipFile(tmp_path / wheel) as archive:
    names = archive.namelist()
    sources = {n: archive.read(n).decode() for n in names if n.endswith(".py")}
  packages = {n.split("/")[0] for n in names}
  assert packages <= {
    "bilevel_jax",
    wheel.split("-")[0] + "-" + wheel.split("-")[1] + ".dist-info",
  }, packages
  assert not [n for n in names if HARNESS.search(n)], [n for n in names if HARNESS.search(n)]
  offenders = {
    n: m.group(0).strip()
    for n, text in sources.items()
    if (m := HARNESS_IMPORT.search(text) or TOP_LEVEL_OPTIONAL.search(text))
  }
  assert not offenders, offenders
  assert "bilevel_jax/_src/unrolled.py" in names and "bilevel_jax/py.typed" in names


def _dependency_closure(dist: str) -> set[str]:
  """Normalized names of ``dist``'s requirements, transitively, without extras."""
  seen, todo = set(), [dist]
  while todo:
    name = todo.pop()
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for text in requires:
      req = Requirement(text)
      if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
      key = re.sub(r"[-_.]+", "-", req.name).lower()
      if key not in seen:
        seen.add(key)
        todo.append(req.name)
  return seen


def _modules_after(code: str) -> set[str]:
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      code + "\nimport sys, json\n"
      "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))",
    ],
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
    cwd="/",
  )
  return set(json.loads(out.stdout.splitlines()[-1]))


def test_import_loads_only_declared_dependencies():
  allowed_dists = _dependency_closure("bilevel_jax")
  assert {"jax", "optax", "chex", "numpy"} <= allowed_dists
  owners = importlib.metadata.packages_distributions()
  # What the dependencies themselves import (jax imports optional modules such
  # as cloudpickle when they are installed) is theirs, not ours.
  baseline = _modules_after("import jax, optax, chex, numpy")
  loaded = _modules_after("import bilevel_jax") - baseline
  loaded -= set(sys.stdlib_module_names) | {"bilevel_jax"}
  stray = {
    m
    for m in loaded
    if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed_dists for d in owners.get(m, []))
  }
  # Compiled submodules of allowed packages (e.g. jaxlib's `_jax`) have no owner entry.
  stray = {m for m in stray if not m.startswith("_")}
  assert not stray, f"importing bilevel_jax loads undeclared modules: {sorted(stray)}"


def test_ci_floor_constraints_are_the_declared_floors():
  """.ci/run installs .ci/floor-constraints.txt for its minimum-version job:
  the pins must be exactly pyproject.toml's `>=` floors, so what CI tests is
  what the package promises."""
  try:
    import tomllib
  except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
    declared = tomllib.load(handle)["project"]["dependencies"]
  floors = {}
  for text in declared:
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate():
      (spec,) = [s for s in req.specifier if s.operator == ">="]
      floors[req.name] = spec.version
  with open(os.path.join(REPO, ".ci", "floor-constraints.txt")) as handle:
    pins = dict(
      line.split("#")[0].strip().split("==") for line in handle if line.split("#")[0].strip()
    )
  assert pins == floors
