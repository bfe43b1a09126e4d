""" CAMEx Swin Transformer in PyTorch

Swin Transformers whose feed-forward blocks are curvature-aware merged mixtures of experts:

  * `CAMEx: Curvature-aware Merging of Experts` - https://arxiv.org/abs/2502.18821 (ICLR 2025); its Swin-S has
    8 experts in every other block of stages 3 and 4 (157M parameters against 50M dense)
  * `Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` - https://arxiv.org/abs/2103.14030
  * `Tutel: Adaptive Mixture-of-Experts at Scale` (Swin-MoE, the same placement) - https://arxiv.org/abs/2206.03382

timm's ``SwinTransformer`` builds its blocks with a hard-coded ``Mlp``; this subclass builds the dense model and
then swaps the MLP of each MoE block for a ``CAMExMlp`` (or the token-choice ``SMoEMlp`` baseline) of the same
shape. Nothing else of timm's Swin is changed or copied. ``pretrained=True`` loads the dense timm weights from the
Hugging Face Hub and upcycles them exactly.
"""
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as _swin_checkpoint_filter_fn

from ._moe import (
    CheckedPatchEmbed, MoEModelMixin, check_model_kwargs, dense_pretrained_cfg, filter_moe_checkpoint, link_dynamic,
    moe_mlp_layer, moe_modules, resolve_moe_blocks)

__all__ = ['CAMExSwinTransformer']


def _default_moe_blocks(depths: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """Every other block (odd indices) of the last two stages, as in Swin-MoE and the paper's Swin-S."""
    n = len(depths)
    return tuple(tuple(range(1, d, 2)) if i >= n - 2 else () for i, d in enumerate(depths))


class CAMExSwinTransformer(MoEModelMixin, SwinTransformer):
    """ Swin Transformer with curvature-aware merged experts in chosen blocks

    Takes every argument of timm's ``SwinTransformer`` plus the MoE options below; the whole timm API is inherited.
    ``moe_blocks`` is given per stage, e.g. ``[[], [], [1, 3, 5], [1]]`` (the Swin-T default).
    """

    def __init__(
            self,
            *,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_experts: int = 8,
            merge: str = 'camex',
            mask: Optional[str] = 'ties',
            kron_rank: int = 1,
            alpha: float = 1.0,
            top_k: Optional[int] = None,
            density: float = 1.0,
            dare_p: float = 0.1,
            dare_mode: str = 'expert',
            moe_blocks: Optional[Sequence[Sequence[int]]] = None,
            dynamic: bool = False,
            router_per: str = 'ffn',
            router_noise: bool = True,
            balance_coef: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            depths: Number of blocks of each stage.
            num_experts: Experts per MoE block, the base expert included (the paper's N, default 8).
            merge: ``'camex'`` (curvature-aware merging), ``'euclidean'`` (domain-specific merging) or ``'smoe'``
                (token-choice top-k baseline).
            mask: ``'ties'`` (default, the paper's best vision setting), ``'dare'`` or ``None``.
            kron_rank: Kronecker rank of the curvature matrices.
            alpha: Scale of the merged update. With ``dynamic=True`` upcycling is exact only for ``alpha=1``.
            top_k: Domain experts merged per image (``None``: all N-1); for ``'smoe'``, experts per token (2).
            density: TIES magnitude trim, the fraction of each domain vector kept (1: no trim).
            dare_p: DARE drop probability (training only).
            dare_mode: DARE drops whole experts per image (``'expert'``) or single parameters (``'element'``).
            moe_blocks: Per stage, the indices of its MoE blocks (negative count from the end); default: the odd
                blocks of the last two stages.
            dynamic: Propagate the base expert from MoE block to MoE block (a new chain starts where the width
                changes, i.e. in each stage).
            router_per: One router per MoE MLP (``'ffn'``) or per merged linear (``'linear'``).
            router_noise: Noisy top-k routing in training.
            balance_coef: Weight of the balance loss that ``camex_vision.aux_loss(model)`` returns.
            device: Device of the parameters.
            dtype: Dtype of the parameters.
            kwargs: Arguments of timm's ``SwinTransformer``.
        """
        check_model_kwargs(type(self).__name__, SwinTransformer, kwargs, reserved=set())
        depths = tuple(depths)
        if moe_blocks is None:
            blocks = _default_moe_blocks(depths)
        elif isinstance(moe_blocks, (str, bytes)) or len(moe_blocks) != len(depths):
            raise ValueError(f'moe_blocks={moe_blocks!r} must list the MoE blocks of each of the {len(depths)} '
                             f'stages, e.g. {[list(b) for b in _default_moe_blocks(depths)]}')
        else:
            blocks = tuple(resolve_moe_blocks(b, d, default=()) for b, d in zip(moe_blocks, depths))
        moe_options = dict(
            num_experts=num_experts, merge=merge, mask=mask, kron_rank=kron_rank, alpha=alpha, top_k=top_k,
            density=density, dare_p=dare_p, dare_mode=dare_mode, dynamic=dynamic, router_per=router_per,
            router_noise=router_noise, balance_coef=balance_coef)
        moe_layer = moe_mlp_layer(**moe_options)
        dense_kwargs = dict(kwargs, depths=depths, device=device, dtype=dtype)
        kwargs.setdefault('embed_layer', CheckedPatchEmbed)
        super().__init__(depths=depths, device=device, dtype=dtype, **kwargs)
        for stage, stage_blocks in zip(self.layers, blocks):
            for index in stage_blocks:
                block = stage.blocks[index]
                dense = block.mlp
                block.mlp = moe_layer(
                    in_features=dense.fc1.in_features,
                    hidden_features=dense.fc1.out_features,
                    out_features=dense.fc2.out_features,
                    act_layer=type(dense.act),
                    bias=(dense.fc1.bias is not None, dense.fc2.bias is not None),
                    drop=(dense.drop1.p, dense.drop2.p),
                    device=device,
                    dtype=dtype,
                )
        self.moe_blocks = blocks
        self._moe_options = moe_options
        self._dense_cls, self._dense_kwargs = SwinTransformer, dense_kwargs
        if dynamic:
            link_dynamic([m for _, m in moe_modules(self)])

    @torch.jit.ignore
    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """timm's Swin init (see ``SwinTransformer.init_weights``), then each router's own init."""
        super().init_weights(mode, needs_reset)
        self.reset_routers()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's Swin set plus the curvature factors, which start at identity (decay would pull them to zero)."""
        return super().no_weight_decay() | self.curvature_parameter_names()


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: CAMExSwinTransformer) -> Dict[str, torch.Tensor]:
    """Upcycle a dense timm Swin checkpoint or load a CAMEx one (see ``camex_vision.models._moe``).

    Checkpoints go through timm's Swin filter too (original Microsoft layouts, relative position bias resizing).
    """
    return filter_moe_checkpoint(state_dict, model, dense_filter=_swin_checkpoint_filter_fn, classifiers=('head.fc',))


def _create_camex_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> CAMExSwinTransformer:
    default_out_indices = tuple(i for i, _ in enumerate(kwargs.get('depths', (1, 1, 3, 1))))
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_model_with_cfg(
        CAMExSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(dense_name: str, **kwargs: Any) -> Dict[str, Any]:
    return dense_pretrained_cfg(dense_name, **kwargs)


default_cfgs = generate_default_cfgs({
    'camex_swin_tiny_patch4_window7_224.ms_in1k': _cfg('swin_tiny_patch4_window7_224.ms_in1k'),
    'camex_swin_tiny_patch4_window7_224.ms_in22k_ft_in1k': _cfg('swin_tiny_patch4_window7_224.ms_in22k_ft_in1k'),
    'camex_swin_small_patch4_window7_224.ms_in22k_ft_in1k': _cfg('swin_small_patch4_window7_224.ms_in22k_ft_in1k'),
    'camex_swin_small_patch4_window7_224.ms_in1k': _cfg('swin_small_patch4_window7_224.ms_in1k'),
    'camex_swin_base_patch4_window7_224.ms_in22k_ft_in1k': _cfg('swin_base_patch4_window7_224.ms_in22k_ft_in1k'),
    'camex_swin_base_patch4_window7_224.ms_in1k': _cfg('swin_base_patch4_window7_224.ms_in1k'),
    # no dense test Swin is published: random init only
    'test_camex_swin': dense_pretrained_cfg(
        'swin_tiny_patch4_window7_224.ms_in1k', hf_hub_id=None, origin_url=None,
        input_size=(3, 128, 128), pool_size=(4, 4)),
})


@register_model
def camex_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> CAMExSwinTransformer:
    """ CAMEx Swin-T @ 224x224: Swin-T with 8 merged experts in every other block of stages 3 and 4.
    """
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_camex_swin(
        'camex_swin_tiny_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def camex_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> CAMExSwinTransformer:
    """ CAMEx Swin-S @ 224x224: Swin-S with 8 merged experts in every other block of stages 3 and 4 (the paper's).
    """
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_camex_swin(
        'camex_swin_small_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def camex_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> CAMExSwinTransformer:
    """ CAMEx Swin-B @ 224x224: Swin-B with 8 merged experts in every other block of stages 3 and 4.
    """
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_camex_swin(
        'camex_swin_base_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_camex_swin(pretrained: bool = False, **kwargs: Any) -> CAMExSwinTransformer:
    """ CAMEx Swin Test: a tiny Swin (for fast tests), shifted windows in the MoE stages.
    """
    model_args = dict(
        img_size=128, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4))
    return _create_camex_swin('test_camex_swin', pretrained=pretrained, **dict(model_args, **kwargs))
