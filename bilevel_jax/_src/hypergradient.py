"""The one builder of hypergradient functions for the upper-level drivers.

Every method has ``hypergradient(upper_fn, <lower problem>..., x, y0, *,
return_info=False, throw=False, **options)`` returning ``(value, grad)`` or,
with ``return_info=True``, ``(value, grad, solution)``: its `Solution` holds
the lower solution ``y`` and ``info`` (with ``status``).  `make` turns one of
them into the function that `bilevel_jax.upper.optimize` takes,

    fn(x, y0, **data) -> (value, grad, solution),

so the driver sees the lower status of every upper step (a lower solve that
hit ``max_steps`` is recorded, never dropped).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from bilevel_jax._src import variables


def make(hypergradient_fn: Callable, *problem, jit: bool = True, **options) -> Callable:
  """``fn(x, y0, **data) -> (value, grad, solution)`` of ``hypergradient_fn(*problem,
  x, y0, return_info=True, **options, **data)``, jitted unless ``jit=False``.

  ``data`` are the per-call keywords of the method (``bda``'s
  ``upper_batches``, ``lower_batches``, ``key``): arrays that change from
  one upper step to the next without recompiling."""

  def fn(x, y0, **data):
    return hypergradient_fn(*problem, x, y0, return_info=True, **options, **data)

  if not jit:
    return fn
  array_jitted = jax.jit(fn)
  module_jitted: list = []

  def jitted(x, y0, **data):
    # jax.jit takes arrays only; an Equinox module (its activation functions)
    # goes through equinox.filter_jit, imported only when one is passed.
    if _arrays_only((x, y0, data)):
      return array_jitted(x, y0, **data)
    if not module_jitted:
      try:
        import equinox
      except ImportError as err:  # pragma: no cover - a module implies equinox
        raise TypeError(
          "`x`/`y0` hold non-array leaves; pass arrays, or install "
          "equinox for models, or use make_hypergradient(..., jit=False) "
          "inside your own jit."
        ) from err
      module_jitted.append(equinox.filter_jit(fn))
    return module_jitted[0](x, y0, **data)

  return jitted


def _arrays_only(tree) -> bool:
  return all(variables.is_array_like(leaf) for leaf in jax.tree_util.tree_leaves(tree))
