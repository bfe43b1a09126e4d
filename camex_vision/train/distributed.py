"""Distributed helpers on top of ``torch.distributed`` and timm's ``init_distributed_device``.

``torchrun --nproc_per_node=N train_vision.py ...`` starts N processes; each calls ``init_distributed`` which joins
the process group (gloo on CPU, nccl on CUDA) from torchrun's environment variables. Multi-node runs use torchrun's
usual flags (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``/``--master_addr``), nothing else changes.

Only the primary process (global rank 0) writes files. Decisions that depend on the file system (is the output
folder free?) are taken on the primary and shared with ``primary_decides`` so that every rank fails the same way
instead of waiting forever in a collective.
"""
import logging
from typing import Any, Callable, List

import torch
import torch.distributed as dist
from timm.utils import init_distributed_device

from .errors import InputError

_logger = logging.getLogger(__name__)


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def init_distributed(args) -> torch.device:
    """Resolves ``args.device`` and joins the process group when launched by torchrun (or SLURM).

    Sets ``args.distributed``, ``args.world_size``, ``args.rank`` and ``args.local_rank`` (timm's convention).
    The backend defaults to gloo on CPU and nccl on CUDA; ``args.dist_backend`` overrides it.
    """
    args.device = args.device or default_device()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise InputError(f'--device {args.device} requested but CUDA is not available; use --device cpu')
    device = init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device} ({dist.get_backend()} backend).')
    return device


def is_primary(args) -> bool:
    return getattr(args, 'rank', 0) == 0


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned as a new tensor (the input unchanged); identity outside distributed runs."""
    out = tensor.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` outside distributed runs)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def primary_decides(fn: Callable[[], Any], args) -> Any:
    """Runs ``fn`` on the primary only and gives its result to every rank; an ``InputError`` is raised everywhere."""
    result, error = None, None
    if is_primary(args):
        try:
            result = fn()
        except InputError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise InputError(error)
    return result


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
