"""``camexify``: turn every FFN of a transformers GPT-2 or T5 model into a CAMEx merging FFN, in place.

The model keeps its transformers class and code; only the FFN modules are swapped (``GPT2MLP`` ->
``RoutedCAMExMlp``; ``T5DenseActDense`` -> ``RoutedCAMExMlp``; ``T5DenseGatedActDense`` -> ``RoutedCAMExGatedMlp``)
and hooks are added that hand the FFNs what transformers does not pass them (see ``routing``). Upcycling is exact:
right after conversion the model computes what the dense model computed.

Routing (CAMEx method sections 7 and 8):

* GPT-2 and T5's decoder: causal segment routing. Segment ``k`` of ``segment_length`` tokens is merged from the
  router output on the mean of segment ``k-1``; the first segment uses a learned prior (``first_segment='prior'``,
  strictly causal), fixed uniform gates (``'uniform'``), or the paper's own-mean with stop-gradient (``'own'``,
  which lets a token depend on later tokens of the first segment).
* T5's encoder: one unit per sequence, pooled over its non-padding tokens (the attention mask).
"""
import copy
import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import (
    GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model, PreTrainedModel, T5EncoderModel,
    T5ForConditionalGeneration, T5ForSequenceClassification, T5Model)
from transformers.generation import GenerationMixin
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense
from transformers.pytorch_utils import Conv1D

from ..core import CAMExMlp, MergedLinear, MoEModule, link_dynamic_chain
from .routing import ModelRouting, RoutedCAMExGatedMlp, RoutedCAMExMlp, StackRouting, positional_names

SUPPORTED_MODELS: Tuple[type, ...] = (
    GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2Model,
    T5ForConditionalGeneration, T5EncoderModel, T5ForSequenceClassification, T5Model)

_DENSE_FFNS: Tuple[type, ...] = (GPT2MLP, T5DenseGatedActDense, T5DenseActDense)

CONFIG_KEY = 'camex'  # the conversion options are recorded as ``model.config.camex``


@dataclass
class _Stack:
    """One transformer stack to convert: its FFN slots ``(parent, attribute)``, its routing unit and whether it
    reads a KV cache."""
    name: str
    module: nn.Module
    slots: List[Tuple[nn.Module, str]]
    segment_routed: bool
    uses_cache: bool = True


def _stacks(model: nn.Module, segment_length: Optional[int]) -> List[_Stack]:
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(model, (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification)):
        base = model if isinstance(model, GPT2Model) else model.transformer
        return [_Stack(names[id(base)] or type(base).__name__, base, [(block, 'mlp') for block in base.h],
                       segment_length is not None)]
    base = model.transformer if isinstance(model, T5ForSequenceClassification) else model
    stacks = [_Stack(names[id(base.encoder)], base.encoder,
                     [(block.layer[-1], 'DenseReluDense') for block in base.encoder.block], False, False)]
    decoder = getattr(base, 'decoder', None)
    if decoder is not None:
        stacks.append(_Stack(names[id(decoder)], decoder,
                             [(block.layer[-1], 'DenseReluDense') for block in decoder.block],
                             segment_length is not None))
    return stacks


def _linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    """GPT-2's ``Conv1D`` stores its weight as ``[in, out]``; the same map as an ``nn.Linear``."""
    w = conv.weight
    linear = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _convert_ffn(ffn: nn.Module, where: str, options: Dict[str, Any]) -> CAMExMlp:
    """Exact upcycling of one dense FFN into a routed merging FFN (dropouts and activation carried over)."""
    act_layer = functools.partial(copy.deepcopy, ffn.act)
    if isinstance(ffn, GPT2MLP):
        linears = (_linear_from_conv1d(ffn.c_fc), _linear_from_conv1d(ffn.c_proj))
        return RoutedCAMExMlp.from_dense(linears, act_layer=act_layer, drop=(0., ffn.dropout.p), **options)
    if isinstance(ffn, T5DenseGatedActDense):
        return RoutedCAMExGatedMlp.from_dense((ffn.wi_0, ffn.wi_1, ffn.wo), act_layer=act_layer,
                                              drop=(ffn.dropout.p, 0.), **options)
    if isinstance(ffn, T5DenseActDense):
        return RoutedCAMExMlp.from_dense((ffn.wi, ffn.wo), act_layer=act_layer, drop=(ffn.dropout.p, 0.), **options)
    raise TypeError(f'{where} is a {type(ffn).__name__}; expected one of {", ".join(c.__name__ for c in _DENSE_FFNS)}')


def _check_options(model: nn.Module, options: Dict[str, Any]) -> None:
    """Reject bad options before anything is modified, so a failed call leaves the model dense."""
    segment_length = options['segment_length']
    if segment_length is not None and (isinstance(segment_length, bool) or not isinstance(segment_length, int)):
        raise ValueError(f'segment_length={segment_length!r} must be an int >= 1 (tokens per routing segment)')
    if segment_length is not None and segment_length < 1:
        raise ValueError(f'segment_length={segment_length!r} is out of range: a routing segment needs at least 1 '
                         f'token (the paper uses 256)')
    if segment_length is None and isinstance(model, GenerationMixin):
        raise ValueError(
            f'segment_length=None routes each sequence on its own mean, so every token would depend on later '
            f'tokens; {type(model).__name__} generates text and needs causal segment routing (an int >= 1)')
    if not isinstance(options['dynamic'], bool):
        raise ValueError(f'dynamic={options["dynamic"]!r} must be a bool')
    if options['dynamic'] and options['alpha'] == 0:
        raise ValueError('dynamic merging propagates the base with alpha; alpha=0 would freeze it at the first layer')
    mlp_options = {k: v for k, v in options.items() if k != 'dynamic'}
    mlp_options['segment_length'] = segment_length or 1  # so first_segment is checked too
    CAMExMlp(4, 4, device='meta', **mlp_options)  # the merge core validates every other option and names it


def _upcycle_dynamic_chain(chain: List[MergedLinear], dense: List[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                           alpha: float) -> None:
    """Keep upcycling exact in a dynamic chain when ``alpha != 1``.

    A follower's base is propagated, ``E_m^l = W_{l-1}`` (the previous layer's dense weight), so its experts are
    set to ``W_{l-1} + (W_l - W_{l-1}) / alpha`` and merge back to ``W_l``. With ``alpha = 1`` the experts already
    equal ``W_l``.
    """
    if alpha == 1.0:
        return
    with torch.no_grad():
        for layer, (w_prev, b_prev), (w, b) in zip(chain[1:], dense[:-1], dense[1:]):
            layer.weight_experts.copy_((w_prev + (w - w_prev) / alpha).expand_as(layer.weight_experts))
            if b is not None:
                layer.bias_experts.copy_((b_prev + (b - b_prev) / alpha).expand_as(layer.bias_experts))


def camexify(
        model: PreTrainedModel,
        num_experts: int = 8,
        merge: str = 'camex',
        mask: Optional[str] = 'ties',
        kron_rank: int = 1,
        alpha: float = 1.0,
        dynamic: bool = False,
        segment_length: Optional[int] = 256,
        first_segment: str = 'prior',
        top_k: Optional[int] = None,
        density: float = 1.0,
        dare_p: float = 0.1,
        dare_mode: str = 'expert',
        router_per: str = 'ffn',
        router_noise: bool = True,
        balance_coef: float = 0.0,
) -> PreTrainedModel:
    """Convert every FFN of a GPT-2 or T5 model into a CAMEx merging FFN, in place, by exact upcycling.

    Supported: ``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``, ``GPT2Model``, ``T5ForConditionalGeneration``,
    ``T5EncoderModel``, ``T5ForSequenceClassification``, ``T5Model`` (T5's ``DenseReluDense`` and gated
    ``wi_0/wi_1/wo`` forms, encoder and decoder). The options are recorded as ``model.config.camex``, so
    ``model.save_pretrained`` and ``camex_vision.nlp.from_pretrained`` round-trip the converted model.

    Args:
        model: the dense model; converted in place.
        num_experts: experts per FFN, counting the base expert (N; N-1 domain experts).
        merge: ``'camex'`` (curvature-aware) or ``'euclidean'``.
        mask: ``None``, ``'ties'`` or ``'dare'`` on the domain vectors.
        kron_rank: Kronecker rank of the curvature matrices.
        alpha: scale of the merged update.
        dynamic: propagate the base expert from layer to layer within each stack (method section 5).
        segment_length: tokens per causal routing segment for GPT-2 and T5's decoder (paper: 256). ``None`` routes
            each whole sequence on its mean, which leaks later tokens; allowed only for models that do not generate.
        first_segment: scores of the first segment, which has no predecessor: ``'prior'`` (learned, strictly
            causal), ``'uniform'`` (fixed, strictly causal) or ``'own'`` (the paper's own mean with stop-gradient).
        top_k: domain experts merged per unit (``None``: all).
        density: TIES trim density (1 = sign election only).
        dare_p: DARE drop probability.
        dare_mode: DARE drops whole experts (``'expert'``) or single parameters (``'element'``).
        router_per: one router per FFN (``'ffn'``) or one per linear (``'linear'``).
        router_noise: Shazeer noise on the router logits in training.
        balance_coef: weight of the balance loss added to the model's loss when labels are given.

    Returns:
        ``model``, converted.

    Raises:
        TypeError: for an unsupported architecture.
        ValueError: for a model already converted or an invalid option.
    """
    if not isinstance(model, SUPPORTED_MODELS):
        raise TypeError(f'camexify supports {", ".join(c.__name__ for c in SUPPORTED_MODELS)}; '
                        f'got {type(model).__name__}')
    converted = next((n for n, m in model.named_modules() if isinstance(m, MoEModule)), None)
    if converted is not None or getattr(model, '_camex_routing', None) is not None:
        raise ValueError(f'{type(model).__name__} is already converted (CAMEx layer at {converted!r}); '
                         f'camexify converts a dense model once')
    options = dict(num_experts=num_experts, merge=merge, mask=mask, kron_rank=kron_rank, alpha=alpha,
                   dynamic=dynamic, segment_length=segment_length, first_segment=first_segment, top_k=top_k,
                   density=density, dare_p=dare_p, dare_mode=dare_mode, router_per=router_per,
                   router_noise=router_noise, balance_coef=balance_coef)
    _check_options(model, options)
    mlp_options = {k: v for k, v in options.items() if k not in ('dynamic', 'segment_length')}
    names = {id(m): n for n, m in model.named_modules()}
    stacks = _stacks(model, segment_length)
    for stack in stacks:
        for parent, attr in stack.slots:
            if not isinstance(getattr(parent, attr), _DENSE_FFNS):
                raise TypeError(f'{names[id(parent)]}.{attr} is a {type(getattr(parent, attr)).__name__}; '
                                f'expected one of {", ".join(c.__name__ for c in _DENSE_FFNS)}')

    routings: Dict[str, StackRouting] = {}
    for stack in stacks:
        routing = StackRouting(positional_names(stack.module), len(stack.slots), stack.segment_routed, stack.name,
                               stack.uses_cache)
        moes = []
        for index, (parent, attr) in enumerate(stack.slots):
            dense = getattr(parent, attr)
            where = f'{names[id(parent)]}.{attr}'
            moe = _convert_ffn(dense, where, dict(
                mlp_options, segment_length=segment_length if stack.segment_routed else None))
            moe.bind_routing(routing, index)
            moes.append((moe, dense))
        if dynamic and moes:
            for name in moes[0][0].merged_names:
                chain = [getattr(moe, name) for moe, _ in moes]
                dense = [(layer.weight_experts[0].detach().clone(),
                          layer.bias_experts[0].detach().clone() if layer.has_bias else None) for layer in chain]
                link_dynamic_chain(chain)
                _upcycle_dynamic_chain(chain, dense, alpha)
        for (parent, attr), (moe, dense) in zip(stack.slots, moes):
            moe.train(dense.training)
            setattr(parent, attr, moe)
        stack.module.register_forward_pre_hook(routing.before_forward, with_kwargs=True)
        stack.module.register_forward_hook(routing.after_forward, with_kwargs=True)
        routings[stack.name] = routing

    model_routing = ModelRouting(routings, positional_names(model))
    model.register_forward_pre_hook(model_routing.before_forward, with_kwargs=True)
    model.register_forward_hook(model_routing.after_forward, with_kwargs=True)
    model._camex_routing = model_routing
    if isinstance(model, GenerationMixin):
        # generate() calls model._reorder_cache(cache, beam_idx) when present: the segment state follows the beams
        model._reorder_cache = model_routing.reorder_cache
    setattr(model.config, CONFIG_KEY, dict(options, reparameterized=False))
    return model


@torch.no_grad()
def init_experts_independently(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """From-scratch initialisation (method section 9): redraw every domain expert's weight independently.

    Each draw is ``N(0, sigma^2)`` with ``sigma`` the standard deviation of the dense weight the layer was upcycled
    from, so the experts match the dense initialisation's scale; bases and biases keep their upcycled values. This
    deliberately gives up exact upcycling: use it for models trained from scratch, not for fine-tuning.

    Args:
        model: a converted model (or any module holding ``MergedLinear`` layers).
        generator: random generator for the draws (CPU).

    Returns:
        ``model``.
    """
    for layer in model.modules():
        if isinstance(layer, MergedLinear):
            w = layer.weight_experts
            std = float(w[0].float().std())
            draw = torch.randn(w.shape, generator=generator, dtype=torch.float32) * std
            w.copy_(draw.to(device=w.device, dtype=w.dtype))
    return model


def is_camexified(model: nn.Module) -> bool:
    """Whether ``model`` was converted by ``camexify``."""
    return getattr(model, '_camex_routing', None) is not None


def camex_options(model: nn.Module) -> Dict[str, Any]:
    """The conversion options recorded in a converted model's config (a copy)."""
    options = getattr(getattr(model, 'config', None), CONFIG_KEY, None)
    if not is_camexified(model) or options is None:
        raise ValueError(f'{type(model).__name__} was not converted by camexify')
    return dict(options)
