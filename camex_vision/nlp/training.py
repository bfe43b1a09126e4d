"""What the language training scripts share: arguments, models and tokenizers, distributed setup, the training
loop, per-epoch metrics CSV, and atomic checkpoints that resume.

A run writes into ``--output-dir``: ``checkpoint.pt`` (model, optimizer, scheduler, progress, metric history;
replaced atomically after every epoch), ``metrics.csv`` (one row per evaluation, rewritten atomically from the
history), and at the end ``model/`` (``save_pretrained`` of the converted model and its tokenizer) and
``results.json``. Launch with ``python -m ...`` on one device or ``torchrun --nproc_per_node=N -m ...``.
"""
import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from ..core import aux_loss
from .convert import camexify, init_experts_independently, is_camexified
from .persistence import from_pretrained
from .tokenizer import ByteTokenizer

CHECKPOINT = 'checkpoint.pt'
METRICS = 'metrics.csv'

_MERGE_OPTIONS = ('num_experts', 'merge', 'mask', 'kron_rank', 'alpha', 'dynamic', 'segment_length', 'first_segment',
                  'top_k', 'density', 'dare_p', 'dare_mode', 'router_per', 'router_noise', 'balance_coef')


# ---- arguments ----

def _segment_length(value: str) -> Optional[int]:
    if value.lower() in ('none', 'sequence'):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is neither an int nor "none"') from None


def add_model_args(parser: argparse.ArgumentParser, model_types: Sequence[str],
                   segment_length: Optional[int] = 256) -> None:
    """Model, tokenizer and CAMEx merge options (``segment_length``: the default of ``--segment-length``)."""
    group = parser.add_argument_group('model')
    group.add_argument('--model-name-or-path', default=None,
                       help='pretrained model (Hub name or directory; a directory saved from a converted model '
                            'continues with its recorded options); default: a fresh model from --model-type')
    group.add_argument('--model-type', default=model_types[0], choices=model_types,
                       help='architecture of a fresh model')
    group.add_argument('--config-overrides', default=None,
                       help='fresh model config changes, e.g. "n_embd=128,n_layer=4,n_head=4"')
    group.add_argument('--tokenizer', default=None,
                       help='"byte" (built-in byte-level tokenizer, no download) or a transformers tokenizer name or '
                            'directory; default: the model\'s tokenizer, or "byte" for a fresh model')
    group = parser.add_argument_group('CAMEx merging (see camex_vision.nlp.camexify)')
    group.add_argument('--dense', action='store_true', help='keep the dense model (the "Vanilla" baseline)')
    group.add_argument('--expert-init', default='auto', choices=('auto', 'upcycle', 'independent'),
                       help='experts copy the dense FFN (upcycle, exact) or are drawn independently at its '
                            'scale (independent, from scratch); auto: upcycle a pretrained model, independent for a '
                            'fresh one')
    group.add_argument('--num-experts', type=int, default=8)
    group.add_argument('--merge', default='camex', choices=('camex', 'euclidean'))
    group.add_argument('--mask', default='ties', type=lambda s: None if s.lower() == 'none' else s,
                       choices=(None, 'ties', 'dare'), help='ties, dare or none')
    group.add_argument('--kron-rank', type=int, default=1)
    group.add_argument('--alpha', type=float, default=1.0)
    group.add_argument('--dynamic', action='store_true', help='dynamic merging (base propagated through layers)')
    group.add_argument('--segment-length', type=_segment_length, default=segment_length,
                       help='tokens per causal routing segment, or "none" to route each whole sequence (models '
                            f'that do not generate only); default {segment_length}')
    group.add_argument('--first-segment', default='prior', choices=('prior', 'uniform', 'own'))
    group.add_argument('--top-k', type=int, default=None)
    group.add_argument('--density', type=float, default=1.0)
    group.add_argument('--dare-p', type=float, default=0.1)
    group.add_argument('--dare-mode', default='expert', choices=('expert', 'element'))
    group.add_argument('--router-per', default='ffn', choices=('ffn', 'linear'))
    group.add_argument('--no-router-noise', dest='router_noise', action='store_false')
    group.add_argument('--balance-coef', type=float, default=0.0)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Optimisation, evaluation, checkpointing (defaults: the paper's Table 8 AdamW settings)."""
    group = parser.add_argument_group('training')
    group.add_argument('--output-dir', required=True)
    group.add_argument('--resume', default=None,
                       help='"auto" (the checkpoint in --output-dir) or a checkpoint path')
    group.add_argument('--overwrite-output-dir', action='store_true',
                       help='start afresh even if --output-dir holds a checkpoint')
    group.add_argument('--num-epochs', type=int, default=3)
    group.add_argument('--max-steps', type=int, default=None, help='stop after this many optimizer steps')
    group.add_argument('--batch-size', type=int, default=8, help='per device')
    group.add_argument('--eval-batch-size', type=int, default=None)
    group.add_argument('--gradient-accumulation-steps', type=int, default=1)
    group.add_argument('--lr', type=float, default=5e-4)
    group.add_argument('--weight-decay', type=float, default=0.01)
    group.add_argument('--adam-eps', type=float, default=1e-6)
    group.add_argument('--adam-betas', type=float, nargs=2, default=(0.9, 0.98))
    group.add_argument('--warmup-steps', type=int, default=16)
    group.add_argument('--max-grad-norm', type=float, default=1.0)
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    group.add_argument('--bf16', action='store_true', help='bfloat16 autocast')
    group.add_argument('--log-every', type=int, default=50, help='log training loss every N steps (0: never)')
    group.add_argument('--skip-initial-eval', action='store_true', help='do not evaluate before training')


def merge_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``camexify`` keyword arguments from parsed arguments."""
    return {k: getattr(args, k) for k in _MERGE_OPTIONS}


def check_args(args: argparse.Namespace) -> None:
    """Reject bad training arguments with a message naming them."""
    for name in ('num_epochs', 'batch_size', 'gradient_accumulation_steps'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")}={getattr(args, name)} must be >= 1')
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f'--max-steps={args.max_steps} must be >= 1')
    if args.segment_length is not None and args.segment_length < 1:
        raise ValueError(f'--segment-length={args.segment_length} must be >= 1 (tokens per routing segment)')


# ---- models and tokenizers ----

def load_tokenizer(name: Optional[str], model_path: Optional[str]) -> Any:
    """``ByteTokenizer`` for ``"byte"`` (or a fresh model), else a transformers ``AutoTokenizer``."""
    if name is None and model_path is not None:
        if os.path.isdir(model_path) and ByteTokenizer.is_saved_in(model_path):
            return ByteTokenizer.from_pretrained(model_path)
        name = model_path
    if name is None or name == 'byte':
        return ByteTokenizer()
    if os.path.isdir(name) and ByteTokenizer.is_saved_in(name):
        return ByteTokenizer.from_pretrained(name)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)


def build_model(args: argparse.Namespace, model_cls: type, config: Any) -> nn.Module:
    """A pretrained (``--model-name-or-path``) or fresh (``config``) model, converted with the merge options.

    A pretrained model is upcycled exactly; a fresh one gets independently drawn experts (``--expert-init``). A
    directory saved from a converted model is loaded with ``camex_vision.nlp.from_pretrained`` and keeps its
    recorded options and weights.
    """
    path = args.model_name_or_path
    if path is not None and os.path.isfile(os.path.join(path, 'config.json')):
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            if 'camex' in json.load(f):
                return from_pretrained(path, model_class=model_cls).train()
    if path is not None:
        model = model_cls.from_pretrained(path, config=config)
    else:
        model = model_cls(config)
    if not args.dense:
        camexify(model, **merge_options(args))
        independent = args.expert_init == 'independent' or (args.expert_init == 'auto' and path is None)
        if independent:
            init_experts_independently(model, torch.Generator().manual_seed(args.seed))
    return model.train()


def apply_overrides(config: Any, overrides: Optional[str]) -> None:
    """``"n_embd=128,n_layer=4"`` applied to a transformers config (values cast to the existing attribute's type)."""
    if overrides:
        config.update_from_string(overrides)


# ---- distributed ----

@dataclass
class Distributed:
    """Process group facts: rank, world size and the device this process uses."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def sum(self, values: Sequence[float]) -> List[float]:
        """Sum ``values`` over processes."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch_dist.all_reduce(t)
        return t.tolist()

    def gather(self, items: List[Any]) -> List[Any]:
        """Concatenate every process's ``items`` (in rank order)."""
        if self.world_size == 1:
            return items
        out: List[List[Any]] = [[] for _ in range(self.world_size)]
        torch_dist.all_gather_object(out, items)
        return [x for part in out for x in part]


def setup_distributed(device: Optional[str]) -> Distributed:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or run alone."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', local)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return Distributed(rank, world, dev)


def shard_batches(n: int, batch_size: int, dist: Distributed, shuffle: bool, seed: int) -> List[List[int]]:
    """This process's batches of indices ``0..n-1``: shuffled with ``seed`` if asked, split evenly across processes
    (training drops up to ``world_size - 1`` examples so every process runs the same number of steps)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    if shuffle:
        per = n // dist.world_size
        mine = order[dist.rank::dist.world_size][:per]
    else:
        mine = order[dist.rank::dist.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# ---- checkpoints and metrics ----

def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: never a partial file."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by ``save_checkpoint`` (tensors and plain values only: ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    return torch.load(path, map_location='cpu', weights_only=True)


def write_metrics_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    """Write all metric rows (columns in first-seen order), atomically."""
    fields: List[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON-like copy of an argument value (tuples become lists) for the checkpoint."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- optimisation ----

def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on vectors (biases, norms, segment priors) or curvature factors (decay would
    pull the curvature from identity towards zero and shrink every merged update)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or '.curvature.' in name else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


# ---- the loop ----

def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def fit(
        args: argparse.Namespace,
        model: nn.Module,
        dist: Distributed,
        num_train: int,
        train_batch: Callable[[List[int]], Dict[str, torch.Tensor]],
        evaluate: Callable[[nn.Module], Dict[str, float]],
        extra_state: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Train ``model`` on ``num_train`` examples, evaluating and checkpointing after every epoch.

    Args:
        args: parsed training arguments (``add_training_args``; merge options recorded for resume checks).
        model: the model, on ``dist.device``; its forward returns ``.loss`` when given ``labels``.
        dist: process group facts.
        num_train: number of training examples.
        train_batch: example indices -> keyword arguments of the model's forward (with ``labels``), on the device.
        evaluate: model -> metrics of the validation data (the same on every process).
        extra_state: plain values that must match on resume (e.g. the label set).

    Returns:
        The metric history, one row per evaluation (epoch 0 is the model before training).
    """
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)
    resume = args.resume
    if resume is None and os.path.exists(ckpt_path) and not args.overwrite_output_dir:
        raise ValueError(f'{args.output_dir} already holds a checkpoint; pass --resume auto to continue it or '
                         f'--overwrite-output-dir to start afresh')
    batches_per_epoch = math.ceil((num_train // dist.world_size) / args.batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f'{num_train} training examples cannot be split over {dist.world_size} processes')
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    raw = model
    if dist.world_size > 1:
        ddp_kwargs = {'device_ids': [dist.device.index]} if dist.device.type == 'cuda' else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr, eps=args.adam_eps,
                                  betas=tuple(args.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.warmup_steps, total_steps))
    fingerprint = {'merge': {k: _plain(getattr(args, k, None)) for k in _MERGE_OPTIONS + ('dense',)},
                   'extra': extra_state or {}}

    epoch, step, history = 0, 0, []
    if resume is not None:
        path = ckpt_path if resume == 'auto' else resume
        if resume == 'auto' and not os.path.exists(path):
            if dist.is_main:
                print(f'no checkpoint in {args.output_dir}; starting afresh')
        else:
            state = load_checkpoint(path)
            if state['fingerprint'] != fingerprint:
                raise ValueError(f'checkpoint {path} was made with other model options or data '
                                 f'({state["fingerprint"]}), not {fingerprint}')
            raw.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
            scheduler.load_state_dict(state['scheduler'])
            epoch, step, history = state['epoch'], state['step'], list(state['history'])
            torch.set_rng_state(state['rng'])
            if dist.is_main:
                print(f'resumed from {path}: epoch {epoch}, step {step}')

    def autocast() -> torch.autocast:
        return torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def record(row: Dict[str, Any]) -> None:
        history.append(row)
        if dist.is_main:
            write_metrics_csv(os.path.join(args.output_dir, METRICS), history)
            print(json.dumps(row), flush=True)

    def checkpoint() -> None:
        if dist.is_main:
            save_checkpoint(ckpt_path, {
                'model': raw.state_dict(), 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'epoch': epoch, 'step': step, 'history': history, 'rng': torch.get_rng_state(),
                'fingerprint': fingerprint, 'args': {k: _plain(v) for k, v in vars(args).items()}})
        dist.barrier()

    if not history and not args.skip_initial_eval:
        with autocast():
            record({'epoch': 0, 'step': 0, **evaluate(raw)})
    while epoch < num_epochs and step < total_steps:
        model.train()
        start, losses, aux_losses, micro = time.time(), [], [], 0
        batches = shard_batches(num_train, args.batch_size, dist, shuffle=True, seed=args.seed + epoch)
        for batch_indices in batches:
            with autocast():
                out = model(**train_batch(batch_indices))
            loss = out.loss / args.gradient_accumulation_steps
            loss.backward()
            losses.append(float(out.loss.detach()))
            aux_losses.append(float(aux_loss(raw).detach()))
            micro += 1
            if micro % args.gradient_accumulation_steps and micro != len(batches):
                continue
            if args.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(raw.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if dist.is_main and args.log_every and step % args.log_every == 0:
                recent = losses[-args.log_every * args.gradient_accumulation_steps:]
                print(f'step {step}/{total_steps} loss {sum(recent) / len(recent):.4f} '
                      f'lr {scheduler.get_last_lr()[0]:.3g}', flush=True)
            if step >= total_steps:
                break
        epoch += 1
        loss_sum, aux_sum, count = dist.sum([sum(losses), sum(aux_losses), len(losses)])
        train_loss, train_aux = loss_sum / max(count, 1), aux_sum / max(count, 1)
        with autocast():
            metrics = evaluate(raw)
        record({'epoch': epoch, 'step': step, 'train_loss': train_loss, 'train_aux_loss': train_aux, **metrics,
                'lr': scheduler.get_last_lr()[0], 'seconds': round(time.time() - start, 2)})
        checkpoint()
    return history


def finish(args: argparse.Namespace, model: nn.Module, tokenizer: Any, history: List[Dict[str, Any]],
           dist: Distributed) -> None:
    """Save the final model (``save_pretrained``, loadable with ``camex_vision.nlp.from_pretrained`` when converted)
    with its tokenizer, and ``results.json`` holding the last evaluation."""
    if dist.is_main:
        out = os.path.join(args.output_dir, 'model')
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        results = dict(history[-1]) if history else {}
        results['converted'] = is_camexified(model)
        with open(os.path.join(args.output_dir, 'results.json'), 'w', encoding='utf-8') as f:
            json.dump(results, f, indent=2)
    dist.barrier()
