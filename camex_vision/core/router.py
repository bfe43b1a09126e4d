"""Routers, routing units and the balance loss (CAMEx method sections 7 and 8).

A merging layer routes whole *units* (an image, a sequence, a causal segment), not tokens. The router maps
the unit's pooled representation to one gate per choice (softmax, optional Shazeer noisy top-k in training) and
keeps shapes static: unselected choices get a gate of exactly zero, never an index gather, so every router
parameter always receives a gradient.

Shape notation: ``b`` batch, ``l`` tokens, ``s`` segments, ``c`` channels, ``u`` routing units, ``e`` choices.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .options import FIRST_SEGMENT, check_choice, check_int


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (unbiased variance); 0 for a single value."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def balance_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. (2017) balance loss ``CV^2(importance) + CV^2(load)``.

    Args:
        gates: ``[u, e]`` gate values; importance is their sum over units.
        load: ``[e]`` (expected) number of units routed to each choice.
    """
    return cv_squared(gates.sum(0)) + cv_squared(load)


def pool_units(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of each unit, ``[b, l, c] -> [b, c]``; with ``mask [b, l]`` only over valid tokens.

    A unit with no valid token pools to zeros (its router then sees only its bias).
    """
    if mask is None:
        return x.mean(1)
    if mask.shape != x.shape[:2]:
        raise ValueError(f'mask shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}')
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.)


class Router(nn.Module):
    """Linear router with softmax gates and optional Shazeer noisy top-k (noise in training only).

    ``forward(pooled [u, c]) -> (gates [u, e], balance_loss [])``. Gates of each unit sum to 1, with exact zeros
    outside its top-k.
    """

    def __init__(
            self,
            in_features: int,
            num_choices: int,
            top_k: Optional[int] = None,
            noisy: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_features = in_features
        self.num_choices = check_int('num_choices', num_choices, 1)
        self.top_k = num_choices if top_k is None else check_int('top_k', top_k, 1, num_choices)
        self.noisy = bool(noisy)
        self.gate = nn.Linear(in_features, num_choices, bias=False, **dd)
        self.noise = nn.Linear(in_features, num_choices, bias=False, **dd) if self.noisy else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # small gate init keeps fresh routers near uniform; zero noise weights give noise std softplus(0)
        nn.init.normal_(self.gate.weight, std=0.02)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        clean = self.gate(pooled)
        logits = clean
        noise_std = None
        if self.noise is not None and self.training:
            noise_std = F.softplus(self.noise(pooled)) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        if self.top_k < self.num_choices:
            kth = logits.topk(self.top_k + 1, dim=-1).values
            keep = logits >= kth[:, self.top_k - 1:self.top_k]
            gates = torch.softmax(logits.masked_fill(~keep, float('-inf')), dim=-1)
            if noise_std is not None:
                load = _prob_in_top_k(clean, logits, noise_std, kth, self.top_k).sum(0)
            else:
                load = keep.to(gates.dtype).sum(0)
        else:
            gates = torch.softmax(logits, dim=-1)
            load = (gates > 0).to(gates.dtype).sum(0)
        return gates, balance_loss(gates, load)


def _prob_in_top_k(clean, noisy, noise_std, kth, k):
    """Shazeer's smooth load estimate: P(choice stays in the top-k when only its own noise is resampled)."""
    threshold_in = kth[:, k:k + 1]  # the (k+1)-th value: what a choice must beat to enter
    threshold_out = kth[:, k - 1:k]  # the k-th value: what an entered choice must stay above
    is_in = noisy > threshold_in
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    prob_if_in = normal.cdf((clean - threshold_in) / noise_std)
    prob_if_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


@dataclass
class SegmentState:
    """Running per-segment sums of one layer's input during incremental decoding.

    ``segment`` is the id of the segment holding the last token seen; ``sum``/``count`` cover that segment so
    far and ``prev_sum``/``prev_count`` the whole segment before it.
    """
    segment: int
    sum: torch.Tensor
    count: torch.Tensor
    prev_sum: torch.Tensor
    prev_count: torch.Tensor


class SegmentRouting(nn.Module):
    """Causal segment routing (from Lory): segment ``k`` is merged from the router output on segment ``k-1``.

    The first segment has no predecessor. ``first_segment`` chooses its scores:

    * ``'prior'`` (default): learned prior logits (initialised to zero, i.e. uniform) — strictly causal;
    * ``'uniform'``: fixed uniform gates — strictly causal, no parameters;
    * ``'own'``: the paper's and Lory's behaviour: its own mean, with stop-gradient. A token's output then
      depends on later tokens of the first segment, a causality leak at generation time.
    """

    def __init__(self, router: Router, segment_length: int, first_segment: str = 'prior'):
        super().__init__()
        self.segment_length = check_int('segment_length', segment_length, 1)
        self.first_segment = check_choice('first_segment', first_segment, FIRST_SEGMENT)
        self.router = router
        if first_segment == 'prior':
            self.prior = nn.Parameter(torch.zeros(router.num_choices))
        else:
            self.prior = None

    def segment_layout(self, length: int, offset: int) -> Tuple[int, int, int]:
        """``(first segment id, number of segments, leading pad)`` for tokens ``offset .. offset+length-1``."""
        t = self.segment_length
        first = offset // t
        last = (offset + length - 1) // t
        return first, last - first + 1, offset - first * t

    def forward(
            self,
            x: torch.Tensor,
            mask: Optional[torch.Tensor] = None,
            offset: int = 0,
            state: Optional[SegmentState] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, SegmentState]:
        """Gates for every segment touched by ``x [b, l, c]`` (tokens at positions ``offset..``).

        Returns ``gates [b, s, e]``, the balance loss, and the state to pass with the next call.
        """
        b, l, c = x.shape
        t = self.segment_length
        first, s, lead = self.segment_layout(l, offset)
        if mask is None:
            mask = x.new_ones(b, l)
        mask = mask.to(x.dtype)
        # per-segment sums of this call's tokens, laid out on segment boundaries
        total = s * t
        xs = F.pad(x * mask.unsqueeze(-1), (0, 0, lead, total - lead - l)).reshape(b, s, t, c).sum(2)
        ms = F.pad(mask, (lead, total - lead - l)).reshape(b, s, t).sum(2)
        # table of segment sums for ids first-1 .. first+s-1 (index 0 is the predecessor of the first)
        zeros_c, zeros_1 = x.new_zeros(b, 1, c), x.new_zeros(b, 1)
        sums, counts = torch.cat([zeros_c, xs], 1), torch.cat([zeros_1, ms], 1)
        if state is not None:
            if state.segment == first:
                head = torch.stack([state.prev_sum, state.sum + sums[:, 1]], 1)
                head_n = torch.stack([state.prev_count, state.count + counts[:, 1]], 1)
                sums, counts = torch.cat([head, sums[:, 2:]], 1), torch.cat([head_n, counts[:, 2:]], 1)
            elif state.segment == first - 1:
                sums = torch.cat([state.sum.unsqueeze(1), sums[:, 1:]], 1)
                counts = torch.cat([state.count.unsqueeze(1), counts[:, 1:]], 1)
            else:
                raise ValueError(
                    f'segment state is at segment {state.segment} but the tokens start in segment {first} '
                    f'(offset {offset}); pass the state returned by the previous call')
        elif offset != 0:
            raise ValueError(f'offset={offset} needs the SegmentState of the tokens before it')
        means = sums / counts.clamp(min=1.).unsqueeze(-1)
        routed = means[:, :s]  # segment k sees the mean of segment k-1
        gates, aux = self.router(routed.reshape(b * s, c))
        gates = gates.reshape(b, s, -1)
        if first == 0:
            gates = torch.cat([self._first_gates(means[:, 1], b), gates[:, 1:]], 1)
        new_state = SegmentState(
            segment=first + s - 1,
            sum=sums[:, s].detach(), count=counts[:, s].detach(),
            prev_sum=sums[:, s - 1].detach(), prev_count=counts[:, s - 1].detach())
        return gates, aux, new_state

    def _first_gates(self, own_mean: torch.Tensor, batch: int) -> torch.Tensor:
        e = self.router.num_choices
        if self.first_segment == 'prior':
            return torch.softmax(self.prior, -1).expand(batch, e).unsqueeze(1)
        if self.first_segment == 'uniform':
            return own_mean.new_full((batch, 1, e), 1. / e)
        gates, _ = self.router(own_mean.detach())
        return gates.unsqueeze(1)
