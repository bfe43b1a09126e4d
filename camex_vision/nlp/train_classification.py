"""Sequence classification with a CAMEx GPT-2 or T5 (in the style of transformers' ``run_glue.py``).

Data: CSV/TSV/JSON/JSON-lines files with ``text[,text_pair],label`` columns, or a GLUE task by name (read from the
Hub with the ``datasets`` package). Reported metrics follow GLUE per task (CoLA: Matthews correlation; MRPC, QQP:
accuracy and F1; STS-B: Pearson and Spearman; others: accuracy); other data gets accuracy, F1 and Matthews
correlation (or Pearson and Spearman with ``--regression``).

    python -m camex_vision.nlp.train_classification --train-file train.csv --validation-file dev.csv \\
        --model-type t5 --config-overrides d_model=128,d_ff=512,num_layers=2,num_heads=4 --output-dir output/cls
    torchrun --nproc_per_node=4 -m camex_vision.nlp.train_classification --task-name sst2 \\
        --model-name-or-path t5-base --output-dir output/sst2

Classification does not generate, so each sequence is routed as one unit by default (``--segment-length none``).
"""
import argparse
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig, GPT2Config, GPT2ForSequenceClassification, T5Config, T5ForSequenceClassification)

from ..core import release_merge_scratch
from .data import (
    GLUE_TASKS, LabelledTexts, encode_labels, encode_targets, encode_texts, label_set, load_glue, normalize_task,
    pad_batch, read_labelled_file)
from .metrics import classification_metrics, regression_metrics
from .training import (
    Distributed, add_model_args, add_training_args, apply_overrides, build_model, check_args, finish, fit,
    load_tokenizer, set_seed, setup_distributed, shard_batches)

_MODELS = {'gpt2': GPT2ForSequenceClassification, 't5': T5ForSequenceClassification}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    group = parser.add_argument_group('data')
    group.add_argument('--task-name', default=None,
                       help=f'GLUE task ({", ".join(GLUE_TASKS)}): read from the Hub unless --train-file is given, '
                            f'and selects the metrics')
    group.add_argument('--train-file', default=None, help='.csv, .tsv, .json or .jsonl with text and label fields')
    group.add_argument('--validation-file', default=None)
    group.add_argument('--validation-split-percentage', type=float, default=10.0,
                       help='share of the training rows held out when there is no validation file')
    group.add_argument('--text-column', default=None)
    group.add_argument('--text-pair-column', default=None)
    group.add_argument('--label-column', default='label')
    group.add_argument('--labels', default=None,
                       help='comma-separated label set in class-id order (default: the training labels, sorted)')
    group.add_argument('--regression', action='store_true', help='real-valued labels (implied by stsb)')
    group.add_argument('--max-length', type=int, default=128, help='tokens per example, truncated')
    add_model_args(parser, tuple(_MODELS), segment_length=None)
    add_training_args(parser)
    args = parser.parse_args(argv)
    check_args(args)
    args.task_name = normalize_task(args.task_name)
    if args.task_name is None and args.train_file is None:
        parser.error('pass --train-file or --task-name')
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f'--validation-split-percentage={args.validation_split_percentage} must be in (0, 100)')
    if args.task_name is not None and GLUE_TASKS[args.task_name][3]:
        args.regression = True
    return args


def _split(data: LabelledTexts, percentage: float, seed: int) -> Dict[str, LabelledTexts]:
    n = len(data.texts)
    held = max(1, round(n * percentage / 100))
    if held >= n:
        raise ValueError(f'{data.source} has {n} rows: too few to hold out a validation share; pass --validation-file')
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()

    def take(idx: List[int], name: str) -> LabelledTexts:
        return LabelledTexts([data.texts[i] for i in idx], [data.pairs[i] for i in idx] if data.pairs else None,
                             [data.labels[i] for i in idx], f'{data.source} ({name} split)')
    return {'train': take(order[held:], 'train'), 'validation': take(order[:held], 'validation')}


def _data(args: argparse.Namespace) -> Dict[str, Any]:
    names: List[Any] = []
    if args.train_file is None:
        train, validation, names = load_glue(args.task_name)
    else:
        columns = dict(text_column=args.text_column, pair_column=args.text_pair_column, label_column=args.label_column)
        if args.task_name is not None and args.text_column is None:
            text_column, pair_column, _, _ = GLUE_TASKS[args.task_name]
            columns.update(text_column=text_column, pair_column=args.text_pair_column or pair_column)
        train = read_labelled_file(args.train_file, **columns)
        if args.validation_file is not None:
            validation = read_labelled_file(args.validation_file, **columns)
        else:
            parts = _split(train, args.validation_split_percentage, args.seed)
            train, validation = parts['train'], parts['validation']
    if args.regression:
        return {'train': train, 'validation': validation, 'labels': None,
                'y_train': encode_targets(train), 'y_val': encode_targets(validation)}
    given = args.labels.split(',') if args.labels else ([str(i) for i in range(len(names))] if names else None)
    labels = label_set(train.labels, given)
    if len(labels) < 2:
        raise ValueError(f'{train.source}: classification needs at least 2 labels, found {labels}')
    return {'train': train, 'validation': validation, 'labels': labels,
            'y_train': encode_labels(train, labels), 'y_val': encode_labels(validation, labels)}


def _config(args: argparse.Namespace, tokenizer: Any, num_labels: int) -> Any:
    problem = 'regression' if args.regression else 'single_label_classification'
    if args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=num_labels, problem_type=problem)
    elif args.model_type == 'gpt2':
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(1024, args.max_length),
                            num_labels=num_labels, problem_type=problem)
    else:
        config = T5Config(vocab_size=len(tokenizer), num_labels=num_labels, problem_type=problem)
    for name in ('pad_token_id', 'eos_token_id', 'bos_token_id'):
        value = getattr(tokenizer, name, None)
        if value is not None and args.model_name_or_path is None:
            setattr(config, name, value)
    if getattr(config, 'model_type', '') == 't5':
        config.decoder_start_token_id = config.pad_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    apply_overrides(config, args.config_overrides)
    return config


def evaluate_classifier(model: nn.Module, ids: List[List[int]], targets: List[Any], batch_size: int, pad_id: int,
                        dist: Distributed, regression: bool, num_labels: int, task: str) -> Dict[str, float]:
    """Validation loss (without the balance loss) and the task's metrics, over all processes."""
    was_training = model.training
    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for idx in shard_batches(len(ids), batch_size, dist, shuffle=False, seed=0):
            batch = {k: v.to(dist.device) for k, v in pad_batch([ids[i] for i in idx], pad_id).items()}
            logits = model(**batch, use_cache=False).logits.float()
            y = torch.tensor([targets[i] for i in idx], device=dist.device)
            if regression:
                out = logits.squeeze(-1)
                loss_sum += float(F.mse_loss(out, y.float(), reduction='sum'))
                preds += out.tolist()
            else:
                loss_sum += float(F.cross_entropy(logits, y, reduction='sum'))
                preds += logits.argmax(-1).tolist()
            labels += y.tolist()
    model.train(was_training)
    release_merge_scratch()  # the merge core's CPU inference buffers: not held through training
    preds, labels = dist.gather(preds), dist.gather(labels)
    loss_sum = dist.sum([loss_sum])[0]
    metrics = regression_metrics(preds, labels) if regression else classification_metrics(
        preds, labels, num_labels, task or '')
    return {'val_loss': loss_sum / len(labels), **metrics}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Run training; returns the metric history (one row per evaluation)."""
    args = parse_args(argv)
    dist = setup_distributed(args.device)
    set_seed(args.seed)
    data = _data(args)
    tokenizer = load_tokenizer(args.tokenizer, args.model_name_or_path)
    if getattr(tokenizer, 'pad_token_id', None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2's tokenizer has no padding token
    num_labels = 1 if args.regression else len(data['labels'])
    config = _config(args, tokenizer, num_labels)
    model_cls = _MODELS[config.model_type] if config.model_type in _MODELS else _MODELS[args.model_type]
    train_ids = encode_texts(tokenizer, data['train'], args.max_length)
    val_ids = encode_texts(tokenizer, data['validation'], args.max_length)
    model = build_model(args, model_cls, config).to(dist.device)
    if dist.is_main:
        print(f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {len(train_ids)} training and '
              f'{len(val_ids)} validation examples; labels {data["labels"] or "regression"}', flush=True)
    pad_id = config.pad_token_id
    y_train = data['y_train']

    def train_batch(indices: List[int]) -> Dict[str, Any]:
        batch = pad_batch([train_ids[i] for i in indices], pad_id)
        labels = torch.tensor([y_train[i] for i in indices], dtype=torch.float if args.regression else torch.long)
        return {**{k: v.to(dist.device) for k, v in batch.items()}, 'labels': labels.to(dist.device),
                'use_cache': False}

    eval_batch_size = args.eval_batch_size or args.batch_size
    history = fit(args, model, dist, len(train_ids), train_batch,
                  lambda m: evaluate_classifier(m, val_ids, data['y_val'], eval_batch_size, pad_id, dist,
                                                args.regression, num_labels, args.task_name),
                  extra_state={'labels': data['labels'], 'num_train': len(train_ids)})
    finish(args, model, tokenizer, history, dist)
    return history


if __name__ == '__main__':
    main()
