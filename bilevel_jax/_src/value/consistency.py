"""Gradient consistency as a diagnostic (Definition 2.6).

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

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
  accelerated projected-gradient steps on the simplex weights (the library's
  one FISTA, `bilevel_jax._src.fista`, with the fixed step 1/||G||_2^2 and no
  restart).
* The gradients are those of ``value_fn``'s own derivative rule; when it
  returns a solution (`entropic`, `quadratic`), its ``info.status`` at each
  sample point is recorded and passed on (``info.inner_status``): a distance
  computed from an inaccurate value function is not evidence either way.
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import fista as fista_lib
from bilevel_jax._src import sampling
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import validation
from bilevel_jax._src.value import common


class ConsistencyInfo(NamedTuple):
  """Diagnostics of `consistency_check` (all arrays).

  Attributes:
    num_steps: FISTA steps of each distance computation (the fixed ``steps``).
    status: NONFINITE when a gradient or a distance is not finite, else
      INNER_FAILED when ``value_fn`` reported a failure at a sample point,
      else SUCCESS (`bilevel_jax.Status`). Whether the distances go to zero
      is the user's verdict (``max_distance``), not a status.
    inner_status: the first non-SUCCESS status of ``value_fn`` over the
      sample points (row-major over (mu_k, j), then the reference points when
      the generators come from the smallest mu), SUCCESS otherwise.
    inner_failures: number of gradient evaluations whose status failed.
    inner_statuses: (K, J) the status of ``value_fn`` at each sample point
      (SUCCESS where it returns a bare value).
  """

  num_steps: jax.Array
  status: jax.Array
  inner_status: jax.Array
  inner_failures: jax.Array
  inner_statuses: jax.Array


class ConsistencySolution(NamedTuple):
  """Attributes (K = len(mus), J = num_directions + 1, n = size of x):

  mus, radii: (K,) the schedules.
  distances: (K, J) dist(grad v_mu_k(x_kj), conv G).
  max_distance: (K,) the largest distance at each mu_k.
  gradients: (K, J, n) the gradients grad v_mu_k(x_kj) (x flattened).
  points: (K, J, n) the sample points.
  generators: (p, n) the rows G whose convex hull is partial v(x_bar).
  estimated_from: "user", "reference_grad" or "smallest mu" (a str: this
    diagnostic runs eagerly, it is not a jit-compiled entry point).
  info: `ConsistencyInfo`.
  """

  mus: jax.Array
  radii: jax.Array
  distances: jax.Array
  max_distance: jax.Array
  gradients: jax.Array
  points: jax.Array
  generators: jax.Array
  estimated_from: str
  info: ConsistencyInfo


def distance_to_hull(xi, generators, steps: int = 500):
  """min_{w in simplex} ||generators^T w - xi|| (``steps`` FISTA steps on w).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import value
    >>> float(value.distance_to_hull(jnp.array([2.0]), jnp.array([[-1.0], [1.0]])))
    1.0
  """
  steps = validation.check_positive_int("steps", steps)
  gen = generators
  lip = jnp.maximum(jnp.linalg.norm(gen, 2) ** 2, jnp.finfo(gen.dtype).tiny)
  w0 = jnp.full(gen.shape[0], 1.0 / gen.shape[0], gen.dtype)
  state = fista_lib.fista(
    fista_lib.project_simplex,
    w0,
    grad=lambda z: gen @ (gen.T @ z - xi),
    lipschitz=lip,
    max_steps=steps,
    tol=None,
    restart=None,
  )
  return jnp.linalg.norm(gen.T @ state.x - xi)


def _first_failure(statuses):
  """First non-SUCCESS entry (row-major) of an int array, SUCCESS if none."""
  flat = jnp.ravel(statuses)
  failed = flat != status_lib.SUCCESS
  return jnp.where(jnp.any(failed), flat[jnp.argmax(failed)], status_lib.SUCCESS).astype(jnp.int32)


def consistency_check(
  value_fn: Callable,
  x_bar,
  *,
  mus,
  radii=None,
  num_directions: int = 8,
  subdifferential=None,
  reference_grad: Callable | None = None,
  sample_radius: float = 1e-6,
  num_reference: int = 64,
  key=None,
  steps: int = 500,
  throw: bool = False,
) -> ConsistencySolution:
  """Distances of grad v_mu(x) to partial v(x_bar) as x -> x_bar, mu -> 0.

  Args:
    value_fn: (x, mu) -> v_mu(x) (or a solution with ``.value`` and
      ``.info.status``); it is differentiated with `jax.grad`, so its custom
      rule is what is checked.
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
    steps: FISTA steps of each distance to the hull (`distance_to_hull`).
    throw: raise `SolverError` when the status is not SUCCESS (see
      `bilevel_jax.Status`).

  Returns:
    `ConsistencySolution`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import value
    >>> # v(x) = -|x|, partial v(0) = [-1, 1]; v_mu(x) = -sqrt(x^2 + mu^2).
    >>> fn = lambda x, mu: -jnp.sqrt(x * x + mu * mu)
    >>> sol = value.consistency_check(fn, 0.0, mus=jnp.array([1e-1, 1e-2]),
    ...                               subdifferential=jnp.array([[-1.0], [1.0]]))
    >>> float(jnp.max(sol.distances)) < 1e-8, int(sol.info.status)
    (True, 0)
  """
  if not callable(value_fn):
    raise TypeError(f"`value_fn` must be callable, got {type(value_fn).__name__}.")
  common.check_variable("x_bar", x_bar)
  num_directions = validation.check_positive_int("num_directions", num_directions)
  num_reference = validation.check_positive_int("num_reference", num_reference)
  steps = validation.check_positive_int("steps", steps)
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

  # The statuses in a forward pass (and a program) of their own: taking them
  # from the gradient pass (has_aux) or compiling both into one program
  # changes XLA's fusion and the gradients by rounding.
  status_v = lambda flat_x, mu: common.status_of(value_fn(unravel(flat_x), mu))
  per_point = lambda fn: jax.jit(jax.vmap(lambda pts, mu: jax.vmap(lambda p: fn(p, mu))(pts)))

  dirs = sampling.sphere(k_dir, mus.shape[0] * num_directions, n, dtype).reshape(
    mus.shape[0], num_directions, n
  )
  dirs = jnp.concatenate([jnp.zeros((mus.shape[0], 1, n), dtype), dirs], axis=1)
  points = flat_bar[None, None] + radii[:, None, None] * dirs
  # One compiled program per call (value_fn and the sizes are fixed here).
  grads = per_point(grad_v)(points, mus)
  example = jax.eval_shape(lambda p, m: value_fn(unravel(p), m), flat_bar, mus[0])
  has_status = getattr(getattr(example, "info", None), "status", None) is not None
  if has_status:
    statuses = per_point(status_v)(points, mus)
  else:  # a bare value: nothing to pass on
    statuses = jnp.full(points.shape[:2], status_lib.SUCCESS, jnp.int32)
  all_statuses = [jnp.ravel(statuses)]

  if subdifferential is not None:
    gens = jnp.asarray(subdifferential, dtype)
    if gens.ndim == 1:
      gens = gens[:, None] if n == 1 else gens[None]
    if gens.ndim != 2 or gens.shape[1] != n:
      raise ValueError(f"`subdifferential` must have shape (p, {n}), got {gens.shape}.")
    source = "user"
  else:
    ref_points = flat_bar[None] + sample_radius * sampling.sphere(k_ref, num_reference, n, dtype)
    if reference_grad is not None:
      gens = jax.vmap(lambda p: ravel_pytree(reference_grad(unravel(p)))[0])(ref_points)
      source = "reference_grad"
    else:
      ref_points = flat_bar[None] + 10 * sample_radius * sampling.sphere(
        k_ref, num_reference, n, dtype
      )
      gens = jax.jit(jax.vmap(lambda p: grad_v(p, mus[-1])))(ref_points)
      if has_status:
        all_statuses.append(jax.jit(jax.vmap(lambda p: status_v(p, mus[-1])))(ref_points))
      source = "smallest mu"
    gens = gens.astype(dtype)
  dist = jax.jit(
    jax.vmap(
      jax.vmap(lambda xi, g: distance_to_hull(xi, g, steps), in_axes=(0, None)), in_axes=(0, None)
    )
  )(grads, gens)
  flat_statuses = jnp.concatenate(all_statuses)
  inner_status = _first_failure(flat_statuses)
  finite = jnp.all(jnp.isfinite(dist)) & jnp.all(jnp.isfinite(grads)) & jnp.all(jnp.isfinite(gens))
  own = jnp.where(finite, status_lib.SUCCESS, status_lib.NONFINITE)
  info = ConsistencyInfo(
    num_steps=jnp.asarray(steps, jnp.int32),
    status=status_lib.with_inner(own, inner_status),
    inner_status=inner_status,
    inner_failures=jnp.sum(flat_statuses != status_lib.SUCCESS).astype(jnp.int32),
    inner_statuses=statuses,
  )
  status_lib.raise_if_failed(info.status, throw=throw, where="value.consistency_check")
  return ConsistencySolution(
    mus=mus,
    radii=radii,
    distances=dist,
    max_distance=jnp.max(dist, axis=1),
    gradients=grads,
    points=points,
    generators=gens,
    estimated_from=source,
    info=info,
  )
