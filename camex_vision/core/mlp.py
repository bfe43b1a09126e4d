"""Drop-in MoE replacements for timm's ``Mlp``: the merging ``CAMExMlp`` and the token-choice ``SMoEMlp``.

Both take timm ``Mlp``'s constructor arguments (``in_features, hidden_features, out_features, act_layer,
norm_layer, bias, drop``) plus keyword-only MoE options, accept ``[b, ..., c]`` inputs and record, after each
forward, ``last_aux_loss`` (the weighted balance loss, or ``None``) and ``last_usage`` (mean gate per expert).

``CAMExMlp`` routes one unit per sample (mean of its tokens, optionally over a padding mask), or causal segments
of ``segment_length`` tokens for decoders. The whole FFN is the expert, with one router per FFN by default: both
linears merge with the same gates, so a unit gets one coherent merged FFN (as in SMEAR and Lory) and the router
sees the block input. ``router_per='linear'`` gives the second linear its own router on the hidden activations,
as the authors' code does.
"""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .merge import MergedLinear
from .options import ROUTER_PER, check_choice, check_finite, check_int, check_num_experts, resolve_top_k
from .router import Router, SegmentRouting, SegmentState, pool_units


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass
class SegmentCache:
    """Incremental-decoding state of one ``CAMExMlp`` with segment routing: the position of the next token and
    one ``SegmentState`` per router. Pass the same object on every call; it is updated in place."""
    offset: int = 0
    states: List[Optional[SegmentState]] = field(default_factory=list)


class MoEModule(nn.Module):
    """What every MoE layer exposes to training loops: the last balance loss and expert usage."""
    last_aux_loss: Optional[torch.Tensor] = None
    last_usage: Optional[torch.Tensor] = None

    def __getstate__(self):
        # the last balance loss is a non-leaf tensor: drop it so deepcopy (model EMA) and pickling work
        return {**self.__dict__, 'last_aux_loss': None}

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f'{type(self).__name__} expects {self.in_features} input features, got {x.shape[-1]}')

    def _record(self, gates: torch.Tensor, aux: torch.Tensor) -> None:
        self.last_usage = gates.detach().reshape(-1, gates.shape[-1]).float().mean(0)
        self.last_aux_loss = self.balance_coef * aux if self.balance_coef > 0 else None


class CAMExMlp(MoEModule):
    """Merging SMoE FFN: ``fc1 -> act -> drop -> norm -> fc2 -> drop`` with merged experts per routing unit."""
    merged_names: Tuple[str, ...] = ('fc1', 'fc2')

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
            *,
            num_experts: int = 8,
            merge: str = 'camex',
            mask: Optional[str] = 'ties',
            kron_rank: int = 1,
            alpha: float = 1.0,
            top_k: Optional[int] = None,
            density: float = 1.0,
            dare_p: float = 0.1,
            dare_mode: str = 'expert',
            router_per: str = 'ffn',
            router_noise: bool = True,
            balance_coef: float = 0.0,
            segment_length: Optional[int] = None,
            first_segment: str = 'prior',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.num_experts = check_num_experts(num_experts)
        self.top_k = resolve_top_k(top_k, num_experts)
        self.router_per = check_choice('router_per', router_per, ROUTER_PER)
        self.balance_coef = check_finite('balance_coef', balance_coef)
        if self.balance_coef < 0:
            raise ValueError(f'balance_coef={balance_coef!r} must be >= 0')
        self.segment_length = None if segment_length is None else check_int('segment_length', segment_length, 1)
        bias1, bias2 = _pair(bias)
        drop1, drop2 = _pair(drop)
        merge_opts = dict(num_experts=num_experts, merge=merge, mask=mask, kron_rank=kron_rank, alpha=alpha,
                          density=density, dare_p=dare_p, dare_mode=dare_mode, **dd)
        self.fc1 = MergedLinear(in_features, hidden_features, bias=bias1, **merge_opts)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = MergedLinear(hidden_features, out_features, bias=bias2, **merge_opts)
        self.drop2 = nn.Dropout(drop2)
        router_dims = [in_features] + ([hidden_features] if router_per == 'linear' else [])
        routers = [Router(d, num_experts - 1, self.top_k, router_noise, **dd) for d in router_dims]
        if self.segment_length is not None:
            routers = [SegmentRouting(r, self.segment_length, first_segment) for r in routers]
        self.routers = nn.ModuleList(routers)

    @classmethod
    def from_dense(cls, mlp: Union[nn.Module, Tuple[nn.Linear, nn.Linear]], **options) -> 'CAMExMlp':
        """Exact upcycling: base and every domain expert copy the dense weights, curvature starts at identity and
        the router is fresh, so the result computes what ``mlp`` computes.

        Args:
            mlp: a timm ``Mlp`` (or any module with ``fc1``/``fc2`` linears, whose ``act``, ``norm`` and dropouts
                are copied), or a ``(fc1, fc2)`` pair of linears (pass ``act_layer`` in ``options``).
            options: ``CAMExMlp`` keyword options.
        """
        fc1, fc2 = (mlp.fc1, mlp.fc2) if isinstance(mlp, nn.Module) else mlp
        for name, fc in (('fc1', fc1), ('fc2', fc2)):
            if not isinstance(fc, nn.Linear):
                raise ValueError(f'cannot upcycle {name} of type {type(fc).__name__}; expected nn.Linear')
        if fc1.out_features != fc2.in_features:
            raise ValueError(f'fc1 has {fc1.out_features} outputs but fc2 expects {fc2.in_features} inputs')
        p = fc1.weight
        moe = cls(fc1.in_features, fc1.out_features, fc2.out_features,
                  bias=(fc1.bias is not None, fc2.bias is not None), device=p.device, dtype=p.dtype, **options)
        if isinstance(mlp, nn.Module):
            for name in ('act', 'drop1', 'norm', 'drop2'):
                if hasattr(mlp, name):
                    setattr(moe, name, copy.deepcopy(getattr(mlp, name)))
        moe.load_dense(fc1, fc2)
        return moe

    def load_dense(self, *linears: nn.Linear) -> None:
        """Upcycle in place from dense linears, one per name in ``merged_names`` (see ``from_dense``)."""
        if len(linears) != len(self.merged_names):
            raise ValueError(f'expected {len(self.merged_names)} dense linears {self.merged_names}, got {len(linears)}')
        for name, fc in zip(self.merged_names, linears):
            getattr(self, name).load_dense(fc.weight, fc.bias)

    def upcycled_state_dict(self, dense: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This module's state dict with experts upcycled from a dense ``Mlp`` state dict (``fc1.weight`` ...).

        Router and curvature entries are this module's current values; other dense entries (``norm.*``) pass
        through. Used by checkpoint filters to upcycle dense checkpoints exactly.
        """
        out = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for name in self.merged_names:
            layer: MergedLinear = getattr(self, name)
            for kind in ('weight', 'bias'):
                key = f'{name}.{kind}'
                value = dense.get(key)
                if (value is None) != (getattr(layer, f'{kind}_experts') is None):
                    raise ValueError(f'dense checkpoint {"lacks" if value is None else "has unexpected"} {key}')
                if value is None:
                    continue
                expected = tuple(getattr(layer, f'{kind}_experts').shape[1:])
                if tuple(value.shape) != expected:
                    raise ValueError(f'cannot upcycle {key} of shape {tuple(value.shape)}; expected {expected}')
                if layer.owns_base:
                    out[f'{key}_base'] = value.clone()
                out[f'{key}_experts'] = value.unsqueeze(0).repeat(layer.num_domain, *([1] * value.dim()))
            if layer.curvature is not None:
                eye = CAMExMlp._identity_curvature(layer)
                out.update({f'{name}.curvature.{k}': v for k, v in eye.items()})
        for key, value in dense.items():
            if key.split('.')[0] not in self.merged_names:
                if key not in out:
                    raise ValueError(f'dense checkpoint entry {key} has no counterpart in {type(self).__name__}')
                out[key] = value
        return out

    @staticmethod
    def _identity_curvature(layer: MergedLinear) -> Dict[str, torch.Tensor]:
        fresh = copy.deepcopy(layer.curvature)
        fresh.reset_parameters()
        return {k: v.detach() for k, v in fresh.state_dict().items()}

    # ---- forward ----

    def _route(self, idx: int, x: torch.Tensor, mask: Optional[torch.Tensor], cache: Optional[SegmentCache]):
        router = self.routers[idx]
        if self.segment_length is None:
            gates, aux = router(pool_units(x, mask))
            return gates, aux
        state = None
        if cache is not None:
            while len(cache.states) <= idx:
                cache.states.append(None)
            state = cache.states[idx]
        gates, aux, new_state = router(x, mask, cache.offset if cache is not None else 0, state)
        if cache is not None:
            cache.states[idx] = new_state
        return gates, aux

    def _units(self, x: torch.Tensor, offset: int) -> Tuple[torch.Tensor, int]:
        """``[b, l, c] -> [b * s, t, c]`` on segment boundaries (zero padded), or ``[b, l, c]`` for one unit each."""
        if self.segment_length is None:
            return x, 0
        b, l, c = x.shape
        _, s, lead = self.routers[0].segment_layout(l, offset)
        if s == 1:
            return x, 0
        t = self.segment_length
        x = F.pad(x, (0, 0, lead, s * t - lead - l))
        return x.reshape(b * s, t, c), lead

    def _tokens(self, y: torch.Tensor, b: int, l: int, lead: int) -> torch.Tensor:
        """Inverse of ``_units``."""
        if y.shape[0] == b:
            return y
        return y.reshape(b, -1, y.shape[-1])[:, lead:lead + l]

    def _hidden(self, units: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(units, gates))

    def forward(
            self,
            x: torch.Tensor,
            mask: Optional[torch.Tensor] = None,
            cache: Optional[SegmentCache] = None,
    ) -> torch.Tensor:
        """``x [b, ..., c]``; ``mask [b, l]`` marks valid tokens for pooling; ``cache`` for incremental decoding."""
        self._check_input(x)
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        b, l, _ = x.shape
        offset = cache.offset if cache is not None else 0
        gates, aux = self._route(0, x, mask, cache)
        units, lead = self._units(x, offset)
        gates1 = gates.reshape(units.shape[0], -1)
        h = self.norm(self.drop1(self._hidden(units, gates1)))
        gates2 = gates1
        if self.router_per == 'linear':
            g2, aux2 = self._route(1, self._tokens(h, b, l, lead), mask, cache)
            gates2, aux = g2.reshape(units.shape[0], -1), aux + aux2
        y = self.drop2(self.fc2(h, gates2))
        if cache is not None:
            cache.offset += l
        self._record(gates, aux)
        return self._tokens(y, b, l, lead).reshape(*shape[:-1], self.out_features)


class CAMExGatedMlp(CAMExMlp):
    """Gated merging FFN (T5 v1.1 / GLU style): ``fc2(drop(norm(act(fc1_gate(x)) * fc1(x))))``.

    ``fc1_gate`` is the activated projection (T5's ``wi_0``), ``fc1`` the linear one (``wi_1``), ``fc2`` the
    output (``wo``). All three merge with the gates of the first router.
    """
    merged_names = ('fc1_gate', 'fc1', 'fc2')

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, *args, **kwargs):
        super().__init__(in_features, hidden_features, *args, **kwargs)
        fc1 = self.fc1
        self.fc1_gate = MergedLinear(
            fc1.in_features, fc1.out_features, fc1.num_experts, bias=fc1.has_bias, merge=fc1.merge, mask=fc1.mask,
            kron_rank=fc1.kron_rank, alpha=fc1.alpha, density=fc1.density, dare_p=fc1.dare_p, dare_mode=fc1.dare_mode,
            device=fc1.weight_experts.device, dtype=fc1.weight_experts.dtype)

    @classmethod
    def from_dense(cls, linears: Tuple[nn.Linear, nn.Linear, nn.Linear], **options) -> 'CAMExGatedMlp':
        """Exact upcycling from dense ``(gate, value, out)`` linears (T5's ``wi_0, wi_1, wo``); pass ``act_layer``."""
        gate, value, out = linears
        if gate.weight.shape != value.weight.shape or value.out_features != out.in_features:
            raise ValueError(f'inconsistent gated FFN shapes: gate {tuple(gate.weight.shape)}, '
                             f'value {tuple(value.weight.shape)}, out {tuple(out.weight.shape)}')
        if (gate.bias is None) != (value.bias is None):
            raise ValueError('gate and value projections must both have or both lack a bias')
        p = value.weight
        moe = cls(value.in_features, value.out_features, out.out_features,
                  bias=(value.bias is not None, out.bias is not None), device=p.device, dtype=p.dtype, **options)
        moe.load_dense(gate, value, out)
        return moe

    def _hidden(self, units: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1_gate(units, gates)) * self.fc1(units, gates)


class SMoEMlp(MoEModule):
    """Token-choice sparse MoE (the paper's "SMoE" baseline): each token goes to its top-k of N expert FFNs and
    the outputs are mixed by the renormalised gates. Experts are independent timm-style MLPs stored stacked.

    Every expert runs each forward, on an empty selection if no token chose it, so every parameter always has
    a gradient (zero for an unused expert).
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
            *,
            num_experts: int = 8,
            top_k: int = 2,
            router_noise: bool = True,
            balance_coef: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.num_experts = check_int('num_experts', num_experts, 2)
        self.top_k = check_int('top_k', top_k, 1, num_experts)
        self.balance_coef = check_finite('balance_coef', balance_coef)
        if self.balance_coef < 0:
            raise ValueError(f'balance_coef={balance_coef!r} must be >= 0')
        bias1, bias2 = _pair(bias)
        drop1, drop2 = _pair(drop)
        n = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(n, hidden_features, in_features, **dd))
        self.fc1_bias = nn.Parameter(torch.empty(n, hidden_features, **dd)) if bias1 else None
        self.fc2_weight = nn.Parameter(torch.empty(n, out_features, hidden_features, **dd))
        self.fc2_bias = nn.Parameter(torch.empty(n, out_features, **dd)) if bias2 else None
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.drop2 = nn.Dropout(drop2)
        self.router = Router(in_features, n, self.top_k, router_noise, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    @classmethod
    def from_dense(cls, mlp: Union[nn.Module, Tuple[nn.Linear, nn.Linear]], **options) -> 'SMoEMlp':
        """Upcycling: every expert copies the dense FFN, so the output equals the dense output (gates sum to 1)."""
        fc1, fc2 = (mlp.fc1, mlp.fc2) if isinstance(mlp, nn.Module) else mlp
        p = fc1.weight
        moe = cls(fc1.in_features, fc1.out_features, fc2.out_features,
                  bias=(fc1.bias is not None, fc2.bias is not None), device=p.device, dtype=p.dtype, **options)
        if isinstance(mlp, nn.Module):
            for name in ('act', 'drop1', 'norm', 'drop2'):
                if hasattr(mlp, name):
                    setattr(moe, name, copy.deepcopy(getattr(mlp, name)))
        moe.load_state_dict(moe.upcycled_state_dict({k: v for k, v in (
            ('fc1.weight', fc1.weight), ('fc1.bias', fc1.bias), ('fc2.weight', fc2.weight), ('fc2.bias', fc2.bias))
            if v is not None}), strict=False)
        return moe

    def upcycled_state_dict(self, dense: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This module's state dict with every expert set to the dense ``Mlp`` state dict's FFN."""
        out = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for key, value in dense.items():
            if key.startswith(('fc1.', 'fc2.')):
                name = key.replace('.', '_')
                expected = getattr(self, name)
                if expected is None or tuple(expected.shape[1:]) != tuple(value.shape):
                    raise ValueError(f'cannot upcycle {key} of shape {tuple(value.shape)} into {name} '
                                     f'{None if expected is None else tuple(expected.shape)}')
                out[name] = value.detach().unsqueeze(0).repeat(self.num_experts, *([1] * value.dim()))
            elif key in out:
                out[key] = value
            else:
                raise ValueError(f'dense checkpoint entry {key} has no counterpart in {type(self).__name__}')
        return out

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        gates, aux = self.router(tokens)  # [t, n], zeros outside each token's top-k
        out = None
        for e in range(self.num_experts):
            idx = gates[:, e].nonzero().squeeze(1)
            h = F.linear(tokens[idx], self.fc1_weight[e], self.fc1_bias[e] if self.fc1_bias is not None else None)
            h = self.norm(self.drop1(self.act(h)))
            y = F.linear(h, self.fc2_weight[e], self.fc2_bias[e] if self.fc2_bias is not None else None)
            if out is None:  # in the experts' output dtype (bfloat16 under autocast, like a dense Mlp's)
                out = y.new_zeros(tokens.shape[0], self.out_features)
            out = out.index_add(0, idx, y * gates[idx, e:e + 1].to(y.dtype))
        self._record(gates, aux)
        return self.drop2(out).reshape(*shape[:-1], self.out_features)
