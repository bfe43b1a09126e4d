#!/usr/bin/env python3
""" CAMEx ImageNet-style training script

timm's ``train.py``, built from timm's library pieces (dataset and loader factories, ``create_optimizer_v2``,
``create_scheduler_v2``, ``ModelEmaV3``, the checkpoint saver's bookkeeping, ``update_summary``, mixup), with what a
mixture-of-experts model needs on top: the balance loss is added to the task loss, and every epoch logs the
balance loss and the mean router score of each expert of each MoE layer.

With no arguments it runs the embedded default: a small CAMEx ViT (``test_camex_vit``, 4x4 patches) trained on
Fashion-MNIST, about ten minutes on two CPU cores, ending with a short report. Everything is overridable the timm way:

    python train_vision.py                                            # the embedded default
    python train_vision.py -c configs/cifar10_camex_vit.yaml          # a config file, command line on top
    python train_vision.py --model camex_vit_small_patch16_224 --pretrained --dataset '' --data-dir /imagenet \\
        --val-split val --img-size 224 --in-chans 3 --model-kwargs patch_size=16 --batch-size 256 --amp
    torchrun --nproc_per_node=2 train_vision.py --epochs 2            # DistributedDataParallel (gloo on CPU)
    python train_vision.py --resume output/train/<run>                # continue a run exactly

Outputs (``--output``/``--experiment``, default ``output/train/<date>-<model>-<size>``): ``args.yaml``,
``summary.csv`` (a row per epoch), ``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar`` (the
best ``--checkpoint-hist``), ``model_best.safetensors`` and PNG plots. Every file is written atomically and every
checkpoint loads with ``torch.load(..., weights_only=True)``.

Bad input (missing data, unknown model or dataset, class-count mismatch, corrupt checkpoints, unreadable images, an
output folder holding another run) ends with a one-line message and exit status 2, before anything is written.
"""
import argparse
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, Optional, Tuple

# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other jobs, spinning threads
# slow training several-fold; on an idle machine the cost is small. Must be set before torch loads OpenMP.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as NativeDDP  # noqa: E402

from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.models import model_parameters, safe_model_name  # noqa: E402
from timm.optim import create_optimizer_v2, optimizer_kwargs  # noqa: E402
from timm.scheduler import create_scheduler_v2, scheduler_kwargs  # noqa: E402
from timm.utils import (  # noqa: E402
    ModelEmaV3, NativeScaler, ParseKwargs, dispatch_clip_grad, distribute_bn, get_state_dict, random_seed,
    setup_default_logging, trim_summary, unwrap_model, update_summary)

import camex_vision  # noqa: E402
from camex_vision.core import release_merge_scratch  # noqa: E402
from camex_vision.train import checkpoint as ckpt  # noqa: E402
from camex_vision.train.data import (  # noqa: E402
    VERIFY_LEVELS, build_dataset, class_names, parse_dataset_name, verify_images)
from camex_vision.train.distributed import (  # noqa: E402
    all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed, is_primary, primary_decides)
from camex_vision.train.errors import EXIT_BAD_INPUT, InputError, describe  # noqa: E402
from camex_vision.train.factory import count_params, create_model, has_moe  # noqa: E402
from camex_vision.train.metrics import ClassificationMeter, UsageMeter, format_usage, usage_columns  # noqa: E402
from camex_vision.train.plots import plot_run  # noqa: E402
from camex_vision.train.progress import Progress, use_progress_bar  # noqa: E402

_logger = logging.getLogger('train')

DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'fashion_mnist': dict(in_chans=1, img_size=28, mean=(0.2860,), std=(0.3530,), crop_pct=1.0),
    'mnist': dict(in_chans=1, img_size=28, mean=(0.1307,), std=(0.3081,), crop_pct=1.0),
    'kmnist': dict(in_chans=1, img_size=28, mean=(0.1918,), std=(0.3483,), crop_pct=1.0),
    'qmnist': dict(in_chans=1, img_size=28, mean=(0.1307,), std=(0.3081,), crop_pct=1.0),
    'cifar10': dict(in_chans=3, img_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    crop_pct=1.0),
    'cifar100': dict(in_chans=3, img_size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     crop_pct=1.0),
}
"""Input settings of the small torchvision datasets, used where ``--in-chans``/``--img-size``/... are not given."""

DEFAULT_MODEL = 'test_camex_vit'
DEFAULT_MODEL_KWARGS = {'patch_size': 4, 'class_token': False, 'global_pool': 'avg'}
"""The embedded default's model and the kwargs it adds to that model only: 4x4 patches (49 tokens at 28x28) and
average pooling instead of a class token (it learns faster on a short budget); any other ``--model`` starts from its
own defaults."""

RESUME_KEEPS_CURRENT = {'resume', 'config', 'output', 'experiment', 'device', 'log_interval', 'progress',
                        'dist_backend', 'dist_url', 'pin_mem', 'no_resume_opt'}
"""Arguments a resumed run takes from its command line rather than from the checkpoint."""


class MergeKwargs(ParseKwargs):
    """timm's ``--model-kwargs k=v ...`` parser, merging into the default (config or embedded) instead of replacing."""

    def __call__(self, parser, namespace, values, option_string=None):
        base = dict(getattr(namespace, self.dest, None) or {})
        super().__call__(parser, namespace, values, option_string)
        base.update(getattr(namespace, self.dest))
        setattr(namespace, self.dest, base)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; defaults are the embedded default run (timm's names wherever they overlap)."""
    parser = argparse.ArgumentParser(
        description='CAMEx training (timm-style). No arguments: a small CAMEx ViT on Fashion-MNIST on CPU.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file of argument defaults (keys are the long option names, - or _)')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='dataset root (image folders: root/<split>/<class>/*; torch/ datasets: torchvision root, '
                            'default ./data, Fashion-MNIST is also found in /usr/share/datasets/fashion-mnist)')
    group.add_argument('--dataset', '-d', metavar='NAME', default='torch/fashion_mnist',
                       help="'' for image folders, or torch/fashion_mnist, torch/mnist, torch/cifar10, ...")
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation')
    group.add_argument('--dataset-download', action=argparse.BooleanOptionalAction, default=True,
                       help='download torch/ datasets that are not found offline')
    group.add_argument('--class-map', default='', metavar='FILENAME', help='class name to index mapping file')
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='train on a fixed random subset of N images')
    group.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                       help='evaluate on a fixed random subset of N images (validate.py --num-samples picks the same)')
    group.add_argument('--verify-images', default='auto', choices=VERIFY_LEVELS,
                       help='check image files before training: decode all (full), open all (header); auto: full '
                            'up to 50k images')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default=DEFAULT_MODEL, metavar='MODEL', help='timm model name')
    group.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    group.add_argument('--pretrained-path', default='', metavar='PATH',
                       help='pretrained weights from a local file (implies --pretrained; the head is re-initialised '
                            'when the class count differs)')
    group.add_argument('--initial-checkpoint', default='', metavar='PATH',
                       help='initialise the model (all weights, same classes) from a checkpoint')
    group.add_argument('--resume', default='', metavar='PATH',
                       help='resume from a checkpoint file or run folder (its arguments become the defaults, output '
                            'goes to its folder)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='do not restore optimizer and AMP scaler state when resuming')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='default: from the data')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='image size (default: the dataset\'s for torch/ datasets, else the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='input channels (default: 1 for the MNIST family, else 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='all input dimensions (c h w), overrides --img-size/--in-chans')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='evaluation center crop fraction')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalisation std')
    group.add_argument('--interpolation', default='', metavar='NAME', help='evaluation resize interpolation')
    group.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=MergeKwargs,
                       help=f'extra model arguments k=v, merged over the config file\'s (and, for {DEFAULT_MODEL}, '
                            f'over {DEFAULT_MODEL_KWARGS})')
    group.add_argument('--channels-last', action='store_true', default=False)
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='gradient checkpointing through the model\'s blocks')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='torch.compile the model with this backend')

    group = parser.add_argument_group('Mixture-of-experts parameters')
    group.add_argument('--balance-coef', type=float, default=0.01, metavar='W',
                       help='balance-loss weight of CAMEx models (their balance_coef; 0 turns it off)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='adamw', metavar='OPTIMIZER')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    group.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    group.add_argument('--layer-decay', type=float, default=None)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                       help='step the schedule every optimizer update instead of every epoch')
    group.add_argument('--lr', type=float, default=1e-3, metavar='LR')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    group.add_argument('--lr-noise-pct', type=float, default=0.67)
    group.add_argument('--lr-noise-std', type=float, default=1.0)
    group.add_argument('--lr-cycle-mul', type=float, default=1.0)
    group.add_argument('--lr-cycle-decay', type=float, default=0.5)
    group.add_argument('--lr-cycle-limit', type=int, default=1)
    group.add_argument('--lr-k-decay', type=float, default=1.0)
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--epochs', type=int, default=5, metavar='N')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    group.add_argument('--warmup-epochs', type=int, default=1, metavar='N')
    group.add_argument('--warmup-prefix', action='store_true', default=False)
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable training augmentation')
    group.add_argument('--scale', type=float, nargs='+', default=[0.75, 1.0], metavar='PCT',
                       help='random resized crop area range')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.)
    group.add_argument('--color-jitter', type=float, default=0.0, metavar='PCT')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (on if > 0)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (on if > 0)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', type=str, default='bilinear')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='distribute BatchNorm stats after each epoch: broadcast, reduce or ""')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true', default=False)

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S')
    group.add_argument('--worker-seeding', type=str, default='all')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
    group.add_argument('--progress', default='auto', choices=('auto', 'bar', 'log'),
                       help='progress bars (auto: only on a terminal) or log lines')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='epoch checkpoints kept')
    group.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data loading processes')
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision (autocast)')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    group.add_argument('--no-prefetcher', action='store_true', default=False)
    group.add_argument('--pin-mem', action='store_true', default=False)
    group.add_argument('--output', default='', metavar='PATH', help='output root (default: output/train)')
    group.add_argument('--experiment', default='', metavar='NAME', help='run folder name under --output')
    group.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    group.add_argument('--export-safetensors', action=argparse.BooleanOptionalAction, default=True,
                       help='write the best weights as model_best.safetensors at the end')
    group.add_argument('--plots', action=argparse.BooleanOptionalAction, default=True,
                       help='write learning-curve and expert-usage PNGs after every epoch')
    group.add_argument('--device', default=None, help='cuda or cpu (default: cuda if available)')
    group.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    group.add_argument('--dist-url', default='env://')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='no DDP buffer broadcast before each forward')
    return parser


# ---- arguments ----

def _load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise InputError(f'config file {path} does not exist')
    try:
        with open(path, encoding='utf-8') as f:
            cfg = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f'config file {path} is not valid YAML: {e}') from e
    if not isinstance(cfg, dict):
        raise InputError(f'config file {path} must hold a mapping of option names to values')
    known = {a.dest for a in parser._actions}
    cfg = {str(k).replace('-', '_'): v for k, v in cfg.items()}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise InputError(f'config file {path}: unknown option(s) {", ".join(unknown)}')
    return cfg


def parse_args(argv=None) -> Tuple[argparse.Namespace, Optional[Dict[str, Any]], str]:
    """Defaults < config file (``-c``) < the resumed checkpoint's arguments < the command line.

    Returns the arguments, the loaded resume checkpoint (or None) and its resolved path.
    """
    parser = build_parser()
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument('-c', '--config', default='')
    peek.add_argument('--resume', default='')
    pre, _ = peek.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_config(pre.config, parser))
    resume_state, resume_path = None, ''
    if pre.resume:
        resume_path = ckpt.resolve_checkpoint(pre.resume, prefer=(ckpt.LAST,))
        resume_state = ckpt.load_checkpoint_file(resume_path)
        if 'optimizer' not in resume_state or 'args' not in resume_state:
            raise InputError(f'{resume_path} is a weights file, not a training checkpoint; use --initial-checkpoint')
        known = {a.dest for a in parser._actions}
        saved = {k: v for k, v in resume_state['args'].items() if k in known and k not in RESUME_KEEPS_CURRENT}
        parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    return args, resume_state, resume_path


def resolve_input_args(args) -> None:
    """Fills ``in_chans``/``img_size``/``mean``/``std``/``crop_pct`` from ``DATASET_DEFAULTS`` where not given, and the
    default model's kwargs; checks counts."""
    kind, name = parse_dataset_name(args.dataset)
    defaults = DATASET_DEFAULTS.get(name, {}) if kind == 'torch' else {}
    if args.input_size is not None:
        args.in_chans, args.img_size = args.input_size[0], args.input_size[-1]
    for key in ('in_chans', 'img_size', 'mean', 'std', 'crop_pct'):
        if getattr(args, key) is None and key in defaults:
            setattr(args, key, defaults[key])
    if args.in_chans is None:
        args.in_chans = 3
    if args.model == DEFAULT_MODEL:
        args.model_kwargs = {**DEFAULT_MODEL_KWARGS, **args.model_kwargs}
    for key in ('batch_size', 'epochs', 'checkpoint_hist', 'log_interval'):
        if getattr(args, key) < 1:
            raise InputError(f'--{key.replace("_", "-")} must be >= 1, got {getattr(args, key)}')


def args_dict(args) -> Dict[str, Any]:
    """The arguments as plain values (what ``args.yaml`` and checkpoints store)."""
    skip = {'distributed', 'world_size', 'rank', 'local_rank', 'prefetcher'}
    return {k: ckpt.plain(v) for k, v in sorted(vars(args).items()) if k not in skip}


def _yaml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _yaml_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_ready(v) for v in value]
    return value


# ---- output folder ----

def _holds_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, f)) for f in ckpt.RUN_FILES)


def choose_output_dir(args, resume_path: str, data_config: Dict[str, Any]) -> str:
    """The run folder; refuses one that holds another run (unless this run resumes from it)."""
    resume_dir = os.path.dirname(os.path.abspath(resume_path)) if resume_path else ''
    if resume_dir and not (args.output or args.experiment):
        return resume_dir
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    folder = os.path.abspath(os.path.join(args.output or os.path.join('output', 'train'), name))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f'output path {folder} exists and is not a folder')
    if _holds_run(folder) and not (resume_dir and os.path.samefile(folder, resume_dir)):
        raise InputError(f'output folder {folder} already holds another run; choose another --experiment/--output, '
                         f'or continue it with --resume {folder}')
    return folder


# ---- one epoch ----

def _mean_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g['lr'] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args,
        device: torch.device,
        lr_scheduler=None,
        amp_autocast=nullcontext,
        loss_scaler=None,
        model_ema=None,
        mixup_fn=None,
        num_updates: int = 0,
) -> Tuple[Dict[str, float], int]:
    """One pass over ``loader``; returns the epoch's metrics (reduced over ranks) and the update count."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and loader.mixup_enabled:
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False
    model.train()
    core = unwrap_model(model)
    usage = UsageMeter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    progress = Progress(len(loader), f'Train {epoch}/{args.epochs - 1}', is_primary(args),
                        use_progress_bar(args.progress), args.log_interval)
    for step, (input, target) in enumerate(loader):
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        with amp_autocast():
            output = model(input)
            loss = loss_fn(output, target)
        aux = camex_vision.aux_loss(core)  # the weighted balance losses of this forward (0 without MoE layers)
        total = loss + aux

        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(total, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=model_parameters(model, exclude_head='agc' in args.clip_mode))
        else:
            total.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model_parameters(model, exclude_head='agc' in args.clip_mode),
                                   value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(core, step=num_updates)
        num_updates += 1

        n = input.shape[0]
        seen += n
        loss_sum += loss.detach().double() * n
        aux_sum += aux.detach().double() * n
        usage.update(camex_vision.expert_usage(core), n)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        if progress.wants(step):
            progress.update(step, images=seen * args.world_size, loss=(loss_sum / seen).item(),
                            aux=(aux_sum / seen).item(), lr=_mean_lr(optimizer))
    elapsed = progress.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()

    seen_t = torch.tensor(float(seen), dtype=torch.float64, device=device)
    sums = all_reduce_sum(torch.stack([loss_sum, aux_sum, seen_t]))
    count = max(sums[2].item(), 1.)
    metrics = OrderedDict(loss=sums[0].item() / count, aux_loss=sums[1].item() / count,
                          images_per_sec=round(sums[2].item() / max(elapsed, 1e-9), 1), seconds=round(elapsed, 1))
    metrics.update(usage_columns(usage.compute()))
    return metrics, num_updates


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        loss_fn: nn.Module,
        args,
        device: torch.device,
        num_classes: int,
        amp_autocast=nullcontext,
        desc: str = 'Eval',
) -> Dict[str, float]:
    """Loss, top-1, top-5 (percent), images/s and expert usage over every rank's shard of ``loader``."""
    model.eval()
    meter = ClassificationMeter(num_classes, device)
    usage = UsageMeter()
    progress = Progress(len(loader), desc, is_primary(args), use_progress_bar(args.progress), args.log_interval)
    for step, (input, target) in enumerate(loader):
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        loss = loss_fn(output.float(), target)
        meter.update(output, target, loss)
        usage.update(camex_vision.expert_usage(model), input.shape[0])
        progress.update(step)
    elapsed = progress.close()
    release_merge_scratch()  # the merge core's CPU inference buffers: not held through the next training epoch
    metrics = meter.compute()
    count = metrics.pop('count')
    metrics['images_per_sec'] = round(count / max(elapsed, 1e-9), 1)
    metrics.update(usage_columns(usage.compute()))
    return metrics


# ---- the run ----

def _atomic_update_summary(path: str, epoch: int, train_metrics, eval_metrics, lr: float) -> None:
    """timm's ``update_summary`` applied to a copy that then replaces ``summary.csv`` (never a torn row)."""
    tmp = f'{path}{ckpt.PARTIAL}{os.getpid()}'
    try:
        if os.path.exists(path):
            ckpt._copy_file(path, tmp)
        update_summary(epoch, train_metrics, eval_metrics, tmp, lr=lr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_trim_summary(path: str, start_epoch: int) -> None:
    if not os.path.exists(path):
        return
    tmp = f'{path}{ckpt.PARTIAL}{os.getpid()}'
    try:
        ckpt._copy_file(path, tmp)
        trim_summary(tmp, start_epoch)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_classes(args, train_classes, eval_classes) -> int:
    if args.num_classes is not None and args.num_classes != len(train_classes):
        raise InputError(f'--num-classes {args.num_classes} does not match the {len(train_classes)} classes of the '
                         f'training data')
    if eval_classes != train_classes:
        missing = sorted(set(train_classes) - set(eval_classes))[:5]
        extra = sorted(set(eval_classes) - set(train_classes))[:5]
        raise InputError(f'the {args.val_split!r} split has different classes than {args.train_split!r} '
                         f'(missing {missing}, extra {extra}); give both splits the same class folders or a '
                         f'--class-map')
    return len(train_classes)


def _check_checkpoint_classes(state_dict, model, num_classes: int, source: str) -> None:
    found = ckpt.classifier_outputs(state_dict, model)
    if found is not None and found != num_classes:
        raise InputError(f'class-count mismatch: {source} predicts {found} classes but the data has {num_classes}')


def _schedule_signature(args) -> Dict[str, Any]:
    return ckpt.plain({k: v for k, v in scheduler_kwargs(args).items()})


def run(args, resume_state: Optional[Dict[str, Any]], resume_path: str) -> int:
    """Everything after argument parsing; returns the exit status."""
    t_start = time.time()
    device = init_distributed(args)
    if not is_primary(args):
        logging.getLogger().setLevel(logging.WARNING)
    args.prefetcher = not args.no_prefetcher
    resolve_input_args(args)
    if resume_state is not None:
        if resume_state.get('arch') not in (None, args.model):
            raise InputError(f'{resume_path} is a checkpoint of {resume_state["arch"]!r}, not of {args.model!r}')
        args.pretrained, args.pretrained_path, args.initial_checkpoint = False, '', ''

    # ---- data: found (or downloaded) by the primary first, then opened by every rank; checked before writing
    def open_splits():
        train = build_dataset(args.dataset, args.data_dir, args.train_split, args.in_chans, args.dataset_download,
                              args.class_map, args.train_num_samples)
        val = build_dataset(args.dataset, args.data_dir, args.val_split, args.in_chans, args.dataset_download,
                            args.class_map, args.val_num_samples)
        return train, val

    def check_images():
        for ds in (dataset_train, dataset_eval):
            verify_images(ds, args.verify_images)

    if args.distributed:
        primary_decides(lambda: len(open_splits()), args)
    dataset_train, dataset_eval = open_splits()
    primary_decides(check_images, args)
    train_classes = class_names(dataset_train)
    if resume_state is not None and resume_state.get('num_classes', len(train_classes)) != len(train_classes):
        raise InputError(f'class-count mismatch: {resume_path} predicts {resume_state["num_classes"]} classes but the '
                         f'data has {len(train_classes)}')
    num_classes = _check_classes(args, train_classes, class_names(dataset_eval))
    args.num_classes = num_classes

    # ---- model
    random_seed(args.seed, args.rank)
    model_kwargs = dict(args.model_kwargs)
    if args.drop:
        model_kwargs.setdefault('drop_rate', args.drop)
    if args.drop_path is not None:
        model_kwargs.setdefault('drop_path_rate', args.drop_path)
    model, build_kwargs = create_model(args.model, num_classes, args.in_chans, args.img_size, args.pretrained,
                                       args.pretrained_path, model_kwargs, args.balance_coef)
    if args.initial_checkpoint:
        init = ckpt.load_checkpoint_file(args.initial_checkpoint)
        _check_checkpoint_classes(init['state_dict'], model, num_classes, args.initial_checkpoint)
        ckpt.load_model_weights(model, init['state_dict'], args.initial_checkpoint)
    if resume_state is not None:
        _check_checkpoint_classes(resume_state['state_dict'], model, num_classes, resume_path)
        ckpt.load_model_weights(model, resume_state['state_dict'], resume_path)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    num_params = count_params(model)
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    _logger.info(f'Model {args.model} created: {num_params / 1e6:.3f}M parameters, '
                 f'{"with" if has_moe(model) else "without"} MoE layers; input {data_config["input_size"]}.')

    # ---- output folder: decided (and refused) before anything is written
    output_dir = primary_decides(lambda: choose_output_dir(args, resume_path, data_config), args)
    resuming_here = bool(resume_path) and (
        os.path.realpath(os.path.dirname(os.path.abspath(resume_path))) == os.path.realpath(output_dir))

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    except (ValueError, AssertionError, TypeError) as e:
        raise InputError(f'cannot create optimizer --opt {args.opt!r}: {e}') from e
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)
    if args.distributed:
        ddp_kwargs = dict(forward_sync_buffers=False) if args.no_ddp_bb else {}
        model = NativeDDP(model, device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    # ---- loaders
    collate_fn, mixup_fn = None, None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    loader_common = dict(input_size=data_config['input_size'], use_prefetcher=args.prefetcher,
                         mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                         pin_memory=args.pin_mem, device=device, persistent_workers=False)
    loader_train = create_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation or data_config['interpolation'], distributed=args.distributed,
        collate_fn=collate_fn, worker_seeding=args.worker_seeding, **loader_common)
    if len(loader_train) == 0:
        raise InputError(f'{len(dataset_train)} training images per process make no full batch of '
                         f'{args.batch_size}; lower --batch-size')
    shard = dataset_eval.shard(args.rank, args.world_size) if args.distributed else dataset_eval
    loader_eval = create_loader(
        shard, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'), distributed=False, **loader_common)

    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn, eval_loss_fn = train_loss_fn.to(device), nn.CrossEntropyLoss().to(device)

    updates_per_epoch = len(loader_train)
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
            updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise InputError(f'unknown learning-rate schedule --sched {args.sched!r} ({e}); use cosine, step, '
                         f'multistep, plateau, constant, poly, tanh, wsd, rsqrt or none') from e

    # ---- resume: model weights are loaded above; here optimizer, scheduler, scaler, EMA, RNG and history
    start_epoch, num_updates = 0, 0
    if resume_state is not None:
        start_epoch = int(resume_state['epoch']) + 1
        num_updates = int(resume_state.get('num_updates', start_epoch * updates_per_epoch))
        if not args.no_resume_opt:
            optimizer.load_state_dict(resume_state['optimizer'])
            if loss_scaler is not None and 'amp_scaler' in resume_state:
                loss_scaler.load_state_dict(resume_state['amp_scaler'])
        if model_ema is not None and 'state_dict_ema' in resume_state:
            ckpt.load_model_weights(model_ema.module, resume_state['state_dict_ema'], resume_path + ' (EMA)')
        if lr_scheduler is not None:
            saved_args = argparse.Namespace(**{**vars(args), **resume_state.get('args', {})})
            if 'scheduler' in resume_state and _schedule_signature(saved_args) == _schedule_signature(args):
                lr_scheduler.load_state_dict(resume_state['scheduler'])
            else:
                _logger.info('Learning-rate schedule settings changed since the checkpoint: schedule recomputed.')
            lr_scheduler.step(start_epoch)
            if args.sched_on_updates:
                lr_scheduler.step_update(num_updates)
        rng = resume_state.get('rng')
        if isinstance(rng, list) and len(rng) == args.world_size:
            ckpt.set_rng_state(rng[args.rank])
        else:
            _logger.warning('Random state not restored (world size changed): reseeding.')
            random_seed(args.seed + start_epoch, args.rank)
        _logger.info(f'Resuming {resume_path} at epoch {start_epoch} (update {num_updates}).')
    elif lr_scheduler is not None:
        lr_scheduler.step(0)

    # ---- everything checked: create the run folder (primary only)
    args.output_dir = output_dir
    saver = None
    progress_state: Dict[str, Any] = {}  # what the checkpoint needs from the loop: update count, every rank's RNG
    summary_path = os.path.join(output_dir, 'summary.csv')
    decreasing = args.eval_metric == 'loss'
    if is_primary(args):
        os.makedirs(output_dir, exist_ok=True)
        ckpt.remove_partial_files(output_dir)
        ckpt.atomic_write_text(os.path.join(output_dir, 'args.yaml'),
                               yaml.safe_dump(_yaml_ready(args_dict(args)), default_flow_style=False))
        saver = ckpt.AtomicCheckpointSaver(lambda epoch: _checkpoint_state(
            args, model, model_ema, optimizer, lr_scheduler, loss_scaler, progress_state, num_classes, train_classes,
            data_config, build_kwargs), output_dir, decreasing=decreasing, max_history=args.checkpoint_hist)
        if resume_state is not None and resuming_here and 'saver' in resume_state:
            saver.load_state_dict(resume_state['saver'])
        if resuming_here:
            _atomic_trim_summary(summary_path, start_epoch)
    barrier()
    _logger.info(f'Training {num_epochs - start_epoch} epochs of {updates_per_epoch} updates '
                 f'({len(dataset_train)} images, {args.world_size} process(es)); output: {output_dir}')

    eval_metric = args.eval_metric
    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver is not None else (None, None)
    last_eval: Dict[str, float] = {}
    core = unwrap_model(model)
    try:
        for epoch in range(start_epoch, num_epochs):
            if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            train_metrics, num_updates = train_one_epoch(
                epoch, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler=lr_scheduler,
                amp_autocast=amp_autocast, loss_scaler=loss_scaler, model_ema=model_ema, mixup_fn=mixup_fn,
                num_updates=num_updates)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
            eval_metrics = evaluate(core, loader_eval, eval_loss_fn, args, device, num_classes, amp_autocast,
                                    desc=f'Eval {epoch}')
            if model_ema is not None and not args.model_ema_force_cpu:
                ema_metrics = evaluate(model_ema.module, loader_eval, eval_loss_fn, args, device, num_classes,
                                       amp_autocast, desc=f'Eval {epoch} (EMA)')
                eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if not k.startswith('usage/')})
            score = eval_metrics[f'ema_{eval_metric}' if f'ema_{eval_metric}' in eval_metrics else eval_metric]
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, score)
            lr = _mean_lr(optimizer)
            usage = {k: v for k, v in train_metrics.items() if k.startswith('usage/')}
            _logger.info(
                f'Epoch {epoch}: train loss {train_metrics["loss"]:.4f} (aux {train_metrics["aux_loss"]:.2e}), '
                f'{train_metrics["images_per_sec"]:.0f} img/s | eval loss {eval_metrics["loss"]:.4f}, '
                f'top-1 {eval_metrics["top1"]:.2f}%, top-5 {eval_metrics["top5"]:.2f}% | lr {lr:.2e}')
            if usage:
                _logger.info(f'  expert usage: {format_usage(_usage_tensors(usage))}')

            progress_state.update(num_updates=num_updates, rng=all_gather_objects(ckpt.rng_state()))
            if saver is not None:
                _atomic_update_summary(summary_path, epoch, train_metrics, eval_metrics, lr)
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=score)
                if args.plots:
                    _safe_plots(output_dir, args)
            last_eval = eval_metrics
            barrier()
    except KeyboardInterrupt:
        _logger.warning(f'Interrupted; continue with: python train_vision.py --resume {output_dir}')
        return 130

    if is_primary(args):
        exported = _export(args, output_dir, data_config, build_kwargs, num_classes, train_classes)
        _report(args, output_dir, num_params, time.time() - t_start, best_metric, best_epoch, last_eval,
                len(dataset_train), len(dataset_eval), exported, start_epoch, num_epochs)
    return 0


def _usage_tensors(columns: Dict[str, float]) -> Dict[str, torch.Tensor]:
    layers: Dict[str, Dict[int, float]] = OrderedDict()
    for key, value in columns.items():
        _, name, expert = key.split('/')
        layers.setdefault(name, {})[int(expert[1:])] = value
    return OrderedDict((n, torch.tensor([e[i] for i in sorted(e)])) for n, e in layers.items())


def _checkpoint_state(args, model, model_ema, optimizer, lr_scheduler, loss_scaler, progress_state, num_classes,
                      train_classes, data_config, build_kwargs) -> Dict[str, Any]:
    state = dict(
        arch=args.model,
        args=args_dict(args),
        model_kwargs=ckpt.plain(build_kwargs),
        num_classes=num_classes,
        in_chans=args.in_chans,
        class_names=list(train_classes),
        data_config=ckpt.plain(dict(data_config)),
        state_dict=get_state_dict(model, unwrap_model),
        optimizer=optimizer.state_dict(),
        num_updates=progress_state['num_updates'],
        rng=progress_state['rng'],
        world_size=args.world_size,
    )
    if lr_scheduler is not None:
        state['scheduler'] = ckpt.plain(lr_scheduler.state_dict())
    if model_ema is not None:
        state['state_dict_ema'] = get_state_dict(model_ema, unwrap_model)
    if loss_scaler is not None:
        state['amp_scaler'] = loss_scaler.state_dict()
    return state


def _safe_plots(output_dir: str, args) -> None:
    try:
        plot_run(output_dir, f'{args.model} on {args.dataset or args.data_dir}')
    except Exception as e:  # plotting is a convenience: a broken matplotlib must not stop training
        _logger.warning(f'Could not write plots: {e}')


def _export(args, output_dir, data_config, build_kwargs, num_classes, train_classes) -> str:
    """Writes the best checkpoint's weights (EMA ones when EMA was evaluated) as ``model_best.safetensors``."""
    best = os.path.join(output_dir, ckpt.BEST)
    if not args.export_safetensors or not os.path.isfile(best):
        return ''
    import json
    state = ckpt.load_checkpoint_file(best)
    use_ema = args.model_ema and not args.model_ema_force_cpu and 'state_dict_ema' in state
    weights = state['state_dict_ema'] if use_ema else state['state_dict']
    metadata = dict(
        format='pt', arch=args.model, num_classes=num_classes, in_chans=args.in_chans, epoch=state.get('epoch'),
        metric=state.get('metric'), ema=use_ema, model_kwargs=json.dumps(ckpt.plain(build_kwargs)),
        data_config=json.dumps(ckpt.plain(dict(data_config))), class_names=json.dumps(list(train_classes)))
    path = os.path.join(output_dir, 'model_best.safetensors')
    ckpt.save_safetensors(weights, path, metadata)
    return path


def _report(args, output_dir, num_params, seconds, best_metric, best_epoch, last_eval, n_train, n_eval, exported,
            start_epoch, num_epochs) -> None:
    minutes, secs = divmod(int(round(seconds)), 60)
    metric_name = {'top1': 'top-1', 'top5': 'top-5', 'loss': 'loss'}[args.eval_metric]
    lines = [
        '',
        '=' * 72,
        f'CAMEx training finished: {args.model} on {args.dataset or args.data_dir}',
        f'  parameters      {num_params / 1e6:.3f}M',
        f'  data            {n_train} training / {n_eval} evaluation images, {args.world_size} process(es)',
        f'  epochs          {start_epoch}..{num_epochs - 1} this run ({num_epochs} in total)',
    ]
    if last_eval:
        lines.append(f'  final top-1     {last_eval["top1"]:.2f}%   top-5 {last_eval["top5"]:.2f}%   '
                     f'eval loss {last_eval["loss"]:.4f}')
    if best_metric is not None:
        lines.append(f'  best {metric_name:<10s} {best_metric:.2f}{"%" if metric_name != "loss" else ""} '
                     f'(epoch {best_epoch})')
    lines += [
        f'  time            {minutes}m {secs:02d}s',
        f'  outputs         {output_dir}',
        '                  summary.csv, args.yaml, last.pth.tar, model_best.pth.tar'
        + (', model_best.safetensors' if exported else '')
        + (', learning_curves.png, expert_usage.png' if args.plots else ''),
        f'  evaluate with   python validate.py --checkpoint {output_dir}',
        '=' * 72,
    ]
    print('\n'.join(lines), flush=True)


def main(argv=None) -> int:
    """Runs the script; returns the exit status (0, 2 for bad input, 130 when interrupted)."""
    if not logging.root.handlers:
        setup_default_logging()
    try:
        args, resume_state, resume_path = parse_args(argv)
        return run(args, resume_state, resume_path)
    except InputError as e:
        _logger.error(describe(e))
        return EXIT_BAD_INPUT
    finally:
        cleanup()


if __name__ == '__main__':
    sys.exit(main())
