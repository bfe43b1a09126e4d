"""Epoch meters that reduce across ranks: classification metrics (torchmetrics) and expert usage.

Both are exact under distributed evaluation: each rank sees a disjoint, unpadded shard, torchmetrics gathers the
accuracy states from every rank on ``compute()``, and sums (loss, usage) are all-reduced with their counts.
"""
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torchmetrics.classification import MulticlassAccuracy

from .distributed import all_reduce_sum


class ClassificationMeter:
    """Mean loss, top-1 and top-5 accuracy (in percent) over an evaluation pass.

    Args:
        num_classes: number of logits the meter sees.
        device: where the metric states live (the model's device).
    """

    def __init__(self, num_classes: int, device: torch.device):
        self.top_k = min(5, num_classes)
        self.top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average='micro').to(device)
        self.top5 = MulticlassAccuracy(num_classes=num_classes, top_k=self.top_k, average='micro').to(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """``loss`` is the batch mean; it is weighted by the batch size."""
        logits = logits.float()
        self.top1.update(logits, target)
        self.top5.update(logits, target)
        self.loss_sum += loss.detach().double() * target.shape[0]
        self.count += target.shape[0]

    def compute(self) -> Dict[str, float]:
        """Metrics over every rank's samples; every rank must call it (it synchronises)."""
        sums = all_reduce_sum(torch.stack([self.loss_sum, self.count]))
        return OrderedDict(
            loss=(sums[0] / sums[1].clamp(min=1)).item(),
            top1=100. * self.top1.compute().item(),
            top5=100. * self.top5.compute().item(),
            count=int(sums[1].item()),
        )


class UsageMeter:
    """Sample-weighted mean gate per expert of each MoE layer over an epoch (``camex_vision.expert_usage``)."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = OrderedDict()
        self.count = 0

    @torch.no_grad()
    def update(self, usage: Dict[str, torch.Tensor], batch_size: int) -> None:
        for name, gates in usage.items():
            gates = gates.detach().double() * batch_size
            self.sums[name] = self.sums[name] + gates if name in self.sums else gates
        self.count += batch_size

    def compute(self) -> Dict[str, torch.Tensor]:
        """Per layer ``[num_experts]`` mean usage over every rank's samples; every rank must call it."""
        if not self.sums:
            return OrderedDict()
        names = sorted(self.sums)
        sizes = [self.sums[n].numel() for n in names]
        device = self.sums[names[0]].device
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        flat = torch.cat([self.sums[n].flatten() for n in names] + [count])
        flat = all_reduce_sum(flat)
        total = flat[-1].clamp(min=1)
        out, offset = OrderedDict(), 0
        for name, size in zip(names, sizes):
            out[name] = (flat[offset:offset + size] / total).float().cpu()
            offset += size
        return out


def usage_columns(usage: Dict[str, torch.Tensor], prefix: str = 'usage') -> Dict[str, float]:
    """Flattens per-layer usage into summary columns ``usage/<layer>/e<i>``."""
    cols = OrderedDict()
    for name, gates in usage.items():
        for i, g in enumerate(gates.tolist()):
            cols[f'{prefix}/{name}/e{i}'] = round(float(g), 6)
    return cols


def parse_usage_columns(row: Dict[str, str], prefix: str) -> Dict[str, Dict[int, float]]:
    """Inverse of ``usage_columns`` for one summary row: ``{layer: {expert: usage}}`` of columns under ``prefix``."""
    out: Dict[str, Dict[int, float]] = OrderedDict()
    for key, value in row.items():
        if not key.startswith(prefix + '/') or value in (None, ''):
            continue
        name, expert = key[len(prefix) + 1:].rsplit('/e', 1)
        out.setdefault(name, {})[int(expert)] = float(value)
    return out


def format_usage(usage: Dict[str, torch.Tensor], max_layers: Optional[int] = 4) -> str:
    """A short log line: the most and least used expert of each layer."""
    parts = []
    for name, gates in list(usage.items())[:max_layers]:
        parts.append(f'{name}: max e{int(gates.argmax())} {gates.max():.2f} / min e{int(gates.argmin())} '
                     f'{gates.min():.2f}')
    more = f' (+{len(usage) - max_layers} layers)' if max_layers and len(usage) > max_layers else ''
    return '; '.join(parts) + more
