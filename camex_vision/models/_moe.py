"""Building blocks shared by the ``camex_*`` timm model families.

* MoE options: validation of the model-level kwargs and the MLP factory (``CAMExMlp`` or ``SMoEMlp``).
* Placement: which blocks become MoE (``moe_blocks``), resolved and validated.
* ``MoEModelMixin``: what every CAMEx model adds to its timm parent (live MoE config for ``config.json``,
  curvature excluded from weight decay, router init, the dense counterpart).
* Checkpoints: ``filter_moe_checkpoint`` upcycles dense timm checkpoints exactly, loads CAMEx checkpoints
  (training-checkpoint wrappers and DDP prefixes included) and names both sides of any layout mismatch.
* Pretrained cfgs pointing at the dense timm weights on the Hugging Face Hub.

Nothing here copies timm model code: the families subclass timm's ``VisionTransformer`` and ``SwinTransformer``.
"""
import inspect
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type

import torch
from torch import nn

from timm.layers import PatchEmbed
from timm.layers.trace_utils import _assert
from timm.models import clean_state_dict, get_pretrained_cfg, register_notrace_module

from ..core import CAMExMlp, MergedLinear, SMoEMlp, link_dynamic_chain
from ..core.mlp import MoEModule
from ..core.options import check_choice, check_int
from ..core.router import Router

__all__ = [
    'MERGES', 'MoEModelMixin', 'CheckedPatchEmbed', 'moe_mlp_layer', 'resolve_moe_blocks', 'moe_modules',
    'filter_moe_checkpoint', 'dense_pretrained_cfg',
]

_logger = logging.getLogger(__name__)

MERGES = ('camex', 'euclidean', 'smoe')

# options that only mean something for merging experts, with the values merge='smoe' accepts (their defaults)
_MERGING_ONLY = dict(
    mask=('ties', None), kron_rank=(1,), alpha=(1.0,), density=(1.0,), dare_p=(0.1,), dare_mode=('expert',),
    dynamic=(False,), router_per=('ffn',))

# the MoE MLPs run as leaf modules under timm's FX feature extraction: their input checks branch on shapes
register_notrace_module(CAMExMlp)
register_notrace_module(SMoEMlp)


def moe_mlp_layer(
        num_experts: int = 8,
        merge: str = 'camex',
        mask: Optional[str] = 'ties',
        kron_rank: int = 1,
        alpha: float = 1.0,
        top_k: Optional[int] = None,
        density: float = 1.0,
        dare_p: float = 0.1,
        dare_mode: str = 'expert',
        dynamic: bool = False,
        router_per: str = 'ffn',
        router_noise: bool = True,
        balance_coef: float = 0.0,
) -> Callable[..., MoEModule]:
    """The MoE MLP constructor for the model-level options: a drop-in for timm's ``Mlp`` class.

    Args:
        num_experts: Experts per MoE layer, the base expert included (``N``).
        merge: ``'camex'`` (curvature-aware merging), ``'euclidean'`` (plain merging) or ``'smoe'`` (token-choice
            top-k baseline, no merging).
        mask: ``'ties'``, ``'dare'`` or ``None``, on the domain vectors of merging layers.
        kron_rank: Kronecker rank of the curvature matrices (``merge='camex'``).
        alpha: Scale of the merged update.
        top_k: Merging: domain experts merged per image (``None``: all). SMoE: experts per token (``None``: 2).
        density: TIES magnitude trim (1 keeps everything).
        dare_p: DARE drop probability.
        dare_mode: ``'expert'`` (drop whole experts per image) or ``'element'`` (drop single parameters).
        dynamic: Propagate one base expert from MoE layer to MoE layer (merging only).
        router_per: ``'ffn'`` (one router per MoE MLP) or ``'linear'`` (one per merged linear).
        router_noise: Noisy top-k routing in training.
        balance_coef: Weight of the balance loss recorded for ``camex_vision.aux_loss``.

    Raises:
        ValueError: for an unknown ``merge`` or a merging-only option given with ``merge='smoe'``.
    """
    check_choice('merge', merge, MERGES)
    if not isinstance(dynamic, bool):
        raise ValueError(f'dynamic={dynamic!r} must be a bool')
    if merge == 'smoe':
        given = dict(mask=mask, kron_rank=kron_rank, alpha=alpha, density=density, dare_p=dare_p,
                     dare_mode=dare_mode, dynamic=dynamic, router_per=router_per)
        for name, value in given.items():
            if value not in _MERGING_ONLY[name]:
                raise ValueError(f"{name}={value!r} does not apply to merge='smoe' (token-choice experts are not "
                                 f"merged); leave it at {_MERGING_ONLY[name][0]!r}")
        return partial(SMoEMlp, num_experts=num_experts, top_k=2 if top_k is None else top_k,
                       router_noise=router_noise, balance_coef=balance_coef)
    return partial(
        CAMExMlp, num_experts=num_experts, merge=merge, mask=mask, kron_rank=kron_rank, alpha=alpha, top_k=top_k,
        density=density, dare_p=dare_p, dare_mode=dare_mode, router_per=router_per, router_noise=router_noise,
        balance_coef=balance_coef)


def resolve_moe_blocks(moe_blocks: Optional[Sequence[int]], depth: int, default: Sequence[int]) -> Tuple[int, ...]:
    """Validate a list of block indices (negative ones count from the end) into sorted non-negative indices.

    Args:
        moe_blocks: Indices of the blocks whose MLP becomes MoE, or ``None`` for ``default``.
        depth: Number of blocks.
        default: Placement used when ``moe_blocks`` is ``None``.
    """
    if moe_blocks is None:
        return tuple(default)
    if isinstance(moe_blocks, (str, bytes)) or not isinstance(moe_blocks, Sequence):
        raise ValueError(f'moe_blocks={moe_blocks!r} must be a sequence of block indices')
    indices = [check_int('moe_blocks entry', b, -depth, depth - 1) % depth for b in moe_blocks]
    if len(set(indices)) != len(indices):
        raise ValueError(f'moe_blocks={list(moe_blocks)!r} names a block twice')
    return tuple(sorted(indices))


def moe_modules(model: nn.Module) -> List[Tuple[str, MoEModule]]:
    """``(name, module)`` of every MoE MLP of ``model``, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEModule)]


def link_dynamic(mlps: Sequence[MoEModule]) -> None:
    """Dynamic merging: chain the bases of all ``fc1`` and, separately, all ``fc2`` (restarting on shape changes)."""
    link_dynamic_chain([m.fc1 for m in mlps])
    link_dynamic_chain([m.fc2 for m in mlps])


def scale_fc2_(mlp: nn.Module, scale: float) -> None:
    """Divide the output projection of a dense or MoE MLP by ``scale`` in place (timm's ``fix_init``)."""
    with torch.no_grad():
        if isinstance(mlp, SMoEMlp):
            mlp.fc2_weight.div_(scale)
        elif isinstance(mlp, CAMExMlp):
            mlp.fc2.weight_experts.div_(scale)
            if mlp.fc2.owns_base:
                mlp.fc2.weight_base.div_(scale)
        else:
            mlp.fc2.weight.div_(scale)


def check_model_kwargs(model_name: str, parent: Type[nn.Module], kwargs: Mapping[str, Any], reserved: Set[str]) -> None:
    """Reject kwargs the timm parent class does not take (or that the CAMEx subclass sets itself) by name."""
    accepted = set(inspect.signature(parent.__init__).parameters) - {'self'}
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(f'{model_name} got unexpected keyword argument(s) {unknown}; it takes the MoE options and '
                        f'the arguments of timm\'s {parent.__name__}')
    clash = sorted(k for k in kwargs if k in reserved)
    if clash:
        raise TypeError(f'{model_name} sets {clash} itself (MoE placement uses moe_blocks); do not pass them')


class CheckedPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` that names the expected and actual channel count when they differ.

    (timm's own patch embedding already names expected and actual sizes for fixed-size models.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _assert(
            x.shape[1] == self.proj.in_channels,
            f'Input channels ({x.shape[1]}) don\'t match model ({self.proj.in_channels}).')
        return super().forward(x)


class MoEModelMixin:
    """What every CAMEx model adds to its timm parent class.

    Subclasses set ``moe_blocks`` (their placement, in their family's notation) and ``_dense_cls``/``_dense_kwargs``
    (the timm class and arguments of the dense counterpart).
    """
    moe_blocks: Any
    _dense_cls: Type[nn.Module]
    _dense_kwargs: Dict[str, Any]
    _moe_options: Dict[str, Any]

    @property
    def moe_config(self) -> Dict[str, Any]:
        """The MoE kwargs that rebuild this model's current parameters, read from its MoE layers.

        After ``camex_vision.reparameterize`` this is the folded equivalent (``merge='euclidean'``, no mask,
        ``alpha=1``, not dynamic), so a reparameterized model saved for the Hub loads back as what it is.
        """
        config: Dict[str, Any] = dict(self._moe_options)
        mlps = [m for _, m in moe_modules(self)]
        if mlps and isinstance(mlps[0], SMoEMlp):
            m = mlps[0]
            config = dict(num_experts=m.num_experts, merge='smoe', top_k=m.top_k, router_noise=m.router.noisy,
                          balance_coef=m.balance_coef)
        elif mlps:
            m, fc1 = mlps[0], mlps[0].fc1
            config = dict(
                num_experts=m.num_experts, merge=fc1.merge, mask=fc1.mask, kron_rank=fc1.kron_rank, alpha=fc1.alpha,
                top_k=m.top_k, density=fc1.density, dare_p=fc1.dare_p, dare_mode=fc1.dare_mode,
                dynamic=any(not mm.fc1.owns_base for mm in mlps), router_per=m.router_per,
                router_noise=m.routers[0].noisy, balance_coef=m.balance_coef)
        config['moe_blocks'] = _jsonable(self.moe_blocks)
        return config

    # timm's factory records the create_model kwargs in ``_model_args`` and save_for_hf writes them to config.json;
    # the live MoE config is merged on read so it is always complete and current
    @property
    def _model_args(self) -> Dict[str, Any]:
        return {**self.__dict__.get('_recorded_model_args', {}), **self.moe_config}

    @_model_args.setter
    def _model_args(self, value: Dict[str, Any]) -> None:
        self.__dict__['_recorded_model_args'] = dict(value)

    def curvature_parameter_names(self) -> Set[str]:
        """Names of the curvature factors (initialised at identity: weight decay would pull them to zero)."""
        return {name for name, _ in self.named_parameters() if '.curvature.' in name}

    def reset_routers(self) -> None:
        """Give every router its own init (timm's weight init treats router linears like dense ones)."""
        for m in self.modules():
            if isinstance(m, Router):
                m.reset_parameters()

    def dense_counterpart(self, **kwargs: Any) -> nn.Module:
        """A dense timm model of the same architecture (fresh init): the upcycling source and the baseline.

        Args:
            kwargs: Overrides of the dense model's constructor arguments (e.g. ``device``).
        """
        return self._dense_cls(**{**self._dense_kwargs, **kwargs})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class _MoESignature:
    """What a checkpoint and a model must agree on for one MoE MLP."""
    kind: str  # 'camex' (merging: camex or euclidean) or 'smoe'
    num_experts: int
    curvature: bool
    owns_base: bool

    def describe(self) -> str:
        if self.kind == 'smoe':
            return f'{self.num_experts} token-choice (smoe) experts'
        merge = 'camex' if self.curvature else 'euclidean/reparameterized'
        base = '' if self.owns_base else ', base propagated (dynamic)'
        return f'{self.num_experts} merged experts ({merge}{base})'


def _model_layout(model: nn.Module) -> Dict[str, _MoESignature]:
    layout = {}
    for name, m in moe_modules(model):
        if isinstance(m, SMoEMlp):
            layout[name] = _MoESignature('smoe', m.num_experts, False, True)
        else:
            fc1: MergedLinear = m.fc1
            layout[name] = _MoESignature('camex', m.num_experts, fc1.curvature is not None, fc1.owns_base)
    return layout


def _checkpoint_layout(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, _MoESignature]:
    layout = {}
    for key, value in state_dict.items():
        if key.endswith('.fc1.weight_experts'):
            prefix = key[:-len('.fc1.weight_experts')]
            layout[prefix] = _MoESignature(
                'camex', value.shape[0] + 1, f'{prefix}.fc1.curvature.a' in state_dict,
                f'{prefix}.fc1.weight_base' in state_dict)
        elif key.endswith('.fc1_weight'):
            prefix = key[:-len('.fc1_weight')]
            layout[prefix] = _MoESignature('smoe', value.shape[0], False, True)
    return layout


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``state_dict``/``model`` keys), without DDP/compile prefixes."""
    state = checkpoint
    while True:
        inner = next((state[k] for k in ('state_dict', 'model') if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    return clean_state_dict(dict(state))


def filter_moe_checkpoint(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        dense_filter: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
        classifiers: Sequence[str] = ('head',),
) -> Dict[str, torch.Tensor]:
    """Map a dense timm or a CAMEx checkpoint onto ``model``'s state dict.

    * Dense checkpoint (no expert weights): the family's timm filter runs first (position embedding and patch
      resampling, old layouts), then every MoE MLP is upcycled exactly: the dense FFN is copied into the base and
      every domain expert, curvature starts at identity and routers keep their fresh init, so the model computes
      what the dense model computes.
    * CAMEx checkpoint: passed through the family's filter after checking that placement, expert count, merge kind
      and dynamic bases match the model; a mismatch raises a ``ValueError`` naming both sides.

    Training checkpoints (``state_dict``/``model`` keys) and DDP/``torch.compile`` prefixes are unwrapped. A
    classifier whose shape differs from the model's (another ``num_classes``) is reset to the model's fresh one.

    Args:
        state_dict: Checkpoint to load.
        model: The model being loaded.
        dense_filter: The dense family's timm ``checkpoint_filter_fn``.
        classifiers: Names of the classifier module(s), as in the pretrained cfg.
    """
    state = unwrap_checkpoint(state_dict)
    ckpt_layout = _checkpoint_layout(state)
    model_layout = _model_layout(model)
    if ckpt_layout:
        _check_layouts(ckpt_layout, model_layout, getattr(model, 'moe_blocks', None))
    out = dense_filter(state, model) if dense_filter is not None else state
    if not ckpt_layout:
        modules = dict(model.named_modules())
        for name in model_layout:
            prefix = name + '.'
            dense = {k[len(prefix):]: out.pop(k) for k in list(out) if k.startswith(prefix)}
            if not dense:
                raise ValueError(f'the dense checkpoint has no weights for {name} (is it of another architecture?)')
            out.update({prefix + k: v for k, v in modules[name].upcycled_state_dict(dense).items()})
    model_state = model.state_dict()
    for classifier in classifiers:
        for key in (f'{classifier}.weight', f'{classifier}.bias'):
            if key not in out:
                continue
            if key not in model_state:
                del out[key]
            elif out[key].shape != model_state[key].shape:
                _logger.info(f'Resetting {key}: checkpoint shape {tuple(out[key].shape)}, model '
                             f'{tuple(model_state[key].shape)}')
                out[key] = model_state[key].detach().clone()
    return out


def _check_layouts(
        ckpt: Dict[str, _MoESignature],
        model: Dict[str, _MoESignature],
        moe_blocks: Any,
) -> None:
    if set(ckpt) != set(model):
        raise ValueError(
            f'checkpoint has MoE MLPs at {sorted(ckpt, key=_natural)} but the model has them at '
            f'{sorted(model, key=_natural)} (moe_blocks={moe_blocks!r}); create the model with the checkpoint\'s '
            f'placement')
    problems = [f'{name}: checkpoint has {ckpt[name].describe()}, model has {model[name].describe()}'
                for name in sorted(model, key=_natural) if ckpt[name] != model[name]]
    if problems:
        counts = {s.num_experts for s in ckpt.values()}, {s.num_experts for s in model.values()}
        hint = (f' (checkpoint num_experts={sorted(counts[0])}, model num_experts={sorted(counts[1])})'
                if counts[0] != counts[1] else '')
        raise ValueError('checkpoint does not match the model\'s MoE layers' + hint + ':\n  ' + '\n  '.join(problems))


def _natural(name: str) -> Tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in name.split('.'))


def dense_pretrained_cfg(dense_name: str, **overrides: Any) -> Dict[str, Any]:
    """A pretrained cfg for a CAMEx model whose weights are the dense timm ``dense_name`` (``arch.tag``) weights
    on the Hugging Face Hub, upcycled on load. Preprocessing and license are the dense model's.

    Args:
        dense_name: A registered timm ``architecture.tag`` hosted under ``timm/``.
        overrides: Extra cfg fields.
    """
    cfg = get_pretrained_cfg(dense_name)
    if cfg is None:
        raise ValueError(f'timm has no pretrained cfg {dense_name!r}')
    out = cfg.to_dict(remove_source=True, remove_null=True)
    for key in ('architecture', 'tag', 'notes'):
        out.pop(key, None)
    out.update(
        hf_hub_id=f'timm/{dense_name}', custom_load=False,
        origin_url=f'https://huggingface.co/timm/{dense_name}',
        paper_name='CAMEx: Curvature-aware Merging of Experts', paper_ids='arXiv:2502.18821')
    out.update(overrides)
    return out
