"""Gradient consistency as a diagnostic (Definition 2.6).

A smoothing family {v_mu} is gradient consistent at x_bar if

    {} != limsup_{x -> x_bar, mu -> 0} grad v_mu(x) subset of partial v(x_bar),

the Clarke subdifferential. `consistency_check` samples x_k -> x_bar together
with mu_k -> 0 and reports dist(grad v_{mu_k}(x_k), partial v(x_bar)); the
distances should go to zero.

Practical choices (ours):

* Points: x_kj = x_bar + r_k u_kj with u_kj uniform on the unit sphere
  (j = 1..num_directions) and r_k = ``radii[k]`` (default r_k = mu_k, so x
  and mu go to their limits together), plus x_bar itself (j = 0).
* The Clarke subdifferential is the convex hull of generators G (rows), given
  by the user (``subdifferential``), or estimated from the definition
  partial v(x_bar) = conv{lim grad v(x_i) : x_i -> x_bar} by evaluating a
  user gradient of v (``reference_grad``, defined almost everywhere) at
  ``num_reference`` random points within ``sample_radius`` of x_bar. Without
  either, it falls back on the gradients of v_mu at the smallest mu and a
  radius of 10 sample_radius (a weaker, self-referential estimate, flagged by
  ``estimated_from = "smallest mu"``).
* dist(xi, conv G) = min_{w in simplex} ||G^T w - xi|| is computed by 500
  accelerated projected-gradient steps on the simplex weights.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import validation
from bilevel_jax._src.value import common


class ConsistencyResult(NamedTuple):
  """Attributes (K = len(mus), J = num_directions + 1, n = size of x):

    mus, radii: (K,) the schedules.
    distances: (K, J) dist(grad v_mu_k(x_kj), conv G).
    max_distance: (K,) the largest distance at each mu_k.
    gradients: (K, J, n) the gradients grad v_mu_k(x_kj) (x flattened).
    points: (K, J, n) the sample points.
    generators: (p, n) the rows G whose convex hull is partial v(x_bar).
    estimated_from: "user", "reference_grad" or "smallest mu".
  """
  mus: jax.Array
  radii: jax.Array
  distances: jax.Array
  max_distance: jax.Array
  gradients: jax.Array
  points: jax.Array
  generators: jax.Array
  estimated_from: str


def _project_simplex(w):
  """Euclidean projection onto {w >= 0, sum w = 1} (sort-based)."""
  n = w.shape[-1]
  u = jnp.sort(w)[::-1]
  css = jnp.cumsum(u) - 1.0
  idx = jnp.arange(1, n + 1, dtype=w.dtype)
  cond = u - css / idx > 0
  rho = jnp.sum(cond)
  theta = css[rho - 1] / rho.astype(w.dtype)
  return jnp.maximum(w - theta, 0.0)


def distance_to_hull(xi, generators, steps: int = 500):
  """min_{w in simplex} ||generators^T w - xi|| (FISTA on w)."""
  gen = generators
  lip = jnp.maximum(jnp.linalg.norm(gen, 2) ** 2, jnp.finfo(gen.dtype).tiny)
  w0 = jnp.full(gen.shape[0], 1.0 / gen.shape[0], gen.dtype)

  def step(carry, _):
    w, z, t = carry
    grad = gen @ (gen.T @ z - xi)
    w_new = _project_simplex(z - grad / lip)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    z_new = w_new + ((t - 1.0) / t_new) * (w_new - w)
    return (w_new, z_new, t_new), None

  (w, _, _), _ = jax.lax.scan(step, (w0, w0, jnp.ones((), gen.dtype)), None, length=steps)
  return jnp.linalg.norm(gen.T @ w - xi)


def _sphere(key, count, n, dtype):
  u = jax.random.normal(key, (count, n), dtype)
  return u / jnp.linalg.norm(u, axis=1, keepdims=True)


def consistency_check(value_fn: Callable, x_bar, *, mus, radii=None,
                      num_directions: int = 8, subdifferential=None,
                      reference_grad: Optional[Callable] = None,
                      sample_radius: float = 1e-6, num_reference: int = 64,
                      key=None) -> ConsistencyResult:
  """Distances of grad v_mu(x) to partial v(x_bar) as x -> x_bar, mu -> 0.

  Args:
    value_fn: (x, mu) -> v_mu(x) (or a solution with ``.value``); it is
      differentiated with `jax.grad`, so its custom rule is what is checked.
    x_bar: the point (pytree of float arrays).
    mus: decreasing smoothing parameters.
    radii: distances r_k of the sample points from x_bar (default mus).
    num_directions: random directions per mu_k.
    subdifferential: generators of partial v(x_bar), an array (p, n) (rows,
      x flattened), or None to estimate it.
    reference_grad: gradient of the exact v (x -> pytree like x), used to
      estimate the subdifferential when ``subdifferential`` is None.
    sample_radius: radius of the points used for that estimate.
    num_reference: number of such points.
    key: PRNG key (default PRNGKey(0)).

  Returns:
    `ConsistencyResult`.
  """
  if not callable(value_fn):
    raise TypeError(f"`value_fn` must be callable, got {type(value_fn).__name__}.")
  validation.check_float_leaves("x_bar", x_bar)
  num_directions = validation.check_positive_int("num_directions", num_directions)
  num_reference = validation.check_positive_int("num_reference", num_reference)
  validation.check_positive("mus", mus)
  validation.check_positive("sample_radius", sample_radius)
  flat_bar, unravel = ravel_pytree(x_bar)
  dtype, n = flat_bar.dtype, flat_bar.size
  mus = jnp.atleast_1d(jnp.asarray(mus, dtype))
  radii = mus if radii is None else jnp.atleast_1d(jnp.asarray(radii, dtype))
  if radii.shape != mus.shape:
    raise ValueError(f"`radii` must have the shape of `mus` {mus.shape}, got {radii.shape}.")
  key = jax.random.PRNGKey(0) if key is None else key
  k_dir, k_ref = jax.random.split(key)

  def grad_v(flat_x, mu):
    fn = lambda fx: common.as_scalar(common.value_of(value_fn(unravel(fx), mu)), dtype)
    return jax.grad(fn)(flat_x)

  dirs = _sphere(k_dir, mus.shape[0] * num_directions, n, dtype).reshape(
      mus.shape[0], num_directions, n)
  dirs = jnp.concatenate([jnp.zeros((mus.shape[0], 1, n), dtype), dirs], axis=1)
  points = flat_bar[None, None] + radii[:, None, None] * dirs
  # One compiled program per call (value_fn and the sizes are fixed here).
  grads = jax.jit(jax.vmap(lambda pts, mu: jax.vmap(lambda p: grad_v(p, mu))(pts)))(
      points, mus)

  if subdifferential is not None:
    gens = jnp.asarray(subdifferential, dtype)
    if gens.ndim == 1:
      gens = gens[:, None] if n == 1 else gens[None]
    if gens.ndim != 2 or gens.shape[1] != n:
      raise ValueError(f"`subdifferential` must have shape (p, {n}), got {gens.shape}.")
    source = "user"
  else:
    ref_points = flat_bar[None] + sample_radius * _sphere(k_ref, num_reference, n, dtype)
    if reference_grad is not None:
      gens = jax.vmap(lambda p: ravel_pytree(reference_grad(unravel(p)))[0])(ref_points)
      source = "reference_grad"
    else:
      ref_points = flat_bar[None] + 10 * sample_radius * _sphere(k_ref, num_reference, n, dtype)
      gens = jax.jit(jax.vmap(lambda p: grad_v(p, mus[-1])))(ref_points)
      source = "smallest mu"
    gens = gens.astype(dtype)
  dist = jax.jit(jax.vmap(jax.vmap(distance_to_hull, in_axes=(0, None)), in_axes=(0, None)))(
      grads, gens)
  return ConsistencyResult(mus=mus, radii=radii, distances=dist,
                           max_distance=jnp.max(dist, axis=1), gradients=grads,
                           points=points, generators=gens, estimated_from=source)
