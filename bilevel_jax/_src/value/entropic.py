"""Entropic value function (Section 4): a soft minimum of g over Y.

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

    v_mu(x) = -mu ln int_Y exp(-g_mu(x, y) / mu) dy                      (4.1)

is continuously differentiable (Proposition 4.1) with the Gibbs average

    grad v_mu(x) = int_Y alpha_mu(x, y) grad_x g_mu(x, y) dy,             (4.2)
    alpha_mu(x, y) = exp(-g_mu(x, y)/mu) / int_Y exp(-g_mu(x, z)/mu) dz.  (4.3)

No convexity in y is needed. For unbounded Y, (4.20) replaces Y by compact
Y_mu with Y_mu -> Y and mu ln vol(Y_mu) -> 0 (Theorem 4.13 and its footnote).

Practical choices (the paper has no algorithm; these are ours):

* The integral is replaced by a rule sum_i w_i exp(-g(x, y_i)/mu) and computed
  in log space, v = -mu logsumexp_i(ln w_i - g(x, y_i)/mu), so mu down to 1e-4
  and below neither overflows nor underflows, in float32 too. When mu is
  small against the squared node spacing, the sum is dominated by a few nodes
  and v_mu becomes the soft minimum over the nodes: still smooth in x, but
  the quadrature error grows; ``info.integration_error`` and
  ``info.effective_points`` (1 / sum alpha_i^2) show this.
* Rules (`rules.py`): composite tensor Gauss-Legendre for m <= 3 ("auto"),
  randomly shifted Halton points for m > 3, or user ``points``/``weights``.
* Error estimate: Gauss-Legendre rules are compared with the rule of half
  the order on the same panels (the estimate is that of the coarser rule, so
  it is conservative); QMC uses the spread of the R independent
  randomizations (standard error of the integral, times mu, by the delta
  method); user rules give NaN (no estimate).
* Unbounded Y: Y_mu = Y cap [-r_mu, r_mu]^m, the ball of radius r_mu in the
  max-norm (``truncation="box"``, the default), or, for Y = R^m, the
  Euclidean ball B_{r_mu}(0) of the footnote to Theorem 4.13
  (``truncation="ball"``), with a user schedule ``radius(mu)``. The ball has
  its own rules (`rules.ball_gauss_legendre`: polar or spherical coordinates
  for m <= 3; `rules.ball_from_cube`: Halton points mapped uniformly into the
  ball for m > 3), not a box rule times an indicator. Y cap ball for a Y with
  finite bounds is not a ball, so ``"ball"`` needs Y = R^m.
  Why the box serves the same theorems: Proposition 4.11, Theorem 4.13 and
  Lemmas 4.12-4.17 use of Y_mu only that it is compact, that Y_mu increases
  to Y as mu decreases (so (4.22) holds: the minimizers near x_bar lie in
  Y_mu0) and that mu ln vol(Y_mu) -> 0. With B_r the Euclidean ball,
  Y cap B_r subset Y cap [-r, r]^m subset Y cap B_{sqrt(m) r}, so the box is
  compact and increases to Y whenever r_mu increases to infinity, and
  ln vol(Y cap [-r, r]^m) <= m ln(2 r) differs from ln vol(B_r) by the
  constant m ln 2 - ln vol(B_1), which mu times sends to 0. The domination
  hypothesis of Lemmas 4.15-4.17 is on alpha_mu over subsets of Y, not on
  Y_mu. The ball only gives a smaller volume (ln vol(B_r) < m ln(2 r) for
  m >= 2), hence a smaller bias term mu ln vol(Y_mu).
  `log_radius` gives r_mu = r0 (1 + ln(1 + 1/mu)), for which
  vol(Y_mu) <= (2 r_mu)^m grows like (ln 1/mu)^m, so mu ln vol(Y_mu) -> 0 and
  vol(Y_mu) <= mu^-p eventually for any p > 0, as the footnote asks.
* ``info.mu_log_volume`` = mu ln vol(Y_mu) is the bias term of Theorem 4.13.
  Since int_{Y_mu} exp(-g/mu) <= vol(Y_mu) exp(-min_{Y_mu} g/mu),
  v_mu(x) >= min_{Y_mu} g_mu(x, .) - mu ln vol(Y_mu): the entropic value can
  lie below the minimum by up to mu ln vol(Y_mu) (a large volume at a large
  mu), which is what can make g_mu - v_mu <= eps infeasible in (VFP^mu_eps).
* The gradient (4.2)-(4.3) is attached by `implicit_diff.solution_map` (the
  library's one custom rule; here with nothing to solve): the forward pass
  keeps only its inputs and v; the backward pass recomputes g at the nodes and
  takes one vector-Jacobian product of sum_i alpha_i g(x, y_i). The same rule gives the
  exact derivatives in mu, (v - E_alpha g) / mu (+ E_alpha d g / d mu with
  ``pass_mu``), in the nodes (alpha_i grad_y g, so the box bounds are
  differentiable) and in arrays g closes over.
* By default g is evaluated at all N nodes at once (vmap): the (N, ...)
  intermediates of g then dominate memory in the forward pass as much as in
  a backward pass. ``batch_size`` evaluates chunks with `lax.map` and
  accumulates the backward VJP over chunks with `lax.scan`.
"""

from __future__ import annotations

import math
from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from bilevel_jax._src import implicit_diff
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import validation
from bilevel_jax._src.value import common
from bilevel_jax._src.value import rules

RULES = ("auto", "gauss-legendre", "halton", "points")
TRUNCATIONS = ("box", "ball")
# Default (order, panels) of the Gauss-Legendre rule by dimension m.
_GL_DEFAULTS = {1: (8, 32), 2: (6, 12), 3: (4, 6)}


class EntropicInfo(NamedTuple):
  """Diagnostics of `entropic` (all arrays).

  Attributes:
    num_steps: 1 (a quadrature rule, no iterations; the field is there so
      that every ``info`` has the same core fields).
    status: SUCCESS, NONFINITE, INACCURATE (integration_error > tol) or
      INVALID_INPUT (a traced ``mu`` that is not > 0) (`bilevel_jax.Status`).
    num_points: number of integration nodes.
    integration_error: estimate of |v_rule - v_mu| (see the module doc; NaN
      for user rules, which have none).
    max_weight: largest Gibbs weight alpha_i; near 1 the rule is too coarse
      for this mu.
    effective_points: 1 / sum alpha_i^2.
    mean_g: E_alpha[g(x, y)], the Gibbs average of g (>= v_mu).
    log_volume: ln vol(Y_mu) of the integration region (the box, or the
      ball with ``truncation="ball"``); for user rules ln sum_i w_i, the
      volume the rule assigns to its domain.
    mu_log_volume: mu ln vol(Y_mu), the term Theorem 4.13 requires to vanish
      as mu -> 0 (with `log_radius` it does). v_mu(x) >= min_{Y_mu} g_mu(x, .)
      - mu_log_volume, so a large mu ln vol(Y_mu) can put v_mu below every
      g_mu(x, y) by more than eps (see the module doc).
  """

  num_steps: jax.Array
  status: jax.Array
  num_points: jax.Array
  integration_error: jax.Array
  max_weight: jax.Array
  effective_points: jax.Array
  mean_g: jax.Array
  log_volume: jax.Array
  mu_log_volume: jax.Array


class EntropicSolution(NamedTuple):
  """``value`` = v_mu(x) (differentiable); ``y`` = the Gibbs mean
  E_alpha[y] (a soft argmin; not differentiated); ``info``."""

  value: jax.Array
  y: jax.Array
  info: EntropicInfo


def log_radius(r0: float = 10.0) -> Callable:
  """Radius schedule r_mu = r0 (1 + ln(1 + 1/mu)) for unbounded Y (Thm 4.13).

  r_mu increases to infinity as mu -> 0 while mu ln vol(Y_mu) -> 0.

  Examples:
    >>> from bilevel_jax import value
    >>> radius = value.log_radius(10.0)
    >>> [round(float(radius(mu)), 3) for mu in (1.0, 0.01)]
    [16.931, 56.151]
  """
  validation.check_positive("r0", r0)
  return lambda mu: r0 * (1.0 + jnp.log1p(1.0 / mu))


# ---------------------------------------------------------------- core rule
def _node_values(gp, p, mu, nodes, batch_size=None):
  """g at every node, shape (R, n); in chunks of ``batch_size`` nodes if set."""
  if batch_size is None:
    return jax.vmap(jax.vmap(lambda y: gp(p, y, mu)))(nodes)
  flat = nodes.reshape(-1, nodes.shape[-1])
  return jax.lax.map(lambda y: gp(p, y, mu), flat, batch_size=batch_size).reshape(nodes.shape[:2])


def _weighted_vjp(gp, p, mu, nodes, weights, batch_size):
  """VJP of (p, mu, nodes) -> g(p, nodes, mu) with cotangent ``weights`` (R, n),
  accumulated over chunks of ``batch_size`` nodes so that only one chunk's
  residuals are alive at a time."""
  shape = nodes.shape
  flat, w = nodes.reshape(-1, shape[-1]), weights.reshape(-1)
  pad = (-flat.shape[0]) % batch_size
  flat = jnp.concatenate([flat, jnp.broadcast_to(flat[:1], (pad, shape[-1]))])
  w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])
  chunks = flat.reshape(-1, batch_size, shape[-1])
  w_chunks = w.reshape(-1, batch_size)

  def body(acc, chunk):
    y, wc = chunk
    _, vjp = jax.vjp(lambda pp, mm, yy: jax.vmap(lambda yi: gp(pp, yi, mm))(yy), p, mu, y)
    d_p, d_mu, d_y = vjp(wc)
    acc = jax.tree_util.tree_map(jnp.add, acc, (d_p, d_mu))
    return acc, d_y

  zeros = jax.tree_util.tree_map(jnp.zeros_like, (p, mu))
  (d_p, d_mu), d_nodes = jax.lax.scan(body, zeros, (chunks, w_chunks))
  d_nodes = d_nodes.reshape(-1, shape[-1])[: shape[0] * shape[1]].reshape(shape)
  return d_p, d_mu, d_nodes


def _soft_min(gvals, mu, logw):
  """-mu logsumexp of the (R, n) logits pooled over the R randomizations."""
  logits = logw - gvals / mu
  per_rand = logsumexp(logits, axis=1)
  log_r = math.log(gvals.shape[0])
  total = logsumexp(per_rand) - log_r
  alpha = jnp.exp(logits - total - log_r)
  return -mu * total, alpha, per_rand - total


def _gibbs(gp, batch_size, p, mu, nodes, logw):
  """``(v, aux)`` of the rule, with the derivative (4.2)-(4.3) in (p, mu,
  nodes, logw) attached by `implicit_diff.solution_map`."""
  solve = lambda theta, start: _gibbs_fwd(gp, batch_size, *theta)
  adjoint = lambda theta, v, out_bar: _gibbs_bwd(gp, batch_size, theta, v, out_bar[0])
  return implicit_diff.solution_map(solve, adjoint, (p, mu, nodes, logw), ())


def _gibbs_fwd(gp, batch_size, p, mu, nodes, logw):
  gvals = _node_values(gp, p, mu, nodes, batch_size)
  v, alpha, rel = _soft_min(gvals, mu, logw)
  num_rand = nodes.shape[0]
  if num_rand > 1:
    rho = jnp.exp(rel)
    rel_se = jnp.std(rho, ddof=1) / math.sqrt(num_rand)
  else:
    rel_se = jnp.zeros_like(v)
  aux = (
    jnp.max(alpha),
    1.0 / jnp.sum(alpha * alpha),
    jnp.sum(alpha * gvals),
    jnp.einsum("rn,rnm->m", alpha, nodes),
    rel_se,
  )
  return (v, aux), v


def _gibbs_bwd(gp, batch_size, theta, v, ct):
  """Cotangents of (4.2)-(4.3): one VJP of sum_i alpha_i g(x, y_i)."""
  p, mu, nodes, logw = theta
  if batch_size is None:
    gvals, vjp = jax.vjp(lambda pp, mm, nn: _node_values(gp, pp, mm, nn), p, mu, nodes)
    _, alpha, _ = _soft_min(gvals, mu, logw)
    d_p, d_mu, d_nodes = vjp(ct * alpha)
  else:
    gvals = _node_values(gp, p, mu, nodes, batch_size)
    _, alpha, _ = _soft_min(gvals, mu, logw)
    d_p, d_mu, d_nodes = _weighted_vjp(gp, p, mu, nodes, ct * alpha, batch_size)
  mean_g = jnp.sum(alpha * gvals)
  d_mu = d_mu + ct * (v - mean_g) / mu
  d_logw = -mu * ct * alpha
  return d_p, d_mu, d_nodes, d_logw


# ---------------------------------------------------------------- the rule
def _check_box(box):
  if not (isinstance(box, (tuple, list)) and len(box) == 2):
    raise TypeError(f"`box` must be a pair (lower, upper) of 1-D arrays, got {type(box).__name__}.")
  lo, hi = (jnp.asarray(b) for b in box)
  if lo.ndim != 1 or lo.shape != hi.shape or lo.shape[0] == 0:
    raise ValueError(
      "`box` must be a pair of 1-D arrays of the same length m >= 1, "
      f"got shapes {lo.shape} and {hi.shape}."
    )
  clo, chi = validation.concrete_value(box[0]), validation.concrete_value(box[1])
  unbounded = False
  if clo is not None and chi is not None:
    clo, chi = np.asarray(clo, float), np.asarray(chi, float)
    bad = np.flatnonzero(~(clo < chi))
    if bad.size:
      i = bad[0]
      raise ValueError(
        f"`box`: lower bound must be below the upper bound, got "
        f"lower[{i}] = {clo[i]} >= upper[{i}] = {chi[i]}."
      )
    unbounded = bool(np.any(np.isinf(clo)) or np.any(np.isinf(chi)))
  return lo, hi, unbounded


def _per_axis(name, value, m):
  """An int or a sequence of m positive ints -> a tuple of m ints."""
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * m
  if len(values) != m:
    raise ValueError(f"`{name}` must be an int or a sequence of {m} ints, got {value!r}.")
  return tuple(validation.check_positive_int(name, v) for v in values)


def _gl_sizes(m, order, panels):
  d_order, d_panels = _GL_DEFAULTS.get(m, (3, 2))
  orders = _per_axis("order", order if order is not None else d_order, m)
  counts = _per_axis("panels", panels if panels is not None else d_panels, m)
  if min(orders) < 2:
    raise ValueError(f"`order` must be >= 2 (the error estimate halves it), got {order}.")
  return orders, counts


def _check_randomized(num_points, randomizations):
  num_points = validation.check_positive_int("num_points", num_points)
  randomizations = validation.check_positive_int("randomizations", randomizations)
  if randomizations < 2:
    raise ValueError(f"`randomizations` must be >= 2 for the error estimate, got {randomizations}.")
  return num_points, randomizations


def _ball_rule(box, mu, dtype, rule, order, panels, num_points, randomizations, key, radius):
  """Y_mu = B_{r_mu}(0) for Y = R^m (footnote to Theorem 4.13): nodes, log-weights,
  ln vol and the coarse GL rule, as `_box_rule`."""
  lo, hi, _ = _check_box(box)
  m = lo.shape[0]
  clo, chi = validation.concrete_value(box[0]), validation.concrete_value(box[1])
  if (
    clo is not None
    and chi is not None
    and not (np.all(np.isneginf(clo)) and np.all(np.isposinf(chi)))
  ):
    raise ValueError(
      "`truncation='ball'` needs Y = R^m (every `box` entry infinite): Y cap ball is "
      "not a ball for a Y with finite bounds; use `truncation='box'` there."
    )
  if radius is None:
    raise ValueError("`truncation='ball'` needs `radius` (a schedule such as `log_radius()`).")
  r = radius(mu) if callable(radius) else radius
  validation.check_positive("radius", r)
  r = jnp.asarray(r, dtype)
  log_vol = rules.log_ball_volume(m, jnp.log(r))
  if rule == "auto":
    rule = "gauss-legendre" if m <= 3 else "halton"
  if rule == "gauss-legendre":
    if m > 3:
      raise ValueError(
        f"`rule='gauss-legendre'` with `truncation='ball'` is for m <= 3, got m = {m}."
      )
    orders, counts = _gl_sizes(m, order, panels)
    out = []
    for qs in (orders, tuple(max(1, q // 2) for q in orders)):
      u, w = rules.ball_gauss_legendre(qs, counts)
      nodes = r * jnp.asarray(u, dtype)
      out.append((nodes[None], (jnp.log(jnp.asarray(w, dtype)) + m * jnp.log(r))[None]))
    return out[0], out[1], log_vol
  if rule == "halton":
    num_points, randomizations = _check_randomized(num_points, randomizations)
    key = jax.random.PRNGKey(0) if key is None else key
    u = rules.shifted_halton(key, m + 1, num_points, randomizations, dtype)
    nodes = r * rules.ball_from_cube(u)
    logw = jnp.full((randomizations, num_points), -math.log(num_points), dtype) + log_vol
    return (nodes, logw), None, log_vol
  raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}.")


def _box_rule(box, mu, dtype, rule, order, panels, num_points, randomizations, key, radius):
  """Nodes (R, n, m), log-weights (R, n), ln vol and the coarse GL rule."""
  lo, hi, unbounded = _check_box(box)
  m = lo.shape[0]
  lo, hi = lo.astype(dtype), hi.astype(dtype)
  if unbounded and radius is None:
    raise ValueError(
      "`box` is unbounded: pass `radius` (a schedule mu -> r_mu "
      "such as `log_radius()`, Theorem 4.13)."
    )
  if radius is not None:  # Y_mu = Y cap [-r_mu, r_mu]^m whenever a radius is given
    r = radius(mu) if callable(radius) else radius
    validation.check_positive("radius", r)
    r = jnp.asarray(r, dtype)
    lo, hi = jnp.maximum(lo, -r), jnp.minimum(hi, r)
  width = hi - lo
  log_vol = jnp.sum(jnp.log(width))
  if rule == "auto":
    rule = "gauss-legendre" if m <= 3 else "halton"
  if rule == "gauss-legendre":
    orders, counts = _gl_sizes(m, order, panels)
    out = []
    for qs in (orders, tuple(max(1, q // 2) for q in orders)):
      u, w = rules.gauss_legendre(qs, counts)
      nodes = lo[None] + width[None] * jnp.asarray(u, dtype)
      out.append((nodes[None], (jnp.log(jnp.asarray(w, dtype)) + log_vol)[None]))
    return out[0], out[1], log_vol
  if rule == "halton":
    num_points, randomizations = _check_randomized(num_points, randomizations)
    key = jax.random.PRNGKey(0) if key is None else key
    u = rules.shifted_halton(key, m, num_points, randomizations, dtype)
    nodes = lo[None, None] + width[None, None] * u
    logw = jnp.full((randomizations, num_points), -math.log(num_points), dtype) + log_vol
    return (nodes, logw), None, log_vol
  raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}.")


def _user_rule(points, weights, dtype):
  points = jnp.asarray(points, dtype)
  weights = jnp.asarray(weights, dtype)
  if points.ndim != 2 or weights.shape != points.shape[:1]:
    raise ValueError(
      f"`points` must have shape (N, m) and `weights` shape (N,), got "
      f"{points.shape} and {weights.shape}."
    )
  validation.check_positive("weights", weights)
  return points[None], jnp.log(weights)[None]


def entropic(
  g: Callable,
  x,
  *,
  mu,
  box=None,
  rule: str = "auto",
  order=None,
  panels=None,
  num_points: int = 2048,
  randomizations: int = 8,
  key=None,
  points=None,
  weights=None,
  radius=None,
  truncation: str = "box",
  pass_mu: bool = False,
  tol: float = 1e-4,
  batch_size: int | None = None,
  throw: bool = False,
) -> EntropicSolution:
  """Entropic value function v_mu(x) = -mu ln int_Y exp(-g(x, y)/mu) dy (4.1).

  Args:
    g: lower objective g_mu(x, y) -> scalar (already smoothed if g is
      nonsmooth, e.g. with `bilevel_jax.smoothing`); y is a vector of length m.
      With ``pass_mu=True`` it is called as g(x, y, mu).
    x: upper variable (a pytree of float arrays).
    mu: smoothing parameter > 0 (scalar; vmap over it for several).
    box: Y = [lower, upper], a pair of 1-D arrays of length m. Infinite
      entries make Y unbounded; then ``radius`` is required (Y_mu of (4.20)).
    rule: "auto" (Gauss-Legendre for m <= 3, Halton for m > 3),
      "gauss-legendre", "halton", or "points" (use ``points``/``weights``).
    order: Gauss-Legendre nodes per panel, an int or one per axis
      (defaults: m=1 8, m=2 6, m=3 4).
    panels: Gauss-Legendre panels per axis, an int or one per axis
      (defaults: m=1 32, m=2 12, m=3 6).
    num_points: Halton points per randomization.
    randomizations: the number R of random shifts (R * num_points
      evaluations of g).
    key: PRNG key for the shifts (default ``PRNGKey(0)``: deterministic).
    points: a user rule's nodes, an array (N, m).
    weights: the user rule's positive weights (N,), which include the
      volume (int ~ sum_i w_i f(y_i)).
    radius: schedule mu -> r_mu (or a number) for unbounded Y; see `log_radius`.
      When given, Y_mu = Y cap [-r_mu, r_mu]^m is used even if ``box`` is
      bounded (a box traced under jit cannot be inspected for infinities).
    truncation: the shape of Y_mu when ``radius`` is given: "box",
      Y cap [-r_mu, r_mu]^m (the max-norm ball), or "ball", the Euclidean
      ball B_{r_mu}(0) of the footnote to Theorem 4.13, for Y = R^m only
      (every ``box`` entry infinite; the entries of a box traced under jit are
      not inspected). "ball" uses a polar/spherical Gauss-Legendre rule for
      m <= 3 and Halton points mapped into the ball for m > 3. Both serve
      Theorem 4.13 (see the module doc); the ball has the smaller volume.
    pass_mu: call g(x, y, mu).
    tol: ``info.status`` is INACCURATE when the error estimate exceeds tol.
    batch_size: evaluate g (and its VJP in the backward pass) on chunks of
      this many nodes (`lax.map` / `lax.scan`) instead of all nodes at once,
      so memory is O(batch_size) evaluations of g rather than O(N).
    throw: raise `SolverError` when the status is not SUCCESS (see
      `bilevel_jax.Status`).

  Returns:
    `EntropicSolution` (value, y, info). ``value`` is differentiable by the
    rule (4.2)-(4.3); ``info.num_steps`` is 1 (no iterations).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import value
    >>> g = lambda x, y: x * y[0]   # v(x) = min_{|y|<=1} x y = -|x|; v_mu = v + O(mu ln(1/mu))
    >>> box = (jnp.array([-1.0]), jnp.array([1.0]))
    >>> sol = value.entropic(g, 0.5, mu=1e-3, box=box)
    >>> round(float(sol.value), 3), round(float(jax.grad(
    ...     lambda x: value.entropic(g, x, mu=1e-3, box=box).value)(0.5)), 3)
    (-0.494, -0.998)
    >>> # INACCURATE (4): at mu = 1e-3 the default rule's error estimate is above
    >>> # tol = 1e-4 (the value is still within 6e-4 of v_mu); refine ``panels``.
    >>> int(sol.info.status), float(sol.info.integration_error) > 1e-4
    (4, True)
  """
  g3 = common.lower_fn(g, pass_mu)
  common.check_mu(mu)
  common.check_variable("x", x)
  dtype = common.floating_dtype(x)
  mu = common.as_scalar(mu, dtype)
  if rule == "points" or points is not None:
    if points is None or weights is None:
      raise ValueError("`rule='points'` needs both `points` and `weights`.")
    (nodes, logw), coarse = _user_rule(points, weights, dtype), None
    log_vol = logsumexp(logw)
  else:
    if box is None:
      raise ValueError("`box` is required unless `points` and `weights` are given.")
    if truncation not in TRUNCATIONS:
      raise ValueError(f"`truncation` must be one of {TRUNCATIONS}, got {truncation!r}.")
    make_rule = _ball_rule if truncation == "ball" else _box_rule
    (nodes, logw), coarse, log_vol = make_rule(
      box, mu, dtype, rule, order, panels, num_points, randomizations, key, radius
    )
  common.check_g(g3, x, nodes[0, 0], mu)
  gp, consts = common.convert(g3, x, nodes[0, 0], mu)
  p = (x, consts)
  if batch_size is not None:
    batch_size = validation.check_positive_int("batch_size", batch_size)
  v, (max_w, ess, mean_g, mean_y, rel_se) = _gibbs(gp, batch_size, p, mu, nodes, logw)
  sg = jax.lax.stop_gradient
  if coarse is not None:
    v_coarse = _soft_min(
      _node_values(gp, sg(p), sg(mu), sg(coarse[0]), batch_size), sg(mu), sg(coarse[1])
    )[0]
    error = jnp.abs(sg(v) - v_coarse)
  elif nodes.shape[0] > 1:
    error = sg(mu * rel_se)
  else:
    error = jnp.full((), jnp.nan, dtype)
  finite = jnp.isfinite(v) & jnp.isfinite(mean_g)
  status = jnp.where(
    ~finite, status_lib.NONFINITE, jnp.where(error > tol, status_lib.INACCURATE, status_lib.SUCCESS)
  )
  status = status_lib.unless_invalid(validation.is_positive(mu), status)
  info = EntropicInfo(
    num_steps=jnp.ones((), jnp.int32),
    status=status,
    num_points=jnp.asarray(nodes.shape[0] * nodes.shape[1], jnp.int32),
    integration_error=error,
    max_weight=sg(max_w),
    effective_points=sg(ess),
    mean_g=sg(mean_g),
    log_volume=sg(log_vol),
    mu_log_volume=sg(mu * log_vol),
  )
  status_lib.raise_if_failed(status, throw=throw, where="value.entropic")
  return EntropicSolution(value=v, y=sg(mean_y), info=info)
