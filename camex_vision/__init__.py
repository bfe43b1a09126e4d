"""camex_vision: CAMEx (curvature-aware merging of experts) for timm vision models and transformers LMs.

Importing the package registers the ``camex_*`` models in timm's registry.
"""
from .core import (
    CAMExMlp, CurvatureKron, MergedLinear, SMoEMlp, aux_loss, expert_usage, link_dynamic_chain, reparameterize)
from .version import __version__
from . import models  # registers the camex_* models with timm
