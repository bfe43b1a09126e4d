"""Merging experts' weights: masks, Euclidean and curvature-aware merging, dynamic bases (method sections 2-6).

One ``MergedLinear`` holds the experts of one linear layer: a base ``E_m`` and ``N-1`` domain experts ``E_i``
(weights and biases). With router gates ``s [u, N-1]`` per routing unit it computes

    euclidean:  W_u = E_m + alpha * sum_i s_ui * mask_i * tau_i
    camex:      W_u = E_m + alpha * sum_i s_ui * mask_i * M_i(tau_i),      tau_i = E_i - E_m

(``M_i`` is linear, so ``M_i(s tau) = s M_i(tau)`` and the curvature runs once per forward for the whole batch.)
The expert deltas are computed once, merged in one ``[u, N-1] @ [N-1, out*in]`` contraction and applied per unit
with a batched matmul; no ``[u, N-1, out, in]`` tensor ever exists. Biases merge the same way, without curvature.

Masks are computed from the raw ``tau_i`` and applied to the curvature-transformed deltas, as the authors do:
TIES sign election (with optional magnitude trim to ``density``) and DARE random drop with rescale (training
only; ``dare_mode='expert'`` drops a whole expert per unit as the authors' code does, ``'element'`` drops single
parameters as the DARE paper does).
"""
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .curvature import CurvatureKron
from .options import DARE_MODES, MASKS, MERGES, check_choice, check_finite, check_int, check_unit_interval


def ties_mask(tau: torch.Tensor, density: float = 1.0) -> torch.Tensor:
    """TIES: keep entries whose sign agrees with the elected sign ``sign(sum_j trimmed tau_j)``.

    Args:
        tau: ``[e, ...]`` domain vectors of the ``e`` experts.
        density: fraction of largest-magnitude entries of each expert kept before the election (1 = no trim).

    Returns:
        A ``{0, 1}`` mask of ``tau``'s shape and dtype (no gradient).
    """
    with torch.no_grad():
        keep = None
        if density < 1.0:
            flat = tau.abs().reshape(tau.shape[0], -1)
            k = max(1, int(round(density * flat.shape[1])))
            threshold = flat.topk(k, dim=1).values[:, -1:]
            keep = (flat >= threshold).reshape(tau.shape)
            tau = tau * keep
        agree = torch.sign(tau) == torch.sign(tau.sum(0, keepdim=True))
        if keep is not None:
            agree = agree & keep
        return agree.to(tau.dtype)


def dare_keep(shape: Sequence[int], p: float, like: torch.Tensor) -> torch.Tensor:
    """DARE keep mask: ``Bernoulli(1-p) / (1-p)`` of ``shape``, so the expectation is unchanged."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1. - p) / (1. - p)


class _MergeScratch(threading.local):
    """Reusable CPU buffers for the temporaries of inference passes (one set per thread).

    Without gradients, a layer's expert deltas ``[N-1, out, in]`` and merged weights ``[u, out, in]`` are temporaries
    consumed within its forward. On the CPU a fresh buffer of that size (tens to hundreds of MiB) comes straight from
    the kernel and goes back on free, so every forward pass would pay the page faults of first touch (about 2 GiB/s
    here, against about 18 GiB/s for writing memory the process holds): that made reparameterised inference 1.5x
    (ViT-S) to 1.7x (ViT-B) dense at FFN level. One buffer per kind, grown to the largest request and reused by
    every layer, removes that cost (1.2-1.3x remain: the merged weights' own memory traffic). They are never used
    with autograd, autocast, ``torch.compile`` or ``torch.func`` transforms, nor on accelerators (their caching
    allocators reuse memory already). ``release_merge_scratch()`` frees them.
    """

    def __init__(self):
        self.buffers: Dict[str, torch.Tensor] = {}

    def get(self, kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(kind)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self.buffers.pop(kind, None)  # free the old one before allocating the new one
            with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
                buf = self.buffers[kind] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_SCRATCH = _MergeScratch()


def release_merge_scratch() -> None:
    """Free this thread's CPU scratch buffers for inference passes (they are reallocated when next needed)."""
    _SCRATCH.buffers.clear()


def _scratch_allowed(x: torch.Tensor) -> bool:
    """Whether this pass may use the scratch buffers: CPU, no autograd, no autocast, not being compiled, not inside
    a ``torch.func`` transform (``vmap`` has no batching rule for ``out=``)."""
    return not (torch.compiler.is_compiling() or x.device.type != 'cpu' or torch.is_grad_enabled()
                or torch.is_autocast_enabled('cpu') or torch._C._functorch.is_functorch_wrapped_tensor(x))


class _BaseLink:
    """Where a dynamic layer's base comes from: the layer before it in the chain (a plain reference, so the
    previous layer's parameters are neither registered twice nor saved twice)."""

    def __init__(self, prev: 'MergedLinear'):
        self.prev = prev


class MergedLinear(nn.Module):
    """The experts of one linear layer, merged per routing unit.

    Parameters: ``weight_base [out, in]``, ``bias_base [out]`` (absent for dynamic-chain followers),
    ``weight_experts [N-1, out, in]``, ``bias_experts [N-1, out]``, and ``curvature`` for ``merge='camex'``.
    """

    def __init__(
            self,
            in_features: int,
            out_features: int,
            num_experts: int = 8,
            bias: bool = True,
            merge: str = 'camex',
            mask: Optional[str] = 'ties',
            kron_rank: int = 1,
            alpha: float = 1.0,
            density: float = 1.0,
            dare_p: float = 0.1,
            dare_mode: str = 'expert',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_features = check_int('in_features', in_features, 1)
        self.out_features = check_int('out_features', out_features, 1)
        self.num_experts = check_int('num_experts', num_experts, 2)
        self.merge = check_choice('merge', merge, MERGES)
        self.mask = check_choice('mask', mask, MASKS)
        self.kron_rank = check_int('kron_rank', kron_rank, 1)
        self.alpha = check_finite('alpha', alpha)
        self.density = check_unit_interval('density', density, closed_low=False, closed_high=True)
        self.dare_p = check_unit_interval('dare_p', dare_p, closed_low=True, closed_high=False)
        self.dare_mode = check_choice('dare_mode', dare_mode, DARE_MODES)
        e = num_experts - 1
        self.weight_base = nn.Parameter(torch.empty(out_features, in_features, **dd))
        self.weight_experts = nn.Parameter(torch.empty(e, out_features, in_features, **dd))
        if bias:
            self.bias_base = nn.Parameter(torch.empty(out_features, **dd))
            self.bias_experts = nn.Parameter(torch.empty(e, out_features, **dd))
        else:
            self.register_parameter('bias_base', None)
            self.register_parameter('bias_experts', None)
        self.curvature = CurvatureKron(e, out_features, in_features, kron_rank, **dd) if merge == 'camex' else None
        self._link: Optional[_BaseLink] = None
        self._outgoing: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self.reset_parameters()

    def __getstate__(self):
        # the propagated base is a per-pass cache holding autograd history: never copy or pickle it
        return {**self.__dict__, '_outgoing': None}

    @property
    def num_domain(self) -> int:
        return self.num_experts - 1

    @property
    def has_bias(self) -> bool:
        return self.bias_experts is not None

    @property
    def owns_base(self) -> bool:
        return self._link is None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """From-scratch init: every expert independently initialised like ``nn.Linear``."""
        bound = self.in_features ** -0.5
        for w in [self.weight_base, self.weight_experts][int(not self.owns_base):]:
            nn.init.uniform_(w, -bound, bound)
        if self.has_bias:
            for b in [self.bias_base, self.bias_experts][int(not self.owns_base):]:
                nn.init.uniform_(b, -bound, bound)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Upcycling: copy a dense ``[out, in]`` weight (and bias) into the base and every domain expert."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f'cannot upcycle a dense weight of shape {tuple(weight.shape)} into experts of shape '
                f'{(self.out_features, self.in_features)}')
        if (bias is not None) != self.has_bias:
            raise ValueError(f'dense layer has bias={bias is not None} but the merged layer has bias={self.has_bias}')
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f'cannot upcycle a dense bias of shape {tuple(bias.shape)}; expected ({self.out_features},)')
        if self.owns_base:
            self.weight_base.copy_(weight)
        self.weight_experts.copy_(weight.expand_as(self.weight_experts))
        if bias is not None:
            if self.owns_base:
                self.bias_base.copy_(bias)
            self.bias_experts.copy_(bias.expand_as(self.bias_experts))
        if self.curvature is not None:
            self.curvature.reset_parameters()

    # ---- dynamic merging (method section 5) ----

    def link_base(self, prev: 'MergedLinear') -> None:
        """Make this layer a follower in a dynamic chain: its base is propagated from ``prev``,
        ``E_m^{l+1} = E_m^l + alpha / (N-1) * sum_i M_i^l(tau_i^l)``; its own base parameters are removed."""
        if (prev.out_features, prev.in_features, prev.has_bias) != (self.out_features, self.in_features, self.has_bias):
            raise ValueError(
                f'cannot chain a base of shape {(prev.out_features, prev.in_features)} (bias={prev.has_bias}) into '
                f'a layer of shape {(self.out_features, self.in_features)} (bias={self.has_bias})')
        if self.owns_base:
            del self.weight_base
            self.weight_base = None
            if self.has_bias:
                del self.bias_base
                self.bias_base = None
        self._link = _BaseLink(prev)

    def base(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This layer's base ``(weight, bias)``: owned, or the previous chain layer's outgoing base."""
        if self.owns_base:
            return self.weight_base, self.bias_base
        prev = self._link.prev
        # produced by prev's forward earlier in this pass; kept (not consumed) so that activation checkpointing
        # recomputes this layer with exactly the tensors of the original forward
        outgoing = prev._outgoing
        if outgoing is None:
            (base_w, base_b), (_, delta_w, delta_b) = prev._transformed()
            outgoing = prev._propagate(base_w, base_b, delta_w, delta_b)
        return outgoing

    # ---- merging ----

    def _transformed(self, base=None, tau_out: Optional[torch.Tensor] = None):
        """This pass's base and the raw and curvature-transformed domain vectors (``tau_w`` written into
        ``tau_out`` when given).

        Returns ``((base_w, base_b), (tau_w, delta_w [e, out, in], delta_b [e, out] | None))``.
        """
        base_w, base_b = self.base() if base is None else base
        if tau_out is not None:
            tau_w = torch.sub(self.weight_experts, base_w, out=tau_out.view(self.weight_experts.shape))
        else:
            tau_w = self.weight_experts - base_w
        delta_w = self.curvature(tau_w) if self.curvature is not None else tau_w
        delta_b = self.bias_experts - base_b if self.has_bias else None
        return (base_w, base_b), (tau_w, delta_w, delta_b)

    def _propagate(self, base_w, base_b, delta_w, delta_b):
        """The base handed to the next layer of a dynamic chain: ``E_m + alpha / (N-1) * sum_i M_i(tau_i)``."""
        scale = self.alpha / self.num_domain
        next_w = base_w + scale * delta_w.sum(0)
        next_b = base_b + scale * delta_b.sum(0) if delta_b is not None else None
        return next_w, next_b

    def expert_deltas(self, base=None, tau_out: Optional[torch.Tensor] = None):
        """Base and the masked, curvature-transformed, alpha-scaled deltas for this forward pass.

        Returns ``(base_w [out, in], base_b [out] | None, delta_w [e, out, in], delta_b [e, out] | None)``;
        the merged weight of a unit with gates ``s`` is ``base_w + sum_i s_i delta_w[i]``. DARE's element mode
        is drawn here (once per forward); its expert mode acts on the gates instead (see ``merge_gates``).
        ``tau_out`` (``(N-1) * out * in`` elements, no autograd) receives the raw domain vectors; without curvature,
        mask or alpha, ``delta_w`` is that buffer.
        """
        (base_w, base_b), (tau_w, delta_w, delta_b) = self._transformed(base, tau_out)
        if self._has_follower:
            self._outgoing = self._propagate(base_w, base_b, delta_w, delta_b)
        if self.mask == 'ties':
            delta_w = delta_w * ties_mask(tau_w, self.density)
            if delta_b is not None:
                delta_b = delta_b * ties_mask(delta_b, self.density)
        elif self.mask == 'dare' and self.training and self.dare_p > 0 and self.dare_mode == 'element':
            delta_w = delta_w * dare_keep(delta_w.shape, self.dare_p, delta_w)
            if delta_b is not None:
                delta_b = delta_b * dare_keep(delta_b.shape, self.dare_p, delta_b)
        if self.alpha != 1.0:
            delta_w = delta_w * self.alpha
            delta_b = delta_b * self.alpha if delta_b is not None else None
        return base_w, base_b, delta_w, delta_b

    _has_follower = False  # set by link_dynamic_chain on every layer that has a successor

    def merge_gates(self, gates: torch.Tensor) -> torch.Tensor:
        """DARE expert mode: drop whole experts per unit in training (the authors' Dropout2d over experts)."""
        if self.mask == 'dare' and self.training and self.dare_p > 0 and self.dare_mode == 'expert':
            return gates * dare_keep(gates.shape, self.dare_p, gates)
        return gates

    def merged_weights(self, gates: torch.Tensor, scratch: bool = False
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Merged ``(weight [u, out, in], bias [u, out] | None)`` for gates ``[u, N-1]``.

        ``scratch=True`` (no autograd; what ``forward`` does for CPU inference) builds the deltas and the merged
        weights in this thread's reusable buffers: the returned weight is overwritten by the next such call.
        """
        dtype, numel = self.weight_experts.dtype, self.out_features * self.in_features
        tau_out = _SCRATCH.get('deltas', self.num_domain * numel, dtype) if scratch else None
        base_w, base_b, delta_w, delta_b = self.expert_deltas(tau_out=tau_out)
        gates = self.merge_gates(gates).to(delta_w.dtype)
        u, e = gates.shape
        out = _SCRATCH.get('weights', u * numel, dtype).view(u, numel) if scratch else None
        weight = torch.addmm(base_w.reshape(1, -1), gates, delta_w.reshape(e, -1), out=out).view(u, *base_w.shape)
        bias = torch.addmm(base_b.unsqueeze(0), gates, delta_b) if delta_b is not None else None
        return weight, bias

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``x [u, l, in]`` with ``gates [u, N-1]`` -> ``[u, l, out]``: unit ``j``'s tokens use merged weight ``j``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f'expected input with {self.in_features} features, got {x.shape[-1]}')
        if gates.shape != (x.shape[0], self.num_domain):
            raise ValueError(f'expected gates of shape {(x.shape[0], self.num_domain)}, got {tuple(gates.shape)}')
        weight, bias = self.merged_weights(gates, scratch=_scratch_allowed(x))
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    # ---- test-time reparameterisation (method section 6) ----

    @torch.no_grad()
    def reparameterize_(self, base: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None) -> None:
        """Fold curvature, the fixed TIES mask, alpha and the dynamic base into plain experts, in place.

        Afterwards the layer is a Euclidean merge with ``alpha = 1``, no mask and an owned base, and computes the
        same outputs in eval mode (DARE is training-only, so it folds to no mask). Fold a whole dynamic chain with
        ``camex_vision.reparameterize``, which computes every base before folding any layer.
        """
        was_training = self.training
        self.eval()
        base_w, base_b, delta_w, delta_b = self.expert_deltas(base)
        self.train(was_training)
        base_w, base_b = base_w.detach().clone(), base_b.detach().clone() if base_b is not None else None
        self.weight_experts.copy_(base_w + delta_w)
        if delta_b is not None:
            self.bias_experts.copy_(base_b + delta_b)
        if not self.owns_base:
            self._link = None
            self.weight_base = nn.Parameter(base_w)
            if base_b is not None:
                self.bias_base = nn.Parameter(base_b)
        self._outgoing, self._has_follower = None, False
        self.merge, self.mask, self.alpha, self.curvature = 'euclidean', None, 1.0, None

    def extra_repr(self) -> str:
        return (f'in={self.in_features}, out={self.out_features}, num_experts={self.num_experts}, merge={self.merge}, '
                f'mask={self.mask}, alpha={self.alpha}, dynamic_follower={not self.owns_base}')


def link_dynamic_chain(layers: List[MergedLinear]) -> List[List[MergedLinear]]:
    """Link same-shape ``layers`` (in forward order) into dynamic chains; a shape change restarts the chain.

    The first layer of each chain keeps its base; every later one inherits a propagated base. Layers must then
    run in this order within a forward pass (each consumes the base its predecessor just propagated).

    Returns:
        The chains formed.
    """
    chains: List[List[MergedLinear]] = []
    for layer in layers:
        prev = chains[-1][-1] if chains else None
        same = prev is not None and (prev.out_features, prev.in_features, prev.has_bias) == (
            layer.out_features, layer.in_features, layer.has_bias)
        if same:
            layer.link_base(prev)
            prev._has_follower = True
            chains[-1].append(layer)
        else:
            chains.append([layer])
    return chains
