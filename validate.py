#!/usr/bin/env python3
""" CAMEx validation script (timm-style)

Evaluates a model on one split of a dataset and reports top-1, top-5, loss, parameter count and images/s, printed as
one ``--result {json}`` line (and optionally written to ``--results-file``, csv or json).

Checkpoints written by ``train_vision.py`` describe themselves (model, model kwargs, classes, preprocessing, dataset),
so a run folder is enough:

    python validate.py --checkpoint output/train/<run>                    # model_best.pth.tar of the run
    python validate.py --checkpoint output/train/<run>/model_best.safetensors --results-file results.csv
    python validate.py --model camex_vit_small_patch16_224 --pretrained --data-dir /imagenet-r --dataset '' \\
        --img-size 224 --in-chans 3 --valid-labels imagenet_r_indices.txt   # a 200-class subset of 1000 logits

CAMEx models are evaluated reparameterised (curvature and masks folded, exact to float tolerance, faster) unless
``--no-reparameterize`` is given. Bad input (missing data, unknown model or dataset, class-count mismatch, corrupt
checkpoint, unreadable images) ends with a one-line message and exit status 2, and no file is written.
"""
import argparse
import csv
import io
import json
import logging
import os
import sys
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List

# OpenMP threads that sleep instead of spinning while they wait (see train_vision.py); set before torch loads OpenMP
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402
from torch import nn  # noqa: E402

from timm.data import create_loader, resolve_data_config  # noqa: E402
from timm.utils import ParseKwargs, setup_default_logging  # noqa: E402

import camex_vision  # noqa: E402
from camex_vision.train import checkpoint as ckpt  # noqa: E402
from camex_vision.train.data import (  # noqa: E402
    VERIFY_LEVELS, build_dataset, class_names, parse_dataset_name, verify_images)
from camex_vision.train.distributed import default_device  # noqa: E402
from camex_vision.train.errors import EXIT_BAD_INPUT, InputError, describe  # noqa: E402
from camex_vision.train.factory import count_params, create_model, has_moe, state_dict_num_classes  # noqa: E402
from camex_vision.train.metrics import ClassificationMeter  # noqa: E402
from camex_vision.train.progress import Progress, use_progress_bar  # noqa: E402

_logger = logging.getLogger('validate')

DEFAULT_DATASET = 'torch/fashion_mnist'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='CAMEx validation (timm-style); settings not given come from the checkpoint.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default=None, help='dataset root (default: the training run\'s)')
    group.add_argument('--dataset', '-d', metavar='NAME', default=None,
                       help=f"'' for image folders or torch/<name> (default: the training run's, else "
                            f"{DEFAULT_DATASET})")
    group.add_argument('--split', metavar='NAME', default='validation')
    group.add_argument('--dataset-download', action=argparse.BooleanOptionalAction, default=True,
                       help='download torch/ datasets that are not found offline')
    group.add_argument('--num-samples', type=int, default=None, metavar='N',
                       help='evaluate a fixed random subset of N images (the same as train_vision.py '
                            '--val-num-samples N)')
    group.add_argument('--class-map', default='', metavar='FILENAME',
                       help='class folder name to index mapping file (image folders)')
    group.add_argument('--valid-labels', default='', metavar='FILENAME',
                       help='one model output index per line, in dataset class order: evaluate only those logits '
                            '(ImageNet-A/R style label subsets)')
    group.add_argument('--verify-images', default='auto', choices=VERIFY_LEVELS)

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', '-m', default=None, metavar='NAME', help='timm model (default: the checkpoint\'s)')
    group.add_argument('--checkpoint', default='', metavar='PATH',
                       help='checkpoint file (.pth.tar, .pth, .safetensors) or training run folder')
    group.add_argument('--pretrained', action='store_true', default=False, help='use the model\'s pretrained weights')
    group.add_argument('--use-ema', action='store_true', default=False, help='use the checkpoint\'s EMA weights')
    group.add_argument('--num-classes', type=int, default=None, help='default: the checkpoint\'s, else the data\'s')
    group.add_argument('--img-size', default=None, type=int, metavar='N')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='model arguments k=v (merged over the checkpoint\'s)')
    group.add_argument('--reparameterize', action=argparse.BooleanOptionalAction, default=None,
                       help='fold CAMEx layers for inference (default: on for models with merged experts)')

    group = parser.add_argument_group('Runtime parameters')
    group.add_argument('-b', '--batch-size', default=256, type=int, metavar='N')
    group.add_argument('-j', '--workers', default=2, type=int, metavar='N')
    group.add_argument('--amp', action='store_true', default=False)
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    group.add_argument('--device', default=None, help='cuda or cpu (default: cuda if available)')
    group.add_argument('--no-prefetcher', action='store_true', default=False)
    group.add_argument('--channels-last', action='store_true', default=False)
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor')
    group.add_argument('--log-freq', default=50, type=int, metavar='N', help='batches between log lines')
    group.add_argument('--progress', default='auto', choices=('auto', 'bar', 'log'))
    group.add_argument('--results-file', default='', metavar='FILENAME', help='write results to a .csv or .json file')
    group.add_argument('--results-format', default='', choices=('', 'csv', 'json'),
                       help='default: from the --results-file extension')
    return parser


# ---- checkpoint description ----

def describe_checkpoint(state: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint says about itself: model, kwargs, classes, channels, preprocessing, dataset."""
    if 'metadata' in state:  # safetensors exported by train_vision.py
        meta = state['metadata']

        def get(key, parse=json.loads):
            return parse(meta[key]) if key in meta else None

        return dict(arch=meta.get('arch'), model_kwargs=get('model_kwargs') or {}, num_classes=get('num_classes', int),
                    in_chans=get('in_chans', int), data_config=get('data_config') or {},
                    class_names=get('class_names'), args={})
    return dict(arch=state.get('arch'), model_kwargs=dict(state.get('model_kwargs') or {}),
                num_classes=state.get('num_classes'), in_chans=state.get('in_chans'),
                data_config=dict(state.get('data_config') or {}), class_names=state.get('class_names'),
                args=dict(state.get('args') or {}))


def read_valid_labels(path: str) -> List[int]:
    if not os.path.isfile(path):
        raise InputError(f'--valid-labels file {path} does not exist')
    try:
        with open(path, encoding='utf-8') as f:
            labels = [int(line.strip()) for line in f if line.strip()]
    except ValueError as e:
        raise InputError(f'--valid-labels file {path} must hold one integer per line: {e}') from e
    if not labels:
        raise InputError(f'--valid-labels file {path} is empty')
    return labels


def _data_config(args, desc: Dict[str, Any], model: nn.Module, in_chans: int) -> Dict[str, Any]:
    """Command line over the checkpoint's preprocessing over the model's pretrained config."""
    saved = desc['data_config']
    if args.input_size:
        input_size = tuple(args.input_size)
    elif args.img_size:
        input_size = (in_chans, args.img_size, args.img_size)
    elif saved.get('input_size'):
        input_size = (in_chans, *saved['input_size'][1:])
    else:
        input_size = None
    cfg_args = dict(
        input_size=input_size, in_chans=in_chans, crop_pct=args.crop_pct or saved.get('crop_pct'),
        crop_mode=saved.get('crop_mode'), mean=args.mean or saved.get('mean'), std=args.std or saved.get('std'),
        interpolation=args.interpolation or saved.get('interpolation'))
    try:
        return resolve_data_config(cfg_args, model=model)
    except AssertionError as e:
        raise InputError(f'inconsistent preprocessing settings (--mean/--std need 1 or {in_chans} values): {e}') from e


# ---- results ----

def write_results(path: str, results: Dict[str, Any], fmt: str = '') -> None:
    """Writes ``results`` atomically: json replaces the file, csv appends a row (header when the file is new)."""
    fmt = fmt or ('json' if path.lower().endswith('.json') else 'csv')
    if fmt == 'json':
        ckpt.atomic_write_text(path, json.dumps(results, indent=4) + '\n')
        return
    rows: List[Dict[str, Any]] = []
    if os.path.isfile(path):
        with open(path, newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
    rows.append(results)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    ckpt.atomic_write_text(path, buf.getvalue())


# ---- the evaluation ----

def validate(args) -> Dict[str, Any]:
    """Evaluates as ``args`` says and returns the results (see the module docstring)."""
    device = torch.device(args.device or default_device())
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f'--device {args.device} requested but CUDA is not available; use --device cpu')
    if args.results_file and os.path.isdir(args.results_file):
        raise InputError(f'--results-file {args.results_file} is a folder')

    # ---- checkpoint (read before anything else: it names the model, dataset and classes)
    state, desc, ckpt_path = None, dict(arch=None, model_kwargs={}, num_classes=None, in_chans=None, data_config={},
                                        class_names=None, args={}), ''
    if args.checkpoint:
        ckpt_path = ckpt.resolve_checkpoint(args.checkpoint)
        state = ckpt.load_checkpoint_file(ckpt_path)
        desc = describe_checkpoint(state)
    model_name = args.model or desc['arch']
    if not model_name:
        raise InputError('--model is required (the checkpoint does not name its model)')
    if not args.checkpoint and not args.pretrained:
        _logger.warning('Neither --checkpoint nor --pretrained given: evaluating random weights.')
    saved_args = desc['args']
    dataset = args.dataset if args.dataset is not None else saved_args.get('dataset', DEFAULT_DATASET)
    data_dir = args.data_dir if args.data_dir is not None else saved_args.get('data_dir')
    _, torch_name = parse_dataset_name(dataset)

    in_chans = (args.input_size[0] if args.input_size else None) or args.in_chans or desc['in_chans']
    if in_chans is None:
        in_chans = 1 if torch_name in ('fashion_mnist', 'mnist', 'kmnist', 'qmnist') else 3
    class_map = args.class_map or (saved_args.get('class_map', '') if args.dataset is None else '')

    # ---- data
    ds = build_dataset(dataset, data_dir, args.split, in_chans, args.dataset_download, class_map, args.num_samples)
    verify_images(ds, args.verify_images)
    data_classes = class_names(ds)
    valid_labels = read_valid_labels(args.valid_labels) if args.valid_labels else None

    # ---- model: the checkpoint's head size, else --num-classes, else the data's (the model's own with --pretrained)
    num_classes = args.num_classes or desc['num_classes']
    if state is not None and num_classes is None:
        num_classes = state_dict_num_classes(model_name, state['state_dict'])
    if num_classes is None and not args.pretrained:
        num_classes = len(data_classes)
    model_kwargs = {**desc['model_kwargs'], **args.model_kwargs}
    img_size = args.img_size or (args.input_size[-1] if args.input_size else None)
    if img_size is not None:
        model_kwargs.pop('img_size', None)
    model, _ = create_model(model_name, num_classes, in_chans, img_size, args.pretrained, '', model_kwargs)
    if state is not None:
        weights = state['state_dict']
        if args.use_ema:
            if 'state_dict_ema' not in state:
                raise InputError(f'--use-ema: {ckpt_path} holds no EMA weights')
            weights = state['state_dict_ema']
        ckpt.load_model_weights(model, weights, ckpt_path)

    # ---- classes: the model's outputs, the data's classes and the label subset must agree
    num_classes = model.num_classes
    if valid_labels is not None:
        if len(valid_labels) != len(data_classes):
            raise InputError(f'--valid-labels lists {len(valid_labels)} labels but the data has '
                             f'{len(data_classes)} classes')
        bad = [label for label in valid_labels if not 0 <= label < num_classes]
        if bad:
            raise InputError(f'--valid-labels index {bad[0]} is out of range for {num_classes} classes')
    elif num_classes != len(data_classes):
        source = ckpt_path or f'model {model_name}'
        raise InputError(f'class-count mismatch: {source} predicts {num_classes} classes but the data has '
                         f'{len(data_classes)}; evaluate a label subset with --valid-labels')
    if desc['class_names'] and valid_labels is None and list(desc['class_names']) != data_classes:
        _logger.warning('The checkpoint was trained on classes named differently from the data\'s classes.')
    param_count = count_params(model)
    reparameterize = args.reparameterize if args.reparameterize is not None else has_moe(model)
    model.eval()
    if reparameterize:
        camex_vision.reparameterize(model)
    data_config = _data_config(args, desc, model, in_chans)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    prefetcher = not args.no_prefetcher
    loader = create_loader(
        ds, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        use_prefetcher=prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'), device=device, persistent_workers=False)
    amp_autocast = nullcontext
    if args.amp:
        amp_autocast = partial(torch.autocast, device_type=device.type,
                               dtype=torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16)
    index = torch.tensor(valid_labels, device=device) if valid_labels is not None else None
    meter = ClassificationMeter(len(valid_labels) if valid_labels is not None else num_classes, device)
    loss_fn = nn.CrossEntropyLoss().to(device)
    progress = Progress(len(loader), 'Validate', True, use_progress_bar(args.progress), args.log_freq)
    with torch.no_grad():
        for step, (input, target) in enumerate(loader):
            if not prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            output = output.float()
            if index is not None:
                output = output.index_select(1, index)
            meter.update(output, target, loss_fn(output, target))
            progress.update(step)
    elapsed = progress.close()
    metrics = meter.compute()

    return OrderedDict(
        model=model_name,
        checkpoint=ckpt_path,
        dataset=dataset,
        split=args.split,
        top1=round(metrics['top1'], 4),
        top5=round(metrics['top5'], 4),
        loss=round(metrics['loss'], 6),
        param_count=round(param_count / 1e6, 4),
        images=metrics['count'],
        images_per_sec=round(metrics['count'] / max(elapsed, 1e-9), 1),
        img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
        reparameterized=bool(reparameterize),
        ema=bool(args.use_ema),
        device=str(device),
    )


def main(argv=None) -> int:
    """Runs the script; returns the exit status (0, or 2 for bad input)."""
    if not logging.root.handlers:
        setup_default_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = validate(args)
    except InputError as e:
        _logger.error(describe(e))
        return EXIT_BAD_INPUT
    _logger.info(f'{results["model"]}: top-1 {results["top1"]:.2f}%, top-5 {results["top5"]:.2f}%, '
                 f'loss {results["loss"]:.4f}, {results["param_count"]:.3f}M parameters, '
                 f'{results["images_per_sec"]:.0f} images/s')
    if args.results_file:
        write_results(args.results_file, results, args.results_format)
    print(f'--result {json.dumps(results)}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
