"""The CAMEx merge core: curvature, routers, merged linears and MoE MLPs. Imports neither timm nor transformers."""
from .curvature import CurvatureKron, kron_split
from .merge import MergedLinear, dare_keep, link_dynamic_chain, release_merge_scratch, ties_mask
from .mlp import CAMExGatedMlp, CAMExMlp, MoEModule, SegmentCache, SMoEMlp
from .router import Router, SegmentRouting, SegmentState, balance_loss, cv_squared, pool_units
from .utils import aux_loss, expert_usage, reparameterize
