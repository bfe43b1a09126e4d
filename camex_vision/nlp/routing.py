"""Routing inputs that transformers does not hand to FFNs: the padding mask and the incremental-decoding state.

transformers calls a feed-forward block as ``mlp(hidden_states)``. A merging FFN needs two more things:

* the padding mask of the current tokens, so that a sequence (or segment) is pooled over its real tokens only;
* for causal segment routing during incremental decoding, the position of the first new token and the segment sums
  of the tokens before it (a ``SegmentCache`` per layer).

One ``StackRouting`` per transformer stack (GPT-2's ``GPT2Model``, T5's encoder and decoder ``T5Stack``) records
them in a forward pre-hook on the stack and the stack's converted FFNs (``RoutedCAMExMlp``, ``RoutedCAMExGatedMlp``)
read them. The per-layer ``SegmentCache`` list lives alongside the generation ``Cache`` object it belongs to (a weak
mapping, so it dies with the cache) and is started afresh whenever a forward pass starts at position 0.
``ModelRouting`` is the model-level part: it adds the balance loss to the returned loss and reorders the segment
state with the KV cache during beam search.
"""
import dataclasses
import inspect
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..core import CAMExGatedMlp, CAMExMlp, MoEModule, SegmentCache, aux_loss


def _arg(names: Sequence[str], args: tuple, kwargs: Dict[str, Any], name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, whether passed by keyword or by position (``names`` is the positional order)."""
    if name in kwargs:
        return kwargs[name]
    if name in names:
        index = names.index(name)
        if index < len(args):
            return args[index]
    return default


def positional_names(module: nn.Module) -> Tuple[str, ...]:
    """Names of ``module.forward``'s parameters that can be passed by position, in order."""
    params = inspect.signature(module.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


class StackRouting:
    """What the converted FFNs of one transformer stack need from the current forward pass.

    Args:
        arg_names: positional parameter names of the stack's ``forward``.
        num_layers: number of converted FFNs in the stack (their ``layer_index`` is ``0..num_layers-1``).
        segment_routed: whether the FFNs use causal segment routing (decoders) or route whole sequences.
        name: the stack's name, for error messages.
        uses_cache: whether the stack reads a KV cache (T5's encoder ignores one).
    """

    def __init__(self, arg_names: Sequence[str], num_layers: int, segment_routed: bool, name: str,
                 uses_cache: bool = True):
        self.arg_names = tuple(arg_names)
        self.num_layers = num_layers
        self.segment_routed = segment_routed
        self.name = name
        self.uses_cache = uses_cache
        self._reset_call()
        self._states: weakref.WeakKeyDictionary[Cache, List[SegmentCache]] = weakref.WeakKeyDictionary()

    def _reset_call(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.caches: Optional[List[SegmentCache]] = None
        self._pending = False

    def __getstate__(self):
        # per-call tensors and generation states belong to one model instance's current pass: never copy them
        state = dict(self.__dict__)
        state.update(mask=None, caches=None, _pending=False, _states=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._states = weakref.WeakKeyDictionary()

    # ---- hooks on the stack ----

    def before_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Forward pre-hook: record the padding mask and pick the segment caches for this call."""
        self._reset_call()
        names = self.arg_names
        ref = _arg(names, args, kwargs, 'input_ids')
        embeds = ref is None
        if embeds:
            ref = _arg(names, args, kwargs, 'inputs_embeds')
        if ref is None:
            return  # the stack itself raises its own error for missing inputs
        length = ref.shape[-2] if embeds else ref.shape[-1]
        batch = ref.numel() // (length * (ref.shape[-1] if embeds else 1)) if length else 0
        self.mask = self._current_mask(_arg(names, args, kwargs, 'attention_mask'), batch, length)
        if not self.uses_cache:
            return
        cache = _arg(names, args, kwargs, 'cache')
        if cache is None:
            cache = kwargs.get('past_key_values')
        use_cache = _arg(names, args, kwargs, 'use_cache')
        if use_cache is None:
            use_cache = bool(getattr(getattr(module, 'config', None), 'use_cache', False))
        checkpointing = module.training and torch.is_grad_enabled() and any(
            getattr(m, 'gradient_checkpointing', False) for m in module.modules())
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if past > 0:
            self.caches = self._resume(cache, past, batch, checkpointing)
        elif self.segment_routed and (cache is not None or use_cache) and not checkpointing:
            self.caches = [SegmentCache() for _ in range(self.num_layers)]
            if isinstance(cache, Cache):
                self._states[cache] = self.caches
            else:
                self._pending = True  # the stack creates the cache; registered when it returns it

    def after_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
        """Forward hook: attach fresh segment caches to a generation cache the stack created itself."""
        if not self._pending:
            return
        self._pending = False
        cache = getattr(output, 'cache', None)
        if cache is None and isinstance(output, tuple):
            cache = next((o for o in output if isinstance(o, Cache)), None)
        if isinstance(cache, Cache):
            self._states[cache] = self.caches

    def _current_mask(self, mask: Optional[torch.Tensor], batch: int, length: int) -> Optional[torch.Tensor]:
        """``[batch, length]`` bool mask of the current tokens' real (non-padding) positions, or ``None`` for none."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            kind = f'{mask.dim()}D tensor' if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f'{self.name}: CAMEx routing pools over the 2D padding mask [batch, length]; got an attention_mask '
                f'that is a {kind}. Pass the tokenizer\'s 2D attention_mask.')
        valid = mask != 0
        if valid.shape[0] != batch or valid.shape[1] < length:
            raise ValueError(f'{self.name}: attention_mask of shape {tuple(mask.shape)} does not cover the {length} '
                             f'current tokens of a batch of {batch}')
        if self.segment_routed and valid.shape[1] > 1:
            starts = valid[:, 1:] & ~valid[:, :-1]  # a real token right after a padding position
            if bool(starts.any()):
                row = int(starts.any(1).nonzero()[0])
                raise ValueError(
                    f'{self.name}: causal segment routing needs right-padded (or unpadded) sequences, but row {row} of '
                    f'the attention_mask has padding before real tokens (left padding). Segments are counted from '
                    f'the first position, so a left-padded row would be routed differently from the same text '
                    f'unpadded. Generate prompts of different lengths one at a time (or in groups of equal length).')
        valid = valid[:, valid.shape[1] - length:]
        return None if bool(valid.all()) else valid

    def _resume(self, cache: Cache, past: int, batch: int, checkpointing: bool) -> List[SegmentCache]:
        """The segment caches that continue ``cache``'s ``past`` tokens, checked against it."""
        if not self.segment_routed:
            raise ValueError(
                f'{self.name}: this stack routes each whole sequence on its mean, which cannot be computed token by '
                f'token: incremental decoding from a cache holding {past} tokens is not supported. Convert with an '
                f'integer segment_length for causal segment routing.')
        if checkpointing:
            raise ValueError(f'{self.name}: incremental decoding with gradient checkpointing in training mode is not '
                             f'supported; call model.eval() or run under torch.no_grad()')
        caches = self._states.get(cache)
        if caches is None:
            raise ValueError(
                f'{self.name}: the cache holds {past} tokens that this converted model did not process (a cache from '
                f'another model, a copy, or one filled before conversion); segment routing needs the segment sums '
                f'of those tokens. Start from an empty cache.')
        if caches[0].offset != past:
            raise ValueError(
                f'{self.name}: the cache holds {past} tokens but the segment routing state covers {caches[0].offset}; '
                f'caches that are cropped or rolled back (assisted decoding, DoLa) are not supported')
        state = next((s for s in caches[0].states if s is not None), None)
        if state is not None and state.sum.shape[0] != batch:
            raise ValueError(f'{self.name}: the cache was filled with a batch of {state.sum.shape[0]} sequences, '
                             f'this call has {batch}')
        return caches

    # ---- used by the converted FFNs and by beam search ----

    def inputs(self, layer_index: int, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[SegmentCache]]:
        """``(mask [b, l] or None, SegmentCache or None)`` for the FFN ``layer_index`` called on ``x [b, l, c]``."""
        mask = self.mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise RuntimeError(
                f'{self.name}: the recorded padding mask {tuple(mask.shape)} does not match the FFN input '
                f'{tuple(x.shape[:2])}; converted FFNs must be called through their model\'s forward')
        cache = self.caches[layer_index] if self.caches is not None else None
        return mask, cache

    def reorder(self, cache: Cache, beam_idx: torch.Tensor) -> None:
        """Select the batch rows ``beam_idx`` of the segment state attached to ``cache`` (beam search)."""
        caches = self._states.get(cache)
        if caches is None:
            return
        for segment_cache in caches:
            segment_cache.states = [
                None if s is None else dataclasses.replace(
                    s, sum=s.sum.index_select(0, beam_idx.to(s.sum.device)),
                    count=s.count.index_select(0, beam_idx.to(s.count.device)),
                    prev_sum=s.prev_sum.index_select(0, beam_idx.to(s.prev_sum.device)),
                    prev_count=s.prev_count.index_select(0, beam_idx.to(s.prev_count.device)))
                for s in segment_cache.states]


class ModelRouting:
    """Model-level hooks of a converted model: fresh balance losses per pass, the balance loss added to the
    returned loss when labels are given, and beam-search reordering of the segment state.

    Args:
        stacks: the ``StackRouting`` of every converted stack, keyed by the stack's module name.
        arg_names: positional parameter names of the model's ``forward``.
    """

    def __init__(self, stacks: Dict[str, StackRouting], arg_names: Sequence[str]):
        self.stacks = stacks
        self.arg_names = tuple(arg_names)

    def before_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Forward pre-hook: forget the balance losses of the previous pass (a stack may not run in this one)."""
        for m in module.modules():
            if isinstance(m, MoEModule):
                m.last_aux_loss = None

    def after_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> Any:
        """Forward hook: add ``camex_vision.aux_loss(model)`` to the returned loss when labels were given."""
        if _arg(self.arg_names, args, kwargs, 'labels') is None:
            return None
        if not any(isinstance(m, MoEModule) and m.last_aux_loss is not None for m in module.modules()):
            return None
        loss = getattr(output, 'loss', None) if not isinstance(output, tuple) else output[0]
        if not isinstance(loss, torch.Tensor):
            return None
        total = loss + aux_loss(module).to(loss.dtype)
        if isinstance(output, tuple):
            return (total,) + tuple(output[1:])
        output.loss = total
        return output

    def reorder_cache(self, cache: Cache, beam_idx: torch.Tensor) -> Cache:
        """Beam search: reorder the KV cache and the segment routing state attached to it together."""
        cache.reorder_cache(beam_idx)
        for stack in self.stacks.values():
            stack.reorder(cache, beam_idx)
        return cache


class _RoutedFFN:
    """Mixin giving a merge-core FFN transformers' call convention ``forward(hidden_states)``: the padding mask
    and segment cache come from the stack's ``StackRouting``."""
    routing: Optional[StackRouting] = None
    layer_index: int = 0

    def bind_routing(self, routing: StackRouting, layer_index: int) -> None:
        """Read routing inputs from ``routing`` as layer ``layer_index`` of its stack."""
        self.routing = routing
        self.layer_index = layer_index

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[SegmentCache] = None) -> torch.Tensor:
        """``hidden_states [b, l, c] -> [b, l, c]``, routed with the current pass's mask and segment cache, or with
        ``mask``/``cache`` when given (the merge core's call convention)."""
        if mask is None and cache is None and self.routing is not None:
            mask, cache = self.routing.inputs(self.layer_index, hidden_states)
        return super().forward(hidden_states, mask, cache)


class RoutedCAMExMlp(_RoutedFFN, CAMExMlp):
    """``CAMExMlp`` called as transformers calls GPT-2's ``GPT2MLP`` and T5's ``T5DenseActDense``."""


class RoutedCAMExGatedMlp(_RoutedFFN, CAMExGatedMlp):
    """``CAMExGatedMlp`` called as transformers calls T5 v1.1's ``T5DenseGatedActDense``."""
