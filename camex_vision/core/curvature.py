"""Kronecker-factored curvature matrices (CAMEx, method section 3).

Each domain expert ``i`` of a merged linear owns a curvature matrix ``M_i`` acting on its domain vector
``tau_i`` (a ``[d_out, d_in]`` matrix). A full ``M_i`` would have ``(d_out d_in)^2`` entries, so it is factored:

    M_i(tau) = sum_rho (A_rho kron B_rho) @ tau @ (C_rho kron D_rho)^T

with ``d_out = b1 * b2`` and ``d_in = a1 * a2``. The Kronecker products are never formed: ``tau`` is viewed as a
``[b1, b2, a1, a2]`` tensor and each mode is multiplied by its small factor.

Initialisation is exactly the identity for every rank ``r``: the first rank term is ``I kron I`` on both sides,
and every further term starts with ``A = 0`` (its ``B, C, D`` are identity plus small noise so the terms do not
stay copies of one another). The authors' code starts all ``r`` terms at identity, i.e. at ``r * I``, which
silently rescales ``alpha`` by ``r``; this module does not.
"""
import math
from typing import Tuple

import torch
from torch import nn


def kron_split(dim: int) -> Tuple[int, int]:
    """Split ``dim`` into ``(f1, f2)`` with ``f1 * f2 == dim`` and ``f1`` the largest divisor <= floor(sqrt(dim)).

    768 -> (24, 32), 3072 -> (48, 64), 384 -> (16, 24), 1536 -> (32, 48), 192 -> (12, 16).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f'dim={dim!r} must be a positive int')
    f1 = math.isqrt(dim)
    while dim % f1:
        f1 -= 1
    return f1, dim // f1


class CurvatureKron(nn.Module):
    """Learned curvature ``M_i`` for each of ``num_matrices`` domain experts of one ``[out, in]`` linear.

    Shapes: ``e`` experts, ``r`` Kronecker rank, ``tau: [e, out, in] -> [e, out, in]``.
    Parameters: ``a: [e, r, b1, b1]``, ``b: [e, r, b2, b2]``, ``c: [e, r, a1, a1]``, ``d: [e, r, a2, a2]``.
    """

    def __init__(
            self,
            num_matrices: int,
            out_features: int,
            in_features: int,
            rank: int = 1,
            init_noise: float = 1e-2,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_matrices = num_matrices
        self.out_features = out_features
        self.in_features = in_features
        self.rank = rank
        self.out_split = kron_split(out_features)
        self.in_split = kron_split(in_features)
        b1, b2 = self.out_split
        a1, a2 = self.in_split
        self.a = nn.Parameter(torch.empty(num_matrices, rank, b1, b1, **dd))
        self.b = nn.Parameter(torch.empty(num_matrices, rank, b2, b2, **dd))
        self.c = nn.Parameter(torch.empty(num_matrices, rank, a1, a1, **dd))
        self.d = nn.Parameter(torch.empty(num_matrices, rank, a2, a2, **dd))
        self.init_noise = init_noise
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Exact identity: term 0 is ``I kron I``; terms 1.. have ``A = 0`` and near-identity ``B, C, D``."""
        for factor in (self.a, self.b, self.c, self.d):
            n = factor.shape[-1]
            factor.copy_(torch.eye(n, dtype=factor.dtype, device=factor.device).expand_as(factor))
            if self.rank > 1 and factor is not self.a:
                factor[:, 1:].add_(torch.randn_like(factor[:, 1:]) * self.init_noise)
        self.a[:, 1:].zero_()

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        e, out_f, in_f = tau.shape
        if (e, out_f, in_f) != (self.num_matrices, self.out_features, self.in_features):
            raise ValueError(
                f'curvature expects tau of shape {(self.num_matrices, self.out_features, self.in_features)}, '
                f'got {tuple(tau.shape)}')
        b1, b2 = self.out_split
        a1, a2 = self.in_split
        r = self.rank
        # four mode products, one per factor, each a batched matmul on a reshaped view (no permute copies):
        # A on the b1 mode, B on b2, D on a2 (from the right, hence D^T), C on a1; rank terms summed at the end
        t = self.a @ tau.reshape(e, 1, b1, b2 * in_f)  # [e, r, b1, b2*in]
        t = self.b.unsqueeze(2) @ t.reshape(e, r, b1, b2, in_f)  # [e, r, b1, b2, in]
        t = t.reshape(e, r, out_f * a1, a2) @ self.d.transpose(-1, -2)  # [e, r, out*a1, a2]
        t = self.c.unsqueeze(2) @ t.reshape(e, r, out_f, a1, a2)  # [e, r, out, a1, a2]
        return t.sum(1).reshape(e, out_f, in_f)

    def dense_matrices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A kron B, C kron D)`` per expert and rank term, via ``torch.kron``; for tests and inspection only."""
        left = torch.stack([
            torch.stack([torch.kron(self.a[i, r], self.b[i, r]) for r in range(self.rank)])
            for i in range(self.num_matrices)])
        right = torch.stack([
            torch.stack([torch.kron(self.c[i, r], self.d[i, r]) for r in range(self.rank)])
            for i in range(self.num_matrices)])
        return left, right

    def extra_repr(self) -> str:
        return (f'num_matrices={self.num_matrices}, out={self.out_features}={self.out_split}, '
                f'in={self.in_features}={self.in_split}, rank={self.rank}')
