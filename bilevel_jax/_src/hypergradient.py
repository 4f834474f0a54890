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

from typing import Callable

import jax


def make(hypergradient_fn: Callable, *problem, jit: bool = True, **options) -> Callable:
  """``fn(x, y0, **data) -> (value, grad, solution)`` of ``hypergradient_fn(*problem,
  x, y0, return_info=True, **options, **data)``, jitted unless ``jit=False``.

  ``data`` are the per-call keywords of the method (``bda``'s
  ``upper_batches``, ``lower_batches``, ``key``): arrays that change from
  one upper step to the next without recompiling."""

  def fn(x, y0, **data):
    return hypergradient_fn(*problem, x, y0, return_info=True, **options, **data)

  return jax.jit(fn) if jit else fn
