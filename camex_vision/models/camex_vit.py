""" CAMEx Vision Transformer (ViT) in PyTorch

Vision Transformers whose feed-forward blocks are curvature-aware merged mixtures of experts:

  * `CAMEx: Curvature-aware Merging of Experts` - https://arxiv.org/abs/2502.18821 (ICLR 2025)
  * `An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale` - https://arxiv.org/abs/2010.11929
  * `Scaling Vision with Sparse Mixture of Experts` (V-MoE, MoE in every other block) - https://arxiv.org/abs/2106.05974
  * `How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers` (the AugReg weights
    upcycled here) - https://arxiv.org/abs/2106.10270

The model is timm's ``VisionTransformer`` with its ``block_fn`` hook placing a ``CAMExMlp`` (or the token-choice
``SMoEMlp`` baseline) in the MoE blocks, odd indices by default (V-MoE's placement). ``pretrained=True`` loads the
dense timm weights from the Hugging Face Hub and upcycles them exactly: every expert starts as the dense FFN, so
the model computes what the dense model computes until it is fine-tuned.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Set, Type

import torch
from torch import nn

from timm.layers import Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ._moe import (
    CheckedPatchEmbed, MoEModelMixin, check_model_kwargs, dense_pretrained_cfg, filter_moe_checkpoint, link_dynamic,
    moe_mlp_layer, moe_modules, resolve_moe_blocks, scale_fc2_)

__all__ = ['CAMExVisionTransformer']


def _moe_block(
        *,
        depth: int,
        mlp_layer: Type[nn.Module],
        moe_blocks: Sequence[int],
        moe_layer: Callable[..., nn.Module],
        **kwargs: Any,
) -> Block:
    """timm's ``Block``, with the MoE MLP when its index ``depth`` is one of ``moe_blocks``."""
    return Block(depth=depth, mlp_layer=moe_layer if depth in moe_blocks else mlp_layer, **kwargs)


class CAMExVisionTransformer(MoEModelMixin, VisionTransformer):
    """ Vision Transformer with curvature-aware merged experts in chosen blocks

    Takes every argument of timm's ``VisionTransformer`` (except ``block_fn``/``mlp_layer``, which it sets) plus
    the MoE options below; the whole timm API (``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``features_only``, ``reset_classifier``, grad checkpointing, ...) is inherited unchanged.
    """

    def __init__(
            self,
            *,
            depth: int = 12,
            num_experts: int = 8,
            merge: str = 'camex',
            mask: Optional[str] = 'ties',
            kron_rank: int = 1,
            alpha: float = 1.0,
            top_k: Optional[int] = None,
            density: float = 1.0,
            dare_p: float = 0.1,
            dare_mode: str = 'expert',
            moe_blocks: Optional[Sequence[int]] = None,
            dynamic: bool = False,
            router_per: str = 'ffn',
            router_noise: bool = True,
            balance_coef: float = 0.0,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            depth: Number of transformer blocks.
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
            moe_blocks: Indices of the MoE blocks (negative count from the end); default: the odd ones.
            dynamic: Propagate the base expert from MoE block to MoE block (the paper's parameter-saving variant).
            router_per: One router per MoE MLP (``'ffn'``) or per merged linear (``'linear'``).
            router_noise: Noisy top-k routing in training.
            balance_coef: Weight of the balance loss that ``camex_vision.aux_loss(model)`` returns.
            kwargs: Arguments of timm's ``VisionTransformer``.
        """
        check_model_kwargs(type(self).__name__, VisionTransformer, kwargs, reserved={'block_fn', 'mlp_layer'})
        blocks = resolve_moe_blocks(moe_blocks, depth, default=range(1, depth, 2))
        moe_options = dict(
            num_experts=num_experts, merge=merge, mask=mask, kron_rank=kron_rank, alpha=alpha, top_k=top_k,
            density=density, dare_p=dare_p, dare_mode=dare_mode, dynamic=dynamic, router_per=router_per,
            router_noise=router_noise, balance_coef=balance_coef)
        moe_layer = moe_mlp_layer(**moe_options)
        dense_kwargs = dict(kwargs, depth=depth)
        kwargs.setdefault('embed_layer', CheckedPatchEmbed)
        super().__init__(
            depth=depth,
            block_fn=partial(_moe_block, moe_blocks=frozenset(blocks), moe_layer=moe_layer),
            mlp_layer=Mlp,
            **kwargs,
        )
        self.moe_blocks = blocks
        self._moe_options = moe_options
        self._dense_cls, self._dense_kwargs = VisionTransformer, dense_kwargs
        if dynamic:
            link_dynamic([m for _, m in moe_modules(self)])

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """timm's ViT init (see ``VisionTransformer.init_weights``), then each router's own init."""
        super().init_weights(mode, needs_reset)
        self.reset_routers()

    def fix_init_weight(self) -> None:
        """timm's ``fix_init`` (scale each block's output projections by its depth), for dense and MoE MLPs."""
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                scale = (2.0 * (layer_id + 1)) ** 0.5
                layer.attn.proj.weight.div_(scale)
                scale_fc2_(layer.mlp, scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's ViT set plus the curvature factors, which start at identity (decay would pull them to zero)."""
        return super().no_weight_decay() | self.curvature_parameter_names()


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: CAMExVisionTransformer) -> Dict[str, torch.Tensor]:
    """Upcycle a dense timm ViT checkpoint or load a CAMEx one (see ``camex_vision.models._moe``).

    Dense checkpoints go through timm's ViT filter first (position embedding / patch resampling).
    """
    return filter_moe_checkpoint(state_dict, model, dense_filter=_vit_checkpoint_filter_fn, classifiers=('head',))


def _create_camex_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> CAMExVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        CAMExVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(dense_name: str, **kwargs: Any) -> Dict[str, Any]:
    return dense_pretrained_cfg(dense_name, **kwargs)


default_cfgs = generate_default_cfgs({
    'camex_vit_tiny_patch16_224.augreg_in21k_ft_in1k': _cfg('vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    'camex_vit_small_patch16_224.augreg_in21k_ft_in1k': _cfg('vit_small_patch16_224.augreg_in21k_ft_in1k'),
    'camex_vit_small_patch16_224.augreg_in1k': _cfg('vit_small_patch16_224.augreg_in1k'),
    'camex_vit_base_patch16_224.augreg2_in21k_ft_in1k': _cfg('vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    'camex_vit_base_patch16_224.augreg_in21k_ft_in1k': _cfg('vit_base_patch16_224.augreg_in21k_ft_in1k'),
    'camex_vit_base_patch16_224.augreg_in1k': _cfg('vit_base_patch16_224.augreg_in1k'),
    'test_camex_vit.r160_in1k': _cfg('test_vit.r160_in1k'),
})


@register_model
def camex_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> CAMExVisionTransformer:
    """ CAMEx ViT-Ti/16 @ 224x224: ViT-Ti/16 with 8 merged experts in every other block.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_camex_vit('camex_vit_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def camex_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> CAMExVisionTransformer:
    """ CAMEx ViT-S/16 @ 224x224: ViT-S/16 with 8 merged experts in every other block.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_camex_vit('camex_vit_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def camex_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> CAMExVisionTransformer:
    """ CAMEx ViT-B/16 @ 224x224: ViT-B/16 with 8 merged experts in every other block.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_camex_vit('camex_vit_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_camex_vit(pretrained: bool = False, **kwargs: Any) -> CAMExVisionTransformer:
    """ CAMEx ViT Test: timm's ``test_vit`` dimensions (for fast tests).
    """
    model_args = dict(patch_size=16, embed_dim=64, depth=6, num_heads=2, mlp_ratio=3, dynamic_img_size=True)
    return _create_camex_vit('test_camex_vit', pretrained=pretrained, **dict(model_args, **kwargs))
