"""CAMEx models in timm's registry: ``camex_vit_*``, ``camex_swin_*`` and the tiny ``test_camex_*`` models.

Importing this package (``import camex_vision`` does) registers them, so ``timm.create_model('camex_...')`` works.
"""
from ._moe import CheckedPatchEmbed, MoEModelMixin, filter_moe_checkpoint, moe_modules
from .camex_swin import CAMExSwinTransformer
from .camex_vit import CAMExVisionTransformer

__all__ = [
    'CAMExSwinTransformer', 'CAMExVisionTransformer', 'CheckedPatchEmbed', 'MoEModelMixin', 'filter_moe_checkpoint',
    'moe_modules',
]
