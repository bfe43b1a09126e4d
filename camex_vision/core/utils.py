"""Model-level helpers: test-time reparameterisation, balance losses and expert usage of any model."""
from typing import Dict

import torch
from torch import nn

from .merge import MergedLinear
from .mlp import MoEModule


@torch.no_grad()
def reparameterize(module: nn.Module) -> nn.Module:
    """Fold curvature, fixed masks, alpha and dynamic chains of every ``MergedLinear`` in ``module``, in place.

    Afterwards every merged layer is a plain Euclidean merge of folded experts with no curvature cost, and the
    model's eval-mode outputs are unchanged (to float tolerance). Every dynamic base is computed before any layer
    is folded, so chains fold consistently. Returns ``module`` for chaining.
    """
    layers = [m for m in module.modules() if isinstance(m, MergedLinear)]
    for layer in layers:
        layer._outgoing = None  # drop anything a truncated forward pass left behind
    was_training = [layer.training for layer in layers]
    for layer in layers:
        layer.eval()
    bases = [None if layer.owns_base else tuple(t.detach().clone() if t is not None else None for t in layer.base())
             for layer in layers]
    for layer, base, training in zip(layers, bases, was_training):
        layer.reparameterize_(base)
        layer.train(training)
    return module


def aux_loss(module: nn.Module) -> torch.Tensor:
    """Sum of the weighted balance losses recorded by the last forward pass of every MoE layer (0 if none)."""
    losses = [m.last_aux_loss for m in module.modules() if isinstance(m, MoEModule) and m.last_aux_loss is not None]
    if not losses:
        p = next(module.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def expert_usage(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Mean gate per expert of each MoE layer's last forward pass, keyed by module name."""
    return {name: m.last_usage for name, m in module.named_modules()
            if isinstance(m, MoEModule) and m.last_usage is not None}
