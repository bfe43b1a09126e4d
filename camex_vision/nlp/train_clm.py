"""Causal language modelling with a CAMEx GPT-2 (in the style of transformers' ``run_clm.py``); reports perplexity.

Fine-tune a pretrained GPT-2 upcycled to CAMEx, or train a fresh one, on a text file or a Hub corpus:

    python -m camex_vision.nlp.train_clm --train-file book.txt --tokenizer byte \\
        --config-overrides n_embd=128,n_layer=4,n_head=4 --block-size 128 --output-dir output/clm
    torchrun --nproc_per_node=8 -m camex_vision.nlp.train_clm --model-name-or-path gpt2 \\
        --dataset-name wikitext-2 --output-dir output/wt2

Without ``--validation-file`` (or a Hub validation split) the last ``--validation-split-percentage`` of the text is
held out. Metrics per epoch (``val_loss``, ``perplexity``) go to ``OUTPUT_DIR/metrics.csv``.
"""
import argparse
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from ..core import release_merge_scratch
from .data import load_hub_text, read_text_file, token_blocks, tokenize_text
from .training import (
    Distributed, add_model_args, add_training_args, apply_overrides, build_model, check_args, finish, fit,
    load_tokenizer, set_seed, setup_distributed, shard_batches)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    group = parser.add_argument_group('data')
    group.add_argument('--train-file', default=None, help='UTF-8 text file')
    group.add_argument('--validation-file', default=None, help='UTF-8 text file')
    group.add_argument('--dataset-name', default=None,
                       help='Hub text dataset (needs the datasets package), e.g. wikitext-2, wikitext-103')
    group.add_argument('--dataset-config', default=None, help='Hub dataset configuration')
    group.add_argument('--validation-split-percentage', type=float, default=5.0,
                       help='share of the text held out when there is no validation text')
    group.add_argument('--block-size', type=int, default=None,
                       help='tokens per training sequence; default min(1024, the model\'s n_positions)')
    group.add_argument('--sample-prompt', default=None, help='after training, greedily continue this prompt')
    group.add_argument('--sample-tokens', type=int, default=100)
    add_model_args(parser, ('gpt2',))
    add_training_args(parser)
    args = parser.parse_args(argv)
    check_args(args)
    if (args.train_file is None) == (args.dataset_name is None):
        parser.error('pass exactly one of --train-file and --dataset-name')
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f'--validation-split-percentage={args.validation_split_percentage} must be in (0, 100)')
    return args


def _config(args: argparse.Namespace, tokenizer: Any) -> Any:
    if args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    apply_overrides(config, args.config_overrides)
    return config


def _texts(args: argparse.Namespace) -> Dict[str, str]:
    if args.dataset_name is not None:
        splits = load_hub_text(args.dataset_name, args.dataset_config)
        out = {'train': splits['train']}
        validation = splits.get('validation', splits.get('valid'))
        if validation is not None:
            out['validation'] = validation
        return out
    out = {'train': read_text_file(args.train_file)}
    if args.validation_file is not None:
        out['validation'] = read_text_file(args.validation_file)
    return out


def _blocks(args: argparse.Namespace, tokenizer: Any, block_size: int) -> Dict[str, torch.Tensor]:
    texts = _texts(args)
    source = args.train_file or args.dataset_name
    train = token_blocks(tokenize_text(tokenizer, texts['train']), block_size, f'training text {source}')
    if 'validation' in texts:
        validation = token_blocks(tokenize_text(tokenizer, texts['validation']), block_size, 'validation text')
        return {'train': train, 'validation': validation}
    held = max(1, round(len(train) * args.validation_split_percentage / 100))
    if held >= len(train):
        raise ValueError(f'training text {source} gives {len(train)} blocks of {block_size} tokens: too few to hold '
                         f'out a validation share; use more text, a smaller --block-size or --validation-file')
    return {'train': train[:-held], 'validation': train[-held:]}


def evaluate_lm(model: nn.Module, blocks: torch.Tensor, batch_size: int, dist: Distributed) -> Dict[str, float]:
    """Validation loss (mean token cross-entropy, without the balance loss) and perplexity, over all processes."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for idx in shard_batches(len(blocks), batch_size, dist, shuffle=False, seed=0):
            x = blocks[idx].to(dist.device)
            logits = model(input_ids=x, use_cache=False).logits
            loss_sum += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                              reduction='sum'))
            tokens += x[:, 1:].numel()
    model.train(was_training)
    release_merge_scratch()  # the merge core's CPU inference buffers: not held through training
    loss_sum, tokens = dist.sum([loss_sum, tokens])
    loss = loss_sum / tokens
    return {'val_loss': loss, 'perplexity': math.exp(min(loss, 50.0))}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Run training; returns the metric history (one row per evaluation)."""
    args = parse_args(argv)
    dist = setup_distributed(args.device)
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer, args.model_name_or_path)
    config = _config(args, tokenizer)
    block_size = args.block_size or min(1024, config.n_positions)
    if not 2 <= block_size <= config.n_positions:
        raise ValueError(f'--block-size={block_size} must be in 2..{config.n_positions} (the model\'s n_positions)')
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}')
    blocks = _blocks(args, tokenizer, block_size)
    model = build_model(args, GPT2LMHeadModel, config).to(dist.device)
    if dist.is_main:
        print(f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {len(blocks["train"])} training '
              f'and {len(blocks["validation"])} validation blocks of {block_size} tokens', flush=True)
    train = blocks['train']

    def train_batch(indices: List[int]) -> Dict[str, Any]:
        x = train[indices].to(dist.device)
        return {'input_ids': x, 'labels': x, 'use_cache': False}

    eval_batch_size = args.eval_batch_size or args.batch_size
    history = fit(args, model, dist, len(train), train_batch,
                  lambda m: evaluate_lm(m, blocks['validation'], eval_batch_size, dist),
                  extra_state={'block_size': block_size, 'num_train': len(train)})
    if args.sample_prompt and dist.is_main:
        model.eval()
        prompt = tokenizer(args.sample_prompt, add_special_tokens=False, return_tensors='pt')['input_ids']
        with torch.no_grad():
            out = model.generate(prompt.to(dist.device), max_new_tokens=args.sample_tokens, do_sample=False,
                                 pad_token_id=config.pad_token_id if config.pad_token_id is not None
                                 else config.eos_token_id)
        sample = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
        print(f'sample: {sample!r}', flush=True)
        history[-1]['sample'] = sample
    finish(args, model, tokenizer, history, dist)
    return history


if __name__ == '__main__':
    main()
