"""Nondecreasing epi-polyhedral functions h as data (Solla & Royset, (2.6)).

A block is

    h_b(z) = max_j (<a_j, z> - alpha_j) + indicator{ <b_i, z> <= beta_i for all i },

with a_j, b_i >= 0 entrywise (h nondecreasing).  An ``h`` is a *separable sum*
of blocks, each reading its own coordinates of z:

    h(z) = sum_b h_b(z[index_b]).

Blocks of the same shape are stored stacked (a group), so the elastic net's
h(z1, z2) = sum_i max(z1_i, z2_i) is one group of d blocks with two pieces
each, not one max with 2^d pieces.  Coordinates of z that no block reads
contribute 0 to h.

What the solver needs from h, per block, comes from one routine
(`_block_prox`): the proximal point w = prox_{alpha h}(z), the multipliers
(sigma, tau) of the representation (2.2) of p = (z - w) / alpha, and the set S
of active pieces.  The prox of a block is found exactly by enumerating the
candidate active sets S (at most 2^(J+I); blocks are small by design) and
solving the KKT system of each; the valid candidate with the most pieces
wins (candidates are sorted largest first), so pieces that are active at w
but carry a zero multiplier are in the chosen set, and `ri_violated` looks
for zero multipliers inside it.  From S follows the basis of the critical
cone K_{h*}(p, w) in (5.1) and (2.4): span{a_j - a_j0 : j in J(w)} +
span{b_i : i in I(w)}, used as an orthogonal projector.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src import validation
from bilevel_jax._src.composite import linalg

# Candidate active sets per block are enumerated: 2^(J+I) of them.
MAX_PIECES_PER_BLOCK = 12


class Blocks(NamedTuple):
  """A group of ``nb`` blocks of equal shape (J pieces, I constraints, k coords).

  Attributes:
    a: (nb, J, k) slopes a_j >= 0.
    alpha: (nb, J) offsets alpha_j.
    b: (nb, I, k) constraint normals b_i >= 0 (I may be 0).
    beta: (nb, I) constraint levels beta_i.
    index: (nb, k) int coordinates of z read by each block.
  """

  a: Any
  alpha: Any
  b: Any
  beta: Any
  index: Any


@jax.tree_util.register_pytree_node_class
class Polyhedral:
  """A nondecreasing epi-polyhedral h: R^s -> R u {inf}, as a separable sum.

  Build it with `polyhedral`, `nonpositive`, `l1`, `hinge`, `maximum`,
  `linear` and `separable`; evaluate with `value`, `prox`, `active`.

  ``scale`` (None, or a positive scalar that is a traced value) multiplies
  the whole of h: h = scale * h_1 with h_1 the blocks.  `l1` and `hinge`
  store a traced scale here instead of in the slopes, so that `solve` can
  differentiate in it (see `unscaled`); a concrete scale goes into the
  slopes.  The module-level functions (`prox`, `value`, ...) read the blocks
  only; the methods apply the scale.
  """

  def __init__(self, groups: tuple, size: int, scale=None):
    self.groups = tuple(groups)
    self.size = int(size)
    self.scale = scale

  def tree_flatten(self):
    return (self.groups, self.scale), self.size

  @classmethod
  def tree_unflatten(cls, size, children):
    return cls(children[0], size, children[1])

  def unscaled(self):
    """(h_1, scale) with h = scale * h_1; scale is None when h has none."""
    return Polyhedral(self.groups, self.size), self.scale

  def __call__(self, z):
    """h(z), +inf outside dom h."""
    out = value(self, z)
    return out if self.scale is None else self.scale * out

  def prox(self, z, step):
    """prox_{step h}(z) = argmin_w h(w) + |w - z|^2 / (2 step)."""
    return prox(self, z, _step(self, step))[0]

  def active_pieces(self, z):
    """Per group, (nb, J + I) bools: the pieces attaining the max, J(z), then
    the active constraints, I(z), at z in dom h (to rounding)."""
    return active_pieces(self, z)

  def critical_cone_projector(self, z, step):
    """The (s, s) orthogonal projector onto K_{h*}(p, w) at w = prox_{step
    h}(z), p = (z - w)/step: the span of a_j - a_j0 over active pieces and
    b_i over active constraints (5.1), (2.4)."""
    _, states = prox(self, z, _step(self, step))
    eye = jnp.eye(self.size, dtype=jnp.result_type(z))
    return jax.vmap(lambda col: project_dual(self, states, col), 1, 1)(eye)

  def critical_cone_basis(self, z, step):
    """An orthonormal basis of K_{h*}(p, w), as (s, dim) with dim found at
    run time: returns (basis (s, s) whose first `dim` columns span the cone,
    dim).  Needs concrete values (not jittable: dim is data dependent)."""
    proj = np.asarray(self.critical_cone_projector(z, step))  # the scale is applied there
    u, sv, _ = np.linalg.svd(proj)
    dim = int(np.sum(sv > 0.5))
    return u[:, :dim], dim

  def __repr__(self):
    parts = ", ".join(
      f"{g.a.shape[0]}x(J={g.a.shape[1]}, I={g.b.shape[1]}, k={g.a.shape[2]})" for g in self.groups
    )
    scale = "" if self.scale is None else ", scale=<traced>"
    return f"Polyhedral(size={self.size}, blocks=[{parts}]{scale})"


def _step(h: Polyhedral, step):
  """prox_{step (s h_1)} = prox_{(step s) h_1}."""
  return step if h.scale is None else step * h.scale


# ----------------------------------------------------------------- builders


def _check_nonnegative(name: str, value) -> None:
  concrete = validation.concrete_value(value)
  if concrete is not None and concrete.size and np.any(concrete < 0):
    raise ValueError(
      f"`{name}` has a negative entry ({concrete.min():g}): h must be "
      "nondecreasing (2.6), so every a_j and b_i must be >= 0. Write a "
      "decreasing term through G instead, e.g. |y| = max(y, -y) with "
      "G = (y, -y) and h = l1(...)."
    )


def polyhedral(a, alpha=None, b=None, beta=None) -> Polyhedral:
  """h(z) = max_j (<a_j, z> - alpha_j) + indicator{<b_i, z> <= beta_i} (2.6).

  Args:
    a: (J, s) slopes, each entry >= 0; None for h = 0 plus the indicator.
    alpha: (J,) offsets (default 0).
    b: (I, s) constraint normals, each entry >= 0, or None.
    beta: (I,) constraint levels (default 0).

  One block over all s coordinates; J + I must be at most
  MAX_PIECES_PER_BLOCK (write larger h as a `separable` sum).  Concrete data
  must be finite (ValueError naming the argument); traced data with NaN
  makes `solve` report a status other than SUCCESS.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> h = composite.polyhedral(jnp.eye(2))          # max(z_1, z_2)
    >>> float(h(jnp.array([0.5, 2.0])))
    2.0
  """
  if a is None and b is None:
    raise ValueError("`a` and `b` cannot both be None: give h's pieces or its constraints.")
  if b is not None:
    b = jnp.atleast_2d(jnp.asarray(b))
    s = b.shape[1]
  if a is not None:
    a = jnp.atleast_2d(jnp.asarray(a))
    s = a.shape[1]
  else:
    a = jnp.zeros((1, s), b.dtype)
  if b is None:
    b = jnp.zeros((0, s), a.dtype)
  dtype = jnp.result_type(a, b, float)
  a, b = a.astype(dtype), b.astype(dtype)
  if a.shape[1] != b.shape[1]:
    raise ValueError(
      f"`a` has {a.shape[1]} columns but `b` has {b.shape[1]}; both must match the size of z."
    )
  alpha = jnp.zeros(a.shape[0], dtype) if alpha is None else jnp.asarray(alpha, dtype)
  beta = jnp.zeros(b.shape[0], dtype) if beta is None else jnp.asarray(beta, dtype)
  if alpha.shape != (a.shape[0],):
    raise ValueError(f"`alpha` must have shape ({a.shape[0]},), got {alpha.shape}.")
  if beta.shape != (b.shape[0],):
    raise ValueError(f"`beta` must have shape ({b.shape[0]},), got {beta.shape}.")
  for name, value in (("a", a), ("alpha", alpha), ("b", b), ("beta", beta)):
    validation.check_finite(name, value)
  _check_nonnegative("a", a)
  _check_nonnegative("b", b)
  return _from_blocks(a[None], alpha[None], b[None], beta[None], np.arange(s)[None], size=s)


def _from_blocks(a, alpha, b, beta, index, size) -> Polyhedral:
  pieces = a.shape[1] + b.shape[1]
  if pieces > MAX_PIECES_PER_BLOCK:
    raise ValueError(
      f"`h` has a block with {pieces} pieces and constraints; at most "
      f"{MAX_PIECES_PER_BLOCK} are supported per block (the prox enumerates "
      "2^pieces active sets). Write h as a `separable` sum of small blocks."
    )
  index = np.asarray(index, dtype=np.int32)
  return Polyhedral((Blocks(a, alpha, b, beta, jnp.asarray(index)),), size)


def _repeat(a, alpha, b, beta, nb):
  """Stacks one block's data nb times."""
  tile = lambda v: jnp.broadcast_to(jnp.asarray(v, float), (nb,) + np.shape(v))
  return tile(a), tile(alpha), tile(b), tile(beta)


def nonpositive(s: int) -> Polyhedral:
  """h(z) = indicator{z <= 0} on R^s: inequality constraints G(x, y) <= 0
  (Example 3.6 without the objective piece).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> h = composite.nonpositive(2)
    >>> float(h(jnp.array([-1.0, 0.0]))), float(h(jnp.array([1.0, 0.0])))
    (0.0, inf)
  """
  s = validation.check_positive_int("s", s)
  a, alpha, b, beta = _repeat([[0.0]], [0.0], [[1.0]], [0.0], s)
  return _from_blocks(a, alpha, b, beta, np.arange(s)[:, None], size=s)


def linear(c) -> Polyhedral:
  """h(z) = <c, z> with c >= 0, one block per coordinate.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> float(composite.linear(jnp.array([1.0, 2.0]))(jnp.array([3.0, 1.0])))
    5.0
  """
  c = jnp.asarray(c, float)
  if c.ndim != 1:
    raise ValueError(f"`c` must be a vector, got shape {c.shape}.")
  validation.check_finite("c", c)
  _check_nonnegative("c", c)
  s = c.shape[0]
  return _from_blocks(
    c[:, None, None],
    jnp.zeros((s, 1), c.dtype),
    jnp.zeros((s, 0, 1), c.dtype),
    jnp.zeros((s, 0), c.dtype),
    np.arange(s)[:, None],
    size=s,
  )


def _scaled(h: Polyhedral, scale) -> Polyhedral:
  """scale * h for a scalar scale > 0: into the slopes when concrete, else
  kept as ``h.scale`` (a traced value, differentiable through `solve`)."""
  if np.ndim(scale) != 0:
    raise ValueError(f"`scale` must be a scalar, got shape {np.shape(scale)}.")
  if validation.concrete_value(scale) is None:
    return Polyhedral(h.groups, h.size, jnp.asarray(scale))
  groups = tuple(g._replace(a=g.a * float(scale)) for g in h.groups)
  return Polyhedral(groups, h.size)


def l1(d: int, scale=1.0) -> Polyhedral:
  """h(z1, z2) = scale * sum_i max(z1_i, z2_i) on R^(2d), as in (6.1).

  With G(x, y) = (y, -y) this is scale * ||y||_1.  The weight can go into
  ``scale`` or into G (G = scale * (y, -y)): both give the same solution and
  the same derivatives, e.g. in the elastic net's exp(lambda_1).  A traced
  ``scale`` (under jit, grad or vmap) is kept apart from the slopes, so that
  `solve` differentiates in it: as h = scale * h_1 with h_1 = l1(d),

      e_alpha h(z) = e_{alpha scale^2} h_1(scale z),     p = scale p_1,

  and `solve` runs with G scaled by ``scale`` and alpha by scale^2.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> g = lambda lam, y: 0.5 * jnp.sum((y - 3.0) ** 2)     # y = 3 - lam for lam < 3
    >>> def y_of(lam):
    ...   h = composite.l1(1, scale=lam)
    ...   return composite.solve(g, lambda lam, y: jnp.concatenate([y, -y]), h, lam,
    ...                          jnp.zeros(1), alpha=1e-9, beta=1e-9).y[0]
    >>> round(float(y_of(1.0)), 6), round(float(jax.grad(y_of)(1.0)), 6)
    (2.0, -1.0)
  """
  d = validation.check_positive_int("d", d)
  validation.check_positive("scale", scale)
  a = jnp.broadcast_to(jnp.eye(2), (d, 2, 2))
  _, alpha, b, beta = _repeat([[0.0]], [0.0, 0.0], np.zeros((0, 2)), np.zeros(0), d)
  index = np.stack([np.arange(d), d + np.arange(d)], axis=1)
  return _scaled(_from_blocks(a, alpha, b, beta, index, size=2 * d), scale)


def hinge(s: int, scale=1.0) -> Polyhedral:
  """h(z) = scale * sum_i max(z_i, 0) on R^s (hinge losses when G_i = 1 - t_i).

  A traced ``scale`` is differentiable through `solve`, as in `l1`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> float(composite.hinge(2)(jnp.array([0.5, -2.0])))
    0.5
    >>> float(composite.hinge(2, scale=2.0)(jnp.array([0.5, -2.0])))
    1.0
  """
  s = validation.check_positive_int("s", s)
  validation.check_positive("scale", scale)
  a = jnp.broadcast_to(jnp.array([[1.0], [0.0]]), (s, 2, 1))
  _, alpha, b, beta = _repeat([[0.0]], [0.0, 0.0], np.zeros((0, 1)), np.zeros(0), s)
  return _scaled(_from_blocks(a, alpha, b, beta, np.arange(s)[:, None], size=s), scale)


def maximum(s: int) -> Polyhedral:
  """h(z) = max_i z_i on R^s (minimax lower levels); s <= MAX_PIECES_PER_BLOCK.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> float(composite.maximum(3)(jnp.array([0.5, -2.0, 1.0])))
    1.0
  """
  s = validation.check_positive_int("s", s)
  return polyhedral(jnp.eye(s))


def separable(*hs: Polyhedral) -> Polyhedral:
  """h(z) = h_1(z[:s_1]) + h_2(z[s_1:s_1+s_2]) + ... (a separable sum).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> h = composite.separable(composite.hinge(1), composite.maximum(2))
    >>> float(h(jnp.array([0.5, -1.0, 3.0])))     # 0.5 + max(-1, 3)
    3.5
  """
  if not hs:
    raise ValueError("`separable` needs at least one h.")
  groups, offset = [], 0
  for i, h in enumerate(hs):
    if not isinstance(h, Polyhedral):
      raise TypeError(f"argument {i} of `separable` must be a Polyhedral, got {type(h).__name__}.")
    if h.scale is not None:
      raise ValueError(
        f"argument {i} of `separable` has a traced `scale`; a separable "
        "sum holds one scale per block only when it is concrete. Put "
        "the weight into G instead (G = scale * (...))."
      )
    groups += [g._replace(index=g.index + offset) for g in h.groups]
    offset += h.size
  return Polyhedral(tuple(groups), offset)


def check_h(name: str, h) -> Polyhedral:
  if not isinstance(h, Polyhedral):
    raise TypeError(
      f"`{name}` must be a bilevel_jax.composite.Polyhedral (built "
      f"with composite.polyhedral, l1, ...), got {type(h).__name__}."
    )
  return h


# ------------------------------------------------------------ block algebra


def _subsets(num_pieces: int, num_constraints: int) -> np.ndarray:
  """All candidate active sets with at least one max piece, largest first."""
  rows = [
    s for s in itertools.product((0, 1), repeat=num_pieces + num_constraints) if any(s[:num_pieces])
  ]
  rows.sort(key=lambda r: -sum(r))
  return np.array(rows, dtype=bool)


def _tolerance(dtype) -> float:
  return float(1e3 * jnp.finfo(dtype).eps)


def _block_prox(a, alpha, b, beta, z, step):
  """prox_{step h_b}(z) for one block by enumerating active sets.

  For an active set S, the KKT conditions of min_w h_b(w) + |w - z|^2/(2 step)
  with w = z - step * (a_S^T sigma + b_S^T tau) are linear in
  (sigma, tau, t):  <c_r, w> - c0_r = t [r is a piece]  for r in S,
  sum sigma = 1, and zero multipliers off S.  A candidate is valid when its
  multipliers are >= 0 and the pieces off S are not above t (constraints
  satisfied).

  Returns:
    (w, lam, active, ok, weak): lam = (sigma, tau) so that (z - w) / step =
    a^T sigma + b^T tau; active the chosen S, the largest valid one (it
    holds every active piece whose multiplier may be 0); ok whether a valid
    S was found; weak whether a piece off S is active too (possible only
    when adding it makes the KKT system singular, e.g. a repeated
    constraint): the relative interior condition cannot be certified there.
  """
  num_j = a.shape[0]
  rows = jnp.concatenate([a, b], axis=0)  # (n, k)
  offsets = jnp.concatenate([alpha, beta])  # (n,)
  n = rows.shape[0]
  is_piece = jnp.arange(n) < num_j
  subsets = jnp.asarray(_subsets(num_j, n - num_j))  # (2^n, n)
  gram = rows @ rows.T
  dtype = z.dtype
  scale = 1 + jnp.max(jnp.abs(z)) + jnp.max(jnp.abs(offsets)) + step * jnp.max(gram)
  tol = _tolerance(dtype) * scale

  def candidate(mask):
    # Unknowns (lam_0..lam_{n-1}, t).
    top = jnp.where(
      mask[:, None],
      jnp.concatenate([step * gram, is_piece[:, None].astype(dtype)], 1),
      jnp.concatenate([jnp.eye(n, dtype=dtype), jnp.zeros((n, 1), dtype)], 1),
    )
    last = jnp.concatenate([is_piece.astype(dtype), jnp.zeros(1, dtype)])[None]
    matrix = jnp.concatenate([top, last], 0)
    rhs = jnp.concatenate([jnp.where(mask, rows @ z - offsets, 0), jnp.ones(1, dtype)])
    sol = linalg.small_solve(matrix, rhs)
    lam, t = sol[:n], sol[n]
    w = z - step * (rows.T @ lam)
    slack = rows @ w - offsets - jnp.where(is_piece, t, 0)
    violation = jnp.maximum(
      jnp.max(jnp.where(mask, -lam, -jnp.inf)), jnp.max(jnp.where(mask, -jnp.inf, slack))
    )
    finite = jnp.all(jnp.isfinite(sol))
    lam_scale = 1 + jnp.max(jnp.abs(jnp.where(finite, lam, 0)))
    weak = jnp.any(~mask & (jnp.abs(slack) <= tol))
    return w, lam, jnp.where(finite, violation / lam_scale, jnp.inf), weak

  ws, lams, violations, weak = jax.vmap(candidate)(subsets)
  valid = violations <= tol
  # Largest valid set first (subsets are sorted by size, largest first): all
  # pieces active at w, J(w) and I(w) of (2.3), including those whose
  # multiplier is 0; else the least violation.
  choice = jnp.where(jnp.any(valid), jnp.argmax(valid), jnp.argmin(violations))
  return ws[choice], lams[choice], subsets[choice], jnp.any(valid), weak[choice]


def _two_piece_prox(a, alpha, b, beta, z, step):
  """`_block_prox` in closed form for a block max(c_1(w), c_2(w)) of two
  pieces and no constraints (l1, hinge), c_j(w) = <a_j, w> - alpha_j.

  With delta = a_1 - a_2 and w = z - step (sigma a_1 + (1 - sigma) a_2), the
  equation c_1(w) = c_2(w) gives sigma* = (<delta, z - step a_2> - alpha_1 +
  alpha_2) / (step |delta|^2).  Both pieces are active (lam = (sigma*,
  1 - sigma*)) when sigma* lies in [0, 1] up to the tolerance of the
  enumeration, which prefers the largest valid set; else the single piece
  that dominates.  Same outputs, to rounding, as the enumeration.
  """
  del b, beta
  dtype = z.dtype
  delta = a[0] - a[1]
  gram = a @ a.T
  dd = step * jnp.vdot(delta, delta)
  scale = 1 + jnp.max(jnp.abs(z)) + jnp.max(jnp.abs(alpha)) + step * jnp.max(gram)
  tol = _tolerance(dtype) * scale
  num = jnp.vdot(delta, z - step * a[1]) - alpha[0] + alpha[1]
  parallel = dd <= 0
  sigma = num / jnp.where(parallel, 1, dd)
  lam_scale = 1 + jnp.maximum(jnp.abs(sigma), jnp.abs(1 - sigma))
  both = (~parallel) & (sigma >= -tol * lam_scale) & (sigma <= 1 + tol * lam_scale)
  # A single piece: the one on top at its own prox point (c_1 - c_2 there is
  # dd (sigma* - 1) for piece 1 and dd sigma* for piece 2).
  first = jnp.where(parallel, alpha[0] < alpha[1], sigma > 1)
  sigma = jnp.where(both, sigma, first.astype(dtype))
  lam = jnp.stack([sigma, 1 - sigma])
  w = z - step * (a.T @ lam)
  active = jnp.where(both, jnp.array([True, True]), jnp.stack([first, ~first]))
  gap = jnp.where(parallel, alpha[1] - alpha[0], jnp.where(first, num - dd, num))
  weak = (~both) & (jnp.abs(gap) <= tol)
  return w, lam, active, jnp.array(True), weak


def _block_projector(a, b, active, dtype):
  """Orthogonal projector onto span{a_j - a_j0 (j active), b_i (i active)}:
  the critical cone K_{h*}(p, w) of (5.1)/(2.4), a subspace under the relative
  interior condition.  Modified Gram-Schmidt (twice, unrolled over the J + I
  spanning vectors), so a batch of blocks is elementwise work, not one SVD
  per block."""
  num_j = a.shape[0]
  pieces = active[:num_j]
  is_first = pieces & (jnp.cumsum(pieces) == 1)
  a_first = jnp.sum(jnp.where(is_first[:, None], a, 0), axis=0)
  diffs = jnp.where((pieces & ~is_first)[:, None], a - a_first[None, :], 0)
  normals = jnp.where(active[num_j:, None], b, 0)
  vectors = jnp.concatenate([diffs, normals], axis=0).astype(dtype)  # (n, k)
  k = vectors.shape[1]
  tol = _tolerance(dtype) * (1 + jnp.max(jnp.abs(vectors), initial=0.0)) * 10
  proj = jnp.zeros((k, k), dtype)
  for v in vectors:
    v = v - proj @ v
    v = v - proj @ v
    norm = jnp.sqrt(jnp.vdot(v, v))
    keep = norm > tol
    u = jnp.where(keep, v / jnp.where(keep, norm, 1), 0)
    proj = proj + jnp.outer(u, u)
  return proj


class BlockState(NamedTuple):
  """Per-group results of the prox: what the solver and the derivative use."""

  projector: Any  # (nb, k, k)
  lam: Any  # (nb, n) multipliers (sigma, tau)
  active: Any  # (nb, n) bool
  ok: Any  # (nb,) bool
  weak: Any  # (nb,) bool: a piece active at w but off the chosen set


def prox(h: Polyhedral, z, step):
  """w = prox_{step h}(z) and, per group, the BlockState at w."""
  w = z
  states = []
  for g in h.groups:
    zb = z[g.index]
    block_prox = _two_piece_prox if g.a.shape[1] == 2 and g.b.shape[1] == 0 else _block_prox
    wb, lam, active, ok, weak = jax.vmap(block_prox, (0, 0, 0, 0, 0, None))(
      g.a.astype(z.dtype),
      g.alpha.astype(z.dtype),
      g.b.astype(z.dtype),
      g.beta.astype(z.dtype),
      zb,
      step,
    )
    proj = jax.vmap(_block_projector, (0, 0, 0, None))(g.a, g.b, active, z.dtype)
    w = w.at[g.index].set(wb)
    states.append(BlockState(proj, lam, active, ok, weak))
  return w, tuple(states)


def project_dual(h: Polyhedral, states, v):
  """Applies the projector onto K_{h*} (block diagonal) to a vector v in R^s.
  Coordinates no block reads map to 0 (there p is fixed at 0)."""
  out = jnp.zeros_like(v)
  for g, st in zip(h.groups, states):
    out = out.at[g.index].set(jnp.einsum("bij,bj->bi", st.projector.astype(v.dtype), v[g.index]))
  return out


def multiplier(h: Polyhedral, states, z):
  """p = (z - w) / step computed from the prox's multipliers, p_b = a^T sigma
  + b^T tau (2.2), without the subtraction: (z - w) / step loses eps |z| /
  step to cancellation (for step = 1e-8 in float64, or 1e-6 in float32, more
  than p itself), while the multipliers of a block with one active piece are
  exact (sigma = e_j) and those of a block with several active members carry
  only the rounding of its small KKT system (`multiplier_rounding`).  Coordinates no block reads get 0."""
  out = jnp.zeros_like(z)
  for g, st in zip(h.groups, states):
    rows = jnp.concatenate([g.a, g.b], axis=1).astype(z.dtype)  # (nb, n, k)
    out = out.at[g.index].set(jnp.einsum("bnk,bn->bk", rows, st.lam.astype(z.dtype)))
  return out


def multiplier_rounding(h: Polyhedral, states, z, step):
  """(s,) bounds, in units of eps, on the rounding of `multiplier` beyond
  eps |p|: (max |z_b| + max |c0_b|) / step on the coordinates of blocks whose
  active set has more than one member (two pieces or more, or a
  constraint), whose multipliers solve a KKT system with right side <c_r,
  z_b> - c0_r divided by step; 0 on blocks with one active piece (sigma =
  e_j exactly) and on coordinates no block reads."""
  out = jnp.zeros_like(z)
  for g, st in zip(h.groups, states):
    num_j = g.a.shape[1]
    several = (jnp.sum(st.active[:, :num_j], axis=1) > 1) | jnp.any(st.active[:, num_j:], axis=1)
    offsets = jnp.concatenate([g.alpha, g.beta], axis=1).astype(z.dtype)
    size = jnp.max(jnp.abs(z[g.index]), axis=1) + jnp.max(jnp.abs(offsets), axis=1)
    bound = jnp.where(several, size / step, 0)
    out = out.at[g.index].set(jnp.broadcast_to(bound[:, None], g.index.shape))
  return out


def value(h: Polyhedral, z):
  """h(z), +inf outside dom h."""
  total = jnp.zeros((), z.dtype)
  for g in h.groups:
    zb = z[g.index]
    pieces = jnp.einsum("bjk,bk->bj", g.a.astype(z.dtype), zb) - g.alpha
    slack = jnp.einsum("bik,bk->bi", g.b.astype(z.dtype), zb) - g.beta
    feasible = jnp.all(slack <= _tolerance(z.dtype) * (1 + jnp.abs(g.beta)), axis=-1)
    total = total + jnp.sum(jnp.where(feasible, jnp.max(pieces, axis=-1), jnp.inf))
  return total


def active_pieces(h: Polyhedral, z):
  out = []
  for g in h.groups:
    zb = z[g.index]
    pieces = jnp.einsum("bjk,bk->bj", g.a.astype(z.dtype), zb) - g.alpha
    slack = jnp.einsum("bik,bk->bi", g.b.astype(z.dtype), zb) - g.beta
    tol = _tolerance(z.dtype) * (1 + jnp.max(jnp.abs(zb), axis=1, keepdims=True))
    top = pieces >= jnp.max(pieces, axis=1, keepdims=True) - tol
    out.append(jnp.concatenate([top, jnp.abs(slack) <= tol], axis=1))
  return tuple(out)


def max_part(h: Polyhedral, z):
  """h(z) without the indicator (for points known to lie in dom h)."""
  total = jnp.zeros((), z.dtype)
  for g in h.groups:
    pieces = jnp.einsum("bjk,bk->bj", g.a.astype(z.dtype), z[g.index]) - g.alpha
    total = total + jnp.sum(jnp.max(pieces, axis=-1))
  return total


def ri_violated(states):
  """Whether the relative interior condition of Theorem 3.2,
  G - alpha p in ri(dh*(p)), could not be certified at the prox point.

  The condition holds exactly when p has a representation (2.2) with a
  positive multiplier on every piece and constraint active at w = G - alpha
  p (Section 3.3: strict complementarity for constraints).  The prox picks
  the largest valid active set, so every active piece is in it, and its
  multipliers are unique when the pieces' KKT system is nonsingular; the
  condition fails where one of them is (numerically) zero:

      lam_r <= sqrt(eps) (1 + max_r' |lam_r'|)    for some r in the chosen set,

  per block.  It also counts as failed where a piece is active at w but off
  the chosen set (its KKT system was singular, e.g. a repeated constraint),
  since no representation was found to certify it.  Example 5.1 of the
  paper (x = 0) and min (y - x)^2 / 2 s.t. y <= 0 at x = 0 are such points:
  the derivative (3.6) is then one of the one-sided ones, with the active
  set of the solve.
  """
  flags = []
  for st in states:
    lam = st.lam
    tol = float(jnp.finfo(lam.dtype).eps) ** 0.5 * (
      1 + jnp.max(jnp.abs(lam), axis=-1, keepdims=True)
    )
    zero = st.active & (lam <= tol)
    flags.append(jnp.any(zero) | jnp.any(st.weak))
  return jnp.any(jnp.stack(flags))


def count_active(states):
  return sum(jnp.sum(st.active) for st in states)


def prox_ok(states):
  return jnp.all(jnp.stack([jnp.all(st.ok) for st in states]))
