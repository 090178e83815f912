"""The COCO neuron score: an InfoNCE contrast of each neuron's responses, vectorised over all neurons of a site.

COCO (ICLR 2026 submission, "intra-consistency and inter-contrast") keeps neurons whose response pattern is
consistent inside a social context class and different between classes. Our reconstruction
(``../shared/METHODS.md``, docs/methods/coco.md):

* response of neuron ``c`` on prompt ``i``: ``r_i`` = its activations over the last ``t`` tokens, a vector in R^t;
* standardised per neuron over the pooled prompts of both sets: ``z_i = (r_i - mean_j r_j) / sigma`` (the mean is
  per position, ``sigma`` one pooled standard deviation), so neurons of any scale are compared alike;
* similarity ``s(i, j) = -||z_i - z_j||^2 / (t * tau)``: 0 for identical responses, about ``-2 / tau`` for
  unrelated ones;
* for each ordered positive pair ``(i, p)`` (same set, ``p != i``) with negatives ``N(i)`` (the other set), the
  InfoNCE loss ``l(i, p) = -log( exp s(i,p) / (exp s(i,p) + sum_{n in N(i)} exp s(i,n)) )``;
* the neuron's loss ``L = mean over positive pairs of l(i, p)``: near 0 when each set is tight and the sets far apart,
  about ``log(1 + |N|)`` (chance) when the sets are indistinguishable.

Beside it we report Cohen's d of the mean response (over the ``t`` tokens) between the two sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.functional import softplus

#: A neuron whose pooled standard deviation is below this fraction of its largest |activation| is constant here.
DEGENERATE_RTOL = 1e-5


def standardise(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre per position and scale per neuron over the pooled prompts of both sets.

    ``x`` is ``[n_x, t, C]``, ``y`` is ``[n_y, t, C]`` (float). Returns ``(z_x, z_y, degenerate)`` where
    ``degenerate[c]`` marks neurons that do not vary over these prompts; their ``z`` is set to 0 (rounding noise
    would otherwise be blown up to unit scale).
    """
    pooled = torch.cat([x, y]).double()
    centred = pooled - pooled.mean(dim=0, keepdim=True)
    sigma = centred.pow(2).mean(dim=(0, 1)).sqrt()
    scale = pooled.abs().amax(dim=(0, 1))
    degenerate = sigma <= DEGENERATE_RTOL * scale + 1e-30
    z = torch.where(degenerate, torch.zeros_like(centred), centred / sigma.clamp_min(1e-30))
    return z[: len(x)], z[len(x) :], degenerate


def infonce_loss(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-neuron InfoNCE loss (module docstring) of responses ``x`` ``[n_x, t, C]`` against ``y`` ``[n_y, t, C]``.

    Returns ``[C]`` (float64). Each set needs at least two prompts (a positive pair).
    """
    zx, zy, _ = standardise(x, y)
    return _infonce(zx, zy, temperature)


def _similarity(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s(i, j) = -||a_i - b_j||^2 / (t * tau)`` for ``a`` ``[C, n_a, t]`` and ``b`` ``[C, n_b, t]``."""
    dist = a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    return dist.clamp_min(0).div_(-a.shape[-1] * temperature)


def _infonce(zx: torch.Tensor, zy: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss from standardised responses, block-wise: X-Y similarities are the negatives of both sets, X-X and
    Y-Y the positives; ``l(i, p) = softplus(logsumexp_n s(i, n) - s(i, p))`` is the same InfoNCE term."""
    if len(zx) < 2 or len(zy) < 2:
        raise ValueError(f"each set needs at least 2 responses (got {len(zx)} and {len(zy)})")
    zx, zy = zx.permute(2, 0, 1), zy.permute(2, 0, 1)  # [C, n, t]
    across = _similarity(zx, zy, temperature)
    total = torch.zeros(zx.shape[0], dtype=zx.dtype)
    for z, negatives in ((zx, across.logsumexp(dim=2)), (zy, across.logsumexp(dim=1))):
        within = _similarity(z, z, temperature)  # [C, n, n]
        total += softplus(negatives[:, :, None] - within).sum(dim=(1, 2))
        total -= softplus(negatives - torch.diagonal(within, dim1=1, dim2=2)).sum(dim=1)  # p == i is no pair
    n_x, n_y = zx.shape[1], zy.shape[1]
    return total / (n_x * (n_x - 1) + n_y * (n_y - 1))


def chance_loss(n_x: int, n_y: int) -> float:
    """``mean over positive pairs of log(1 + |N(i)|)``: the loss when every similarity is equal."""
    pairs_x, pairs_y = n_x * (n_x - 1), n_y * (n_y - 1)
    return (pairs_x * math.log1p(n_y) + pairs_y * math.log1p(n_x)) / (pairs_x + pairs_y)


def cohens_d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Standardised mean difference of the mean response: ``(mean_X - mean_Y) / pooled sd``, ``[C]``; 0 when
    the pooled sd is 0."""
    mx, my = x.double().mean(dim=1), y.double().mean(dim=1)  # [n, C]
    nx, ny = len(mx), len(my)
    pooled = ((nx - 1) * mx.var(dim=0) + (ny - 1) * my.var(dim=0)) / (nx + ny - 2)
    diff = mx.mean(dim=0) - my.mean(dim=0)
    sd = pooled.sqrt()
    return torch.where(sd > 0, diff / sd.clamp_min(1e-300), torch.zeros_like(diff))


@dataclass
class SiteScores:
    """The scores of every neuron of one ``(layer, site)`` on one category."""

    loss: torch.Tensor  # [C] InfoNCE loss, lower = more COCO-like
    score: torch.Tensor  # [C] 1 - loss / chance: 1 = perfectly separated, about 0 = indistinguishable sets
    cohens_d: torch.Tensor  # [C]
    degenerate: torch.Tensor  # [C] bool: constant over these prompts, never selected


def score_site(x: torch.Tensor, y: torch.Tensor, temperature: float) -> SiteScores:
    """All scores of one site's neurons from their responses on the X and Y prompts of one category."""
    zx, zy, degenerate = standardise(x, y)
    loss = _infonce(zx, zy, temperature)
    return SiteScores(
        loss=loss, score=1.0 - loss / chance_loss(len(x), len(y)), cohens_d=cohens_d(x, y), degenerate=degenerate
    )
