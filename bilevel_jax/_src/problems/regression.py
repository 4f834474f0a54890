"""Elastic-net tuning (6.1) and data poisoning (6.3) of Solla & Royset.

Data (Section 6.1, following Gao et al.): rows of A ~ N(0, Sigma) with
Sigma_jk = 0.5^|j-k|; x_true has 15 ones at random positions; responses
b = A x_true + sigma noise with sigma = sqrt(x_true^T Sigma x_true) / 2 (a
signal-to-noise ratio of 2 in standard deviations).

Each problem is a NamedTuple of arrays (a pytree), so a batch of instances is
one stacked problem that `jax.vmap` maps over.  The lower levels are written
in the form g + h(G) of (1.2):

* elastic net (6.1), x = lambda in R^2:
    g = |A y - b|^2 + exp(lambda_2)/2 |y|^2,  G = exp(lambda_1) (y, -y),
    h = sum_i max(z1_i, z2_i)                                 ("1")
  and the reformulation (6.2) with y = (y+, y-) >= 0:
    g = |A (y+ - y-) - b|^2 + exp(lambda_2)/2 |y+ - y-|^2,
    G = (exp(lambda_1) (y+ + y-), -y+, -y-),  h = sum z_lin + indicator{z <= 0}
                                                              ("1R")
* data poisoning (6.3), x = w in R^{n_tr}, fixed lambda_1 = e^3,
  lambda_2 = e^2, upper level max |A_val y - b_val|^2 / n_val subject to
  |w|^2 <= c, and the lower level exactly as the paper writes it (Section
  6.2, after (6.3)):
    g = |A y - b - w|^2 + lambda_2/2 |y|^2,  G = (y, -y),
    h = lambda_1 sum_i max(z1_i, z2_i)                        ("2")
  The weight lambda_1 sits in h, not in G: the smoothed problem (3.1) uses
  e_alpha h, and e_alpha (lambda_1 h_1)(z) = lambda_1 e_{alpha lambda_1}
  h_1(z), whereas e_alpha h_1(lambda_1 z) = lambda_1 e_{alpha / lambda_1}
  h_1(z): the two placements agree at alpha = 0 only.  Reformulated ("2R"),
  y = (y+, y-) >= 0:
    g = |A (y+ - y-) - b - w|^2 + lambda_2/2 |y+ - y-|^2,
    G = (y+ + y-, -y+, -y-),  h = lambda_1 sum z_lin + indicator{z <= 0}.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bilevel_jax._src.composite import polyhedral as poly


class RegressionData(NamedTuple):
  a_train: jax.Array
  b_train: jax.Array
  a_val: jax.Array
  b_val: jax.Array
  a_test: jax.Array
  b_test: jax.Array
  x_true: jax.Array


def make_regression(
  key,
  *,
  dim: int,
  n_train: int = 100,
  n_val: int = 100,
  n_test: int = 300,
  nonzeros: int = 15,
  correlation: float = 0.5,
  snr: float = 2.0,
  dtype=jnp.float64,
) -> RegressionData:
  """One instance of the Section 6.1 data."""
  k_sup, k_a, k_noise = jax.random.split(key, 3)
  idx = jnp.arange(dim)
  sigma = correlation ** jnp.abs(idx[:, None] - idx[None, :]).astype(dtype)
  chol = jnp.linalg.cholesky(sigma)
  support = jax.random.permutation(k_sup, dim)[:nonzeros]
  x_true = jnp.zeros(dim, dtype).at[support].set(1.0)
  n = n_train + n_val + n_test
  rows = jax.random.normal(k_a, (n, dim), dtype) @ chol.T
  noise_sd = jnp.sqrt(x_true @ sigma @ x_true) / snr
  b = rows @ x_true + noise_sd * jax.random.normal(k_noise, (n,), dtype)
  s1, s2 = n_train, n_train + n_val
  return RegressionData(rows[:s1], b[:s1], rows[s1:s2], b[s1:s2], rows[s2:], b[s2:], x_true)


def make_instances(seed: int, count: int, **kwargs) -> RegressionData:
  """``count`` independent instances stacked along axis 0."""
  keys = jax.random.split(jax.random.PRNGKey(seed), count)
  return jax.vmap(lambda k: make_regression(k, **kwargs))(keys)


def mse(a, b, y):
  """The papers' error: |A y - b|^2 / n."""
  r = a @ y - b
  return jnp.vdot(r, r) / b.shape[0]


class CompositeLowerLevel(NamedTuple):
  """g, G, h and a starting point of a lower level g + h(G); functions of
  (x, y) closing over the data."""

  g: object
  G: object
  h: poly.Polyhedral
  y0: jax.Array
  to_model: object  # y -> the regression coefficients


def elastic_net_lower(
  data: RegressionData, reformulated: bool = False, lam=None
) -> CompositeLowerLevel:
  """The elastic-net lower level of (6.1) ("1") or (6.2) ("1R").

  By default x = (lambda_1, lambda_2) with the exp reparametrization and
  G = exp(lambda_1) (y, -y), h = sum max, as the paper writes (6.1).  For
  data poisoning (6.3) pass ``lam`` = the fixed (lambda_1, lambda_2); x is
  then w, the perturbation of the training responses, and lambda_1 goes into
  h = lambda_1 sum max with G = (y, -y), as the paper writes it for (6.3)
  (this changes Y_{alpha,beta} for alpha > 0; see the module docstring).
  Pass ``lam`` as concrete numbers (Python or NumPy floats) so that
  lambda_1 is folded into h's slopes.
  """
  a, b = data.a_train, data.b_train
  d = a.shape[1]
  dtype = a.dtype

  def weights(x):
    if lam is None:
      return jnp.exp(x[0]), jnp.exp(x[1]), b
    return lam[0], lam[1], b + x

  if not reformulated:

    def g(x, y):
      _, l2, target = weights(x)
      r = a @ y - target
      return jnp.vdot(r, r) + 0.5 * l2 * jnp.vdot(y, y)

    if lam is not None:  # data poisoning: h = lambda_1 sum max (paper, after (6.3))
      return CompositeLowerLevel(
        g,
        lambda x, y: jnp.concatenate([y, -y]),
        poly.l1(d, scale=lam[0]),
        jnp.zeros(d, dtype),
        lambda y: y,
      )

    def G(x, y):
      l1, _, _ = weights(x)
      return l1 * jnp.concatenate([y, -y])

    return CompositeLowerLevel(g, G, poly.l1(d), jnp.zeros(d, dtype), lambda y: y)

  def g_split(x, y):
    _, l2, target = weights(x)
    coef = y[:d] - y[d:]
    r = a @ coef - target
    return jnp.vdot(r, r) + 0.5 * l2 * jnp.vdot(coef, coef)

  if lam is not None:  # data poisoning: lambda_1 in h, as in "2"

    def G_split(x, y):
      return jnp.concatenate([y[:d] + y[d:], -y])

    slopes = lam[0] * jnp.ones(d, dtype)
  else:

    def G_split(x, y):
      l1, _, _ = weights(x)
      return jnp.concatenate([l1 * (y[:d] + y[d:]), -y])

    slopes = jnp.ones(d, dtype)
  h = poly.separable(poly.linear(slopes), poly.nonpositive(2 * d))
  return CompositeLowerLevel(g_split, G_split, h, jnp.zeros(2 * d, dtype), lambda y: y[:d] - y[d:])
