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

`jacobian_columns` reads off the jaxpr of G whether each of its entries is
computed from one entry of y (G separable in y: the elastic net's
e^l1 (y, -y), bounds on y), so that grad_y G^T Q grad_y G is a scatter-add
(`linalg.jtqj`).  Also conservative: an unknown primitive on y means "not
separable", so a structure it reports is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


# ------------------------------------------------- separable G: one column per row

# Elementwise primitives: output entry i reads input entries i (after broadcasting).
_ELEMENTWISE = frozenset(
  """neg exp exp2 log log1p expm1 sin cos tan tanh logistic abs sqrt rsqrt cbrt sign floor
  ceil round integer_pow square convert_element_type copy copy_p reduce_precision
  stop_gradient add add_any sub mul div max min pow atan2 select_n nextafter rem
  erf erfc erf_inv lgamma digamma is_finite""".split()
)
# Primitives that only move entries: applied to the map of columns itself.
_STRUCTURAL = frozenset(
  "broadcast_in_dim concatenate slice split reshape squeeze expand_dims transpose rev".split()
)
NONE, MANY = -1, -2  # no y entry; several (or unknown)


def _combine(maps, shape):
  out = np.full(shape, NONE, np.int64)
  for m in maps:
    m = np.broadcast_to(m, shape)
    out = np.where(out == NONE, m, np.where((m == NONE) | (m == out), out, MANY))
  return out


def _column_maps(jaxpr, in_maps):
  """Per outvar, an int array of its shape: the one entry of y it reads, NONE
  or MANY, propagated through elementwise and structural primitives (any
  other primitive that reads y gives MANY)."""
  env = {}

  def read(v):
    if not _is_var(v):
      return np.full(np.shape(v.val), NONE, np.int64)
    return env.get(v, np.full(v.aval.shape, NONE, np.int64))

  for v, m in zip(jaxpr.invars, in_maps):
    env[v] = m
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    shapes = [v.aval.shape for v in eqn.outvars]
    name = eqn.primitive.name
    if all(np.all(m == NONE) for m in ins):
      outs = [np.full(s, NONE, np.int64) for s in shapes]
    elif name in _ELEMENTWISE and len(shapes) == 1:
      outs = [_combine(ins, shapes[0])]
    elif name in _STRUCTURAL:
      # The same primitive on the maps (int arrays, concrete: evaluated now).
      with jax.ensure_compile_time_eval():  # also under an outer trace
        arrays = [jnp.asarray(m, jnp.int32) for m in ins]
        res = eqn.primitive.bind(*arrays, **eqn.params)
      res = res if eqn.primitive.multiple_results else [res]
      outs = [
        np.asarray(r, np.int64) if np.shape(r) == sh else np.full(sh, MANY, np.int64)
        for r, sh in zip(res, shapes)
      ]
    elif _inner_jaxpr(eqn) is not None:
      outs = _column_maps(_inner_jaxpr(eqn), ins)
    else:
      outs = [np.full(s, MANY, np.int64) for s in shapes]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def jacobian_columns(fn, args: tuple, wrt: int):
  """For fn(*args) -> (s,) and args[wrt] a vector y: the (s,) int array c with
  row i of d fn / d y zero outside column c[i] (c[i] = 0 where the row is
  zero), when the jaxpr shows it (fn separable in y: each output entry
  computed from one entry of y by elementwise and structural primitives);
  else None.  Read off the jaxpr, so exact when not None."""
  closed = jax.make_jaxpr(fn)(*args)
  in_maps = []
  for i, arg in enumerate(args):
    for leaf in jax.tree_util.tree_leaves(arg):
      shape = np.shape(leaf)
      in_maps.append(
        np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        if i == wrt
        else np.full(shape, NONE, np.int64)
      )
  if len(in_maps) != len(closed.jaxpr.invars):
    return None
  (out,) = _column_maps(closed.jaxpr, in_maps)
  if out.ndim != 1 or np.any(out == MANY):
    return None
  return np.where(out == NONE, 0, out)
