"""Which derivatives of a composite lower level are constant, read off jaxprs.

The Newton matrix of (3.1) and the Schur complement of (3.6) are built from
hess_yy L(x, y, p) = hess_yy (g + <G, p>) and grad_y G(x, y).  When g is
quadratic and G affine in y (the elastic net of Section 6.1, QPs, linear
constraints) neither depends on (y, p), and a solve needs them once: at its
first Newton or interior-point step, then again in the derivative.

`depends_on` answers "does fn's output depend on these inputs?" by a
data-flow pass over the jaxpr of fn.  It is conservative: a primitive with a
sub-computation it does not look into (loops, conditionals) counts as
depending on all its inputs, so a True may be spurious (the solver then
recomputes, as it would anyway) but a False is exact.
"""

from __future__ import annotations

import jax
from jax.extend import core as jcore

# Primitives whose one sub-jaxpr maps inputs to outputs one to one.
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _inner_jaxpr(eqn):
  for name in _CALL_PARAMS:
    inner = eqn.params.get(name)
    if inner is None:
      continue
    inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
    if (
      hasattr(inner, "eqns")
      and len(inner.invars) == len(eqn.invars)
      and len(inner.outvars) == len(eqn.outvars)
    ):
      return inner
  return None


def _is_var(v) -> bool:
  return not isinstance(v, jcore.Literal)


def _propagate(jaxpr, dependent_in: list[bool]) -> list[bool]:
  """For each outvar of jaxpr, whether it depends on the flagged invars."""
  dep = {v for v, flag in zip(jaxpr.invars, dependent_in) if flag}
  for eqn in jaxpr.eqns:
    flags = [_is_var(v) and v in dep for v in eqn.invars]
    if not any(flags):
      continue
    inner = _inner_jaxpr(eqn)
    outs = _propagate(inner, flags) if inner is not None else [True] * len(eqn.outvars)
    dep.update(v for v, flag in zip(eqn.outvars, outs) if flag)
  return [_is_var(v) and v in dep for v in jaxpr.outvars]


def depends_on(fn, args: tuple, wrt: tuple[int, ...]) -> bool:
  """Whether the outputs of fn(*args) depend on the arguments ``wrt``."""
  closed = jax.make_jaxpr(fn)(*args)
  flags = []
  for i, arg in enumerate(args):
    flags += [i in wrt] * len(jax.tree_util.tree_leaves(arg))
  if len(flags) != len(closed.jaxpr.invars):  # unexpected flattening: assume yes
    return True
  return any(_propagate(closed.jaxpr, flags))
