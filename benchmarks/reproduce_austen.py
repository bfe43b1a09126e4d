"""Austen language study: every row of the paper's tables on two small language tasks, trained from scratch on a CPU.

The paper's tables (method section 11) compare Vanilla, SMoE and the six merging variants plus Dynamic merging. This
script runs the same rows on Jane Austen's six novels (``--data-dir``, one UTF-8 text file per novel) with a small
GPT-2-shaped transformer (transformers' GPT-2 classes) converted by ``camex_vision.nlp.camexify``:

* ``clm``: byte-level causal language modelling (the built-in ``ByteTokenizer``'s byte ids); validation loss in nats
  per byte, perplexity per byte and bits per byte. Causal segment routing (segment ``k`` is merged from the router on
  the mean of segment ``k-1``, the first segment from a learned prior: strictly causal).
* ``cls``: 6-way "which novel is this passage from" on 50-word passages (``GPT2ForSequenceClassification``, logits
  of the last real token); accuracy. One routing unit per sequence (mean over its non-padding tokens). Word-level
  tokens (a 50-word passage is about 60 tokens instead of about 280 bytes, which is what makes this task trainable at a
  shared-CPU budget): words and punctuation marks (regex ``\w+|[^\w\s]``, case kept), a vocabulary of the
  ``--cls-vocab`` most frequent training tokens (ties broken alphabetically) plus ``<pad>``, ``<unk>``, ``<eos>``.

Rows (``num_experts=8``: one base and seven domain experts, as in the paper):

=====================  ===========================================================================================
Vanilla                the dense GPT-2 of the same dimensions
SMoE                   every ``GPT2MLP`` swapped for ``camex_vision.core.SMoEMlp``: token-choice top-2 of 8 FFNs
Domain-specific        ``camexify(merge='euclidean', mask=None)``
Ties / Dare            ``camexify(merge='euclidean', mask='ties' / 'dare')``
Domain-specific-CA     ``camexify(merge='camex', mask=None)``
Ties-CA / Dare-CA      ``camexify(merge='camex', mask='ties' / 'dare')``
Dynamic                ``camexify(merge='camex', mask=None, dynamic=True)``
=====================  ===========================================================================================

From scratch, so every MoE row draws its experts independently at the dense layer's scale
(``init_experts_independently``; SMoE experts likewise). ``balance_coef`` is 0 for every row (the paper uses no
balance loss; the same setting as the Fashion-MNIST study), router noise on, Kronecker rank 1, alpha 1.

Fixed splits (the same for every run): each novel's text is cut by position; its first 90% is training text, its
last 10% validation text, so no training byte or passage overlaps a validation one.

* ``clm``: each part is encoded as raw UTF-8 bytes (no special tokens) and cut into non-overlapping blocks of
  ``--clm-context`` bytes; the training blocks of all novels are pooled, and ``--clm-val-blocks`` validation blocks are
  taken evenly spaced over all validation blocks (novel order as in the file names, sorted). The loss of a block
  counts its last ``context - 1`` bytes (the first has no left context).
* ``cls``: each part is split on whitespace and cut into consecutive non-overlapping 50-word passages (re-joined with
  single spaces); a passage is ``tokens + <eos>``, truncated to ``--cls-max-length`` tokens. The label is the novel.
  Every validation passage is evaluated.

The SHA-256 of the split definitions (block offsets, passages) is recorded in the metadata JSON next to each CSV.

Training (paper Table 8, at a CPU budget): AdamW, betas (0.9, 0.98), eps 1e-6, weight decay 0.01 (not on vectors and
curvature factors: ``camex_vision.nlp.training.param_groups``), linear warm-up then linear decay to zero, gradient
clipping at 1.0, the same number of steps and batch size for every row of a task. The loss is the task's
cross-entropy plus ``camex_vision.aux_loss(model)`` (zero here). The default budget (model width 64, 120 LM steps of 8
blocks, 160 classification steps of 8 passages) is what the whole 54-run grid can afford in about half an hour at
``nice -n 10`` on a 2-core CPU shared with other jobs: early training, not convergence. The seed sets the
initialisation, the data order (identical for every row of one seed), router noise and DARE drops. Evaluation runs the
trained (unfolded) model in eval mode (no router noise, no DARE).

Runs execute in ``--workers`` processes of ``--threads`` torch threads each. Each finished run appends one row to its
task's CSV; a rerun skips the runs already there (same task, method, seed and configuration hash), so the study is
resumable. ``--report-only`` rebuilds the Markdown tables and the plots from the CSVs.

Usage:
    python benchmarks/reproduce_austen.py --quick                  # smoke run, separate CSVs, no plots
    nice -n 10 python benchmarks/reproduce_austen.py               # the full grid (resumable)
    python benchmarks/reproduce_austen.py --report-only            # tables (stdout, *_summary.md) and plots
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    IMG_DIR, REPO, RESULTS_DIR, append_row, count_flops, ensure_dir, machine_info, mean_std, method_color, num_params,
    read_rows, save_figure)

import transformers  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import camex_vision  # noqa: E402
from camex_vision.core import SMoEMlp  # noqa: E402
from camex_vision.nlp import ByteTokenizer, camexify, init_experts_independently  # noqa: E402
from camex_vision.nlp.training import linear_schedule, param_groups  # noqa: E402

DEFAULT_DATA_DIR = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'austen'))
TASKS = ('clm', 'cls')
NUM_EXPERTS = 8
PASSAGE_WORDS = 50
WORD_RE = re.compile(r'\w+|[^\w\s]')
WORD_SPECIALS = ('<pad>', '<unk>', '<eos>')  # ids 0, 1, 2 of the word vocabulary
VAL_FRACTION = 0.1
METHODS: Dict[str, Optional[Dict[str, Any]]] = {  # row of the paper's tables -> MoE options (None: the dense model)
    'Vanilla': None,
    'SMoE': dict(merge='smoe'),
    'Domain-specific': dict(merge='euclidean', mask=None),
    'Ties': dict(merge='euclidean', mask='ties'),
    'Dare': dict(merge='euclidean', mask='dare'),
    'Domain-specific-CA': dict(merge='camex', mask=None),
    'Ties-CA': dict(merge='camex', mask='ties'),
    'Dare-CA': dict(merge='camex', mask='dare'),
    'Dynamic': dict(merge='camex', mask=None, dynamic=True),
}
CSV_FIELDS = {
    'clm': ['task', 'method', 'seed', 'val_loss', 'perplexity', 'bpb', 'train_loss', 'params', 'mflops_per_token',
            'steps', 'batch', 'tokens_seen', 'wall_s', 'train_s', 'eval_s', 'cpu_s', 'threads', 'config',
            'finished'],
    'cls': ['task', 'method', 'seed', 'accuracy', 'val_loss', 'train_loss', 'params', 'mflops_per_seq', 'steps',
            'batch', 'tokens_seen', 'wall_s', 'train_s', 'eval_s', 'cpu_s', 'threads', 'config', 'finished'],
}
METRICS = {  # task -> (CSV column, label, lower is better, format)
    'clm': [('bpb', 'bits per byte', True, '{:.4f}'), ('perplexity', 'perplexity per byte', True, '{:.4f}')],
    'cls': [('accuracy', 'accuracy %', False, '{:.2f}')],
}


# ---- data ----

def novel_files(data_dir: str) -> List[str]:
    """The ``*.txt`` files of ``data_dir``, sorted (the label order of the classification task)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f'Austen data directory {data_dir} does not exist; pass --data-dir with the six novels as UTF-8 .txt files '
            f'(one per novel)')
    files = sorted(f for f in os.listdir(data_dir) if f.endswith('.txt'))
    if len(files) < 2:
        raise FileNotFoundError(f'{data_dir} holds {len(files)} .txt files; the study needs the six novels')
    return files


def split_novels(data_dir: str) -> Dict[str, Dict[str, str]]:
    """``{novel: {'train': first 90% of its characters, 'validation': last 10%}}``."""
    out = {}
    for name in novel_files(data_dir):
        with open(os.path.join(data_dir, name), encoding='utf-8') as f:
            text = f.read()
        cut = int(len(text) * (1 - VAL_FRACTION))
        out[os.path.splitext(name)[0]] = {'train': text[:cut], 'validation': text[cut:]}
    return out


def byte_blocks(text: str, context: int) -> torch.Tensor:
    """Non-overlapping ``[n, context]`` blocks of the UTF-8 bytes of ``text`` (the short tail dropped)."""
    data = torch.frombuffer(bytearray(text.encode('utf-8')), dtype=torch.uint8).long()
    n = data.numel() // context
    return data[:n * context].reshape(n, context)


def passages(text: str, words: int = PASSAGE_WORDS) -> List[str]:
    """Consecutive non-overlapping passages of ``words`` whitespace-separated words (the incomplete tail dropped)."""
    w = text.split()
    return [' '.join(w[i:i + words]) for i in range(0, len(w) - words + 1, words)]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(task: str, data_dir: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The fixed training and validation sets of ``task`` as tensors / token lists, with a digest of the split."""
    novels = split_novels(data_dir)
    if task == 'clm':
        ctx = cfg['clm']['context']
        train = torch.cat([byte_blocks(parts['train'], ctx) for parts in novels.values()])
        val_all = torch.cat([byte_blocks(parts['validation'], ctx) for parts in novels.values()])
        n_val = min(cfg['clm']['val_blocks'], len(val_all))
        idx = torch.linspace(0, len(val_all) - 1, n_val).round().long()
        val = val_all[idx]
        split = digest([hashlib.sha256(train.numpy().tobytes()).hexdigest(),
                        hashlib.sha256(val.numpy().tobytes()).hexdigest()])
        return {'train': train, 'validation': val, 'novels': list(novels), 'split_sha256': split,
                'sizes': {'train_blocks': len(train), 'validation_blocks': len(val),
                          'validation_blocks_available': len(val_all)}}
    max_len = cfg['cls']['max_length']
    out: Dict[str, Any] = {'novels': list(novels)}
    items = {split: [(WORD_RE.findall(p), label) for label, parts in enumerate(novels.values())
                     for p in passages(parts[split])] for split in ('train', 'validation')}
    counts = Counter(t for words, _ in items['train'] for t in words)
    vocab = sorted(counts, key=lambda t: (-counts[t], t))[:cfg['cls']['vocab']]
    index = {t: i for i, t in enumerate(WORD_SPECIALS + tuple(vocab))}
    unk, eos = index['<unk>'], index['<eos>']
    for split, pairs in items.items():
        out[split] = [([index.get(t, unk) for t in words] + [eos])[:max_len] for words, _ in pairs]
        out[f'{split}_labels'] = torch.tensor([label for _, label in pairs])
    out['vocab_size'] = len(index)
    out['split_sha256'] = digest([[' '.join(w) for w, _ in items[s]] for s in ('train', 'validation')] + [vocab])
    label_counts = torch.bincount(out['validation_labels'], minlength=len(novels))
    seqs = out['train'] + out['validation']
    val_tokens = [t for s in out['validation'] for t in s]
    out['sizes'] = {'train_passages': len(out['train']), 'validation_passages': len(out['validation']),
                    'validation_majority_pct': round(100.0 * float(label_counts.max()) / len(out['validation']), 2),
                    'vocabulary': len(index),
                    'validation_unk_pct': round(100.0 * val_tokens.count(unk) / len(val_tokens), 2),
                    'truncated_pct': round(100.0 * sum(len(x) == max_len for x in seqs) / len(seqs), 2)}
    return out


def pad(seqs: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


# ---- models ----

def gpt2_config(task: str, cfg: Dict[str, Any], data: Dict[str, Any]) -> GPT2Config:
    m = cfg['model']
    shape = dict(n_embd=m['n_embd'], n_layer=m['n_layer'], n_head=m['n_head'], n_inner=m['n_inner'])
    if task == 'clm':
        tok = ByteTokenizer()
        return GPT2Config(vocab_size=len(tok), n_positions=cfg['clm']['context'], bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    return GPT2Config(vocab_size=data['vocab_size'], n_positions=cfg['cls']['max_length'], bos_token_id=2,
                      eos_token_id=2, pad_token_id=0, num_labels=len(data['novels']), **shape)


def linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    """GPT-2's ``Conv1D`` (weight stored ``[in, out]``) as the same map in an ``nn.Linear``."""
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def smoefy(model: nn.Module, num_experts: int, generator: torch.Generator, top_k: int = 2) -> nn.Module:
    """Swap every ``GPT2MLP`` for a token-choice ``SMoEMlp`` (top-k of ``num_experts`` FFNs), in place.

    GPT-2's ``Conv1D`` weights are converted to linears, every expert is then redrawn independently at the dense
    layer's scale (``N(0, std(W)^2)``, as ``init_experts_independently`` does for merging experts); biases keep the
    dense values. ``SMoEMlp`` is called as GPT-2 calls its MLP (``mlp(hidden_states)``).
    """
    for block in model.transformer.h:
        dense = block.mlp
        if not isinstance(dense, GPT2MLP):
            raise TypeError(f'expected a GPT2MLP, got {type(dense).__name__}')
        moe = SMoEMlp.from_dense((linear_from_conv1d(dense.c_fc), linear_from_conv1d(dense.c_proj)),
                                 act_layer=functools.partial(copy.deepcopy, dense.act), drop=(0., dense.dropout.p),
                                 num_experts=num_experts, top_k=top_k, router_noise=True, balance_coef=0.0)
        with torch.no_grad():
            for w in (moe.fc1_weight, moe.fc2_weight):
                w.copy_(torch.randn(w.shape, generator=generator) * float(w[0].std()))
        moe.train(dense.training)
        block.mlp = moe
    return model


def create(task: str, method: str, cfg: Dict[str, Any], data: Dict[str, Any], seed: int) -> nn.Module:
    """The model of one row, initialised from ``seed`` (the dense parts are identical for every row of a seed)."""
    torch.manual_seed(seed)
    config = gpt2_config(task, cfg, data)
    model = GPT2LMHeadModel(config) if task == 'clm' else GPT2ForSequenceClassification(config)
    moe = METHODS[method]
    gen = torch.Generator().manual_seed(10_000 + seed)
    if moe is None:
        return model
    if moe['merge'] == 'smoe':
        return smoefy(model, NUM_EXPERTS, gen)
    segment = cfg['clm']['segment_length'] if task == 'clm' else None
    camexify(model, num_experts=NUM_EXPERTS, merge=moe['merge'], mask=moe['mask'], dynamic=moe.get('dynamic', False),
             kron_rank=1, alpha=1.0, segment_length=segment, first_segment='prior', router_per='ffn',
             router_noise=True, balance_coef=0.0)
    return init_experts_independently(model, gen)


# ---- one run ----

def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def cls_logits(model: nn.Module, seqs: List[List[int]]) -> torch.Tensor:
    ids, mask = pad(seqs, WORD_SPECIALS.index('<pad>'))
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def train(task: str, model: nn.Module, data: Dict[str, Any], tcfg: Dict[str, Any], seed: int) -> float:
    """``tcfg['steps']`` AdamW steps on shuffled batches; returns the mean task loss of the last 10 steps."""
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=tcfg['lr'], betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(tcfg['warmup'], tcfg['steps']))
    gen = torch.Generator().manual_seed(1000 + seed)
    n, batch = len(data['train']), tcfg['batch']
    per_epoch = n // batch
    order = torch.empty(0, dtype=torch.long)
    losses: List[float] = []
    model.train()
    for step in range(tcfg['steps']):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        if task == 'clm':
            loss = lm_loss(model, data['train'][idx])
        else:
            loss = F.cross_entropy(cls_logits(model, [data['train'][i] for i in idx.tolist()]),
                                   data['train_labels'][idx])
        losses.append(loss.item())
        loss = loss + camex_vision.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return sum(losses[-10:]) / len(losses[-10:])


@torch.inference_mode()
def evaluate(task: str, model: nn.Module, data: Dict[str, Any], batch: int) -> Dict[str, float]:
    model.eval()
    val = data['validation']
    if task == 'clm':
        loss_sum, count = 0.0, 0
        for i in range(0, len(val), batch):
            x = val[i:i + batch]
            logits = model(input_ids=x, use_cache=False).logits
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction='sum').item()
            count += x[:, 1:].numel()
        loss = loss_sum / count
        return {'val_loss': loss, 'perplexity': math.exp(loss), 'bpb': loss / math.log(2)}
    labels = data['validation_labels']
    loss_sum, correct = 0.0, 0
    for i in range(0, len(val), batch):
        logits = cls_logits(model, val[i:i + batch])
        y = labels[i:i + batch]
        loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
        correct += int((logits.argmax(-1) == y).sum())
    return {'val_loss': loss_sum / len(val), 'accuracy': 100.0 * correct / len(val)}


@torch.inference_mode()
def flops_per_unit(task: str, model: nn.Module, data: Dict[str, Any], batch: int) -> float:
    """Forward FLOPs (``FlopCounterMode``, eval mode) per byte token (``clm``) or per passage (``cls``) on one
    validation batch; merging cost is amortised over that batch's routing units."""
    model.eval()
    if task == 'clm':
        x = data['validation'][:batch]
        return count_flops(lambda: model(input_ids=x, use_cache=False)) / x.numel()
    seqs = data['validation'][:batch]
    return count_flops(lambda: cls_logits(model, seqs)) / len(seqs)


_DATA: Dict[str, Dict[str, Any]] = {}


def _init_worker(data_dir: str, cfg: Dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    for task in cfg['tasks']:
        _DATA[task] = prepare_data(task, data_dir, cfg)


def run_job(job: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Train and evaluate one (task, method, seed); returns its CSV row."""
    t0, c0 = time.perf_counter(), time.process_time()
    task, method, seed = job['task'], job['method'], job['seed']
    data, tcfg = _DATA[task], cfg[task]
    model = create(task, method, cfg, data, seed)
    params = num_params(model)
    flops = flops_per_unit(task, model, data, tcfg['eval_batch'])
    t_train = time.perf_counter()
    train_loss = train(task, model, data, tcfg, seed)
    t_train = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    metrics = evaluate(task, model, data, tcfg['eval_batch'])
    t_eval = time.perf_counter() - t_eval
    row: Dict[str, Any] = dict(task=task, method=method, seed=seed, train_loss=f'{train_loss:.4f}', params=params,
                               steps=tcfg['steps'], batch=tcfg['batch'])
    if task == 'clm':
        row.update(val_loss=f'{metrics["val_loss"]:.5f}', perplexity=f'{metrics["perplexity"]:.4f}',
                   bpb=f'{metrics["bpb"]:.4f}', mflops_per_token=f'{flops / 1e6:.3f}',
                   tokens_seen=tcfg['steps'] * tcfg['batch'] * cfg['clm']['context'])
    else:
        row.update(accuracy=f'{metrics["accuracy"]:.2f}', val_loss=f'{metrics["val_loss"]:.4f}',
                   mflops_per_seq=f'{flops / 1e6:.2f}', tokens_seen='')
    row.update(wall_s=f'{time.perf_counter() - t0:.1f}', train_s=f'{t_train:.1f}', eval_s=f'{t_eval:.1f}',
               cpu_s=f'{time.process_time() - c0:.1f}', threads=torch.get_num_threads(), config=cfg['hash'][task],
               finished=time.strftime('%Y-%m-%d %H:%M:%S'))
    return row


# ---- the grid ----

def study_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything that defines a run's result; its per-task hash tags the CSV rows (other configs are not reused)."""
    cfg: Dict[str, Any] = dict(
        tasks=list(args.tasks), num_experts=NUM_EXPERTS, val_fraction=VAL_FRACTION,
        model=dict(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, n_inner=4 * args.n_embd),
        clm=dict(context=args.clm_context, segment_length=args.segment_length, val_blocks=args.clm_val_blocks,
                 steps=args.clm_steps, batch=args.clm_batch, lr=args.lr, warmup=args.warmup, eval_batch=64),
        cls=dict(words=PASSAGE_WORDS, vocab=args.cls_vocab, max_length=args.cls_max_length, steps=args.cls_steps,
                 batch=args.cls_batch, lr=args.lr, warmup=args.warmup, eval_batch=64))
    shared = {k: cfg[k] for k in ('num_experts', 'val_fraction', 'model')}
    cfg['hash'] = {task: digest([shared, cfg[task]])[:10] for task in TASKS}
    return cfg


def csv_path(args: argparse.Namespace, task: str) -> str:
    return os.path.join(args.results_dir, f'austen_{task}{"_quick" if args.quick else ""}.csv')


def run_grid(args: argparse.Namespace, cfg: Dict[str, Any]) -> None:
    done = {(r['task'], r['method'], int(r['seed']), r['config'])
            for task in args.tasks for r in read_rows(csv_path(args, task))}
    # seed-major order: if the grid is stopped early, the finished seeds are complete for every row
    jobs = [dict(task=t, method=m, seed=s) for s in args.seeds for t in args.tasks for m in args.methods]
    todo = [j for j in jobs if (j['task'], j['method'], j['seed'], cfg['hash'][j['task']]) not in done]
    print(f'{len(jobs)} runs in the study, {len(todo)} to do ({args.workers} workers x {args.threads} threads); '
          f'results -> {", ".join(csv_path(args, t) for t in args.tasks)}', flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context('spawn'), initializer=_init_worker,
                             initargs=(args.data_dir, cfg, args.threads)) as pool:
        pending: Dict[Future, Dict[str, Any]] = {pool.submit(run_job, j, cfg): j for j in todo}
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                pending.pop(fut)
                row = fut.result()
                append_row(csv_path(args, row['task']), row, CSV_FIELDS[row['task']])
                metric = f'bpb {row["bpb"]}' if row['task'] == 'clm' else f'accuracy {row["accuracy"]}%'
                print(f'  [{time.perf_counter() - start:6.0f} s] {row["task"]} {row["method"]:18s} seed {row["seed"]}: '
                     f'{metric} ({row["wall_s"]} s wall, {row["cpu_s"]} s cpu)', flush=True)
    print(f'grid done in {time.perf_counter() - start:.0f} s', flush=True)


# ---- report ----

def summarise(rows: List[Dict[str, str]], task: str, cfg_hash: str) -> Dict[str, Dict[str, Any]]:
    groups: Dict[str, List[Dict[str, str]]] = {}
    for r in rows:
        if r['config'] == cfg_hash:
            groups.setdefault(r['method'], []).append(r)
    out = {}
    flops_key = 'mflops_per_token' if task == 'clm' else 'mflops_per_seq'
    for method, rs in groups.items():
        s: Dict[str, Any] = dict(n=len(rs), seeds=sorted(int(r['seed']) for r in rs), params=int(rs[0]['params']),
                                 mflops=float(rs[0][flops_key]), wall=sorted(float(r['wall_s']) for r in rs),
                                 cpu=sorted(float(r['cpu_s']) for r in rs))
        for key, _, _, _ in METRICS[task]:
            values = [float(r[key]) for r in rs]
            s[key] = values
            s[f'{key}_mean'], s[f'{key}_std'] = mean_std(values)
        out[method] = s
    return out


def task_title(task: str, cfg: Dict[str, Any], meta: Dict[str, Any]) -> str:
    m, t = cfg['model'], cfg[task]
    sizes = ', '.join(f'{k.replace("_", " ")} {v}' for k, v in meta.get('sizes', {}).items())
    shape = f'GPT-2, {m["n_layer"]} layers, width {m["n_embd"]}, FFN {m["n_inner"]}, {m["n_head"]} heads'
    if task == 'clm':
        return (f'**Byte-level causal LM** ({shape}; context {t["context"]} bytes, routing segments of '
                f'{t["segment_length"]}; {t["steps"]} steps of {t["batch"]} blocks, lr {t["lr"]}; {sizes})')
    return (f'**Which novel (6-way)** ({shape}; 50-word passages, at most {t["max_length"]} word tokens, one '
            f'routing unit per passage; {t["steps"]} steps of {t["batch"]} passages, lr {t["lr"]}; {sizes})')


def report(args: argparse.Namespace, cfg: Dict[str, Any]) -> str:
    lines: List[str] = []
    for task in args.tasks:
        path = csv_path(args, task)
        rows = read_rows(path)
        stats = summarise(rows, task, cfg['hash'][task])
        meta_path = os.path.splitext(path)[0] + '_meta.json'
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        rel = os.path.relpath(path, REPO)
        out = [task_title(task, cfg, meta), '',
                  f'`{rel}`: configuration {cfg["hash"][task]}, {sum(s["n"] for s in stats.values())} runs; split '
                  f'sha256 {meta.get("split_sha256", "?")}.', '']
        if meta:
            machine = meta['machine']
            out += [f'Measured on {machine["cpu"]}, {meta["workers"]} runs in parallel with {machine["threads"]} torch '
                    f'thread each (load average at start {machine["load_average_at_start"]}); '
                    f'{machine["software"]}, transformers {meta["transformers"]}. Started {meta["started"]}.', '']
        metric_cols = ''.join(f' {label} mean ± std | vs Vanilla |' for _, label, _, _ in METRICS[task])
        flops_label = 'MFLOPs/byte' if task == 'clm' else 'MFLOPs/passage'
        out += [f'| method |{metric_cols} seeds | params (M) | {flops_label} | wall s (median) | cpu s (median) |',
                  '| --- |' + ' ---: | ---: |' * len(METRICS[task]) + ' ---: | ---: | ---: | ---: | ---: |']
        base = stats.get('Vanilla')
        for method in [m for m in args.methods if m in stats]:
            s = stats[method]
            cells = ''
            for key, _, _, fmt in METRICS[task]:
                mean, std = s[f'{key}_mean'], s[f'{key}_std']
                delta = '-' if base is None or method == 'Vanilla' else (
                    '{:+' + fmt[2:]).format(mean - base[f'{key}_mean'])
                cells += f' {fmt.format(mean)} ± {fmt.format(std)} | {delta} |'
            out.append(f'| {method} |{cells} {s["n"]} | {s["params"] / 1e6:.2f} | {s["mflops"]:.3g} | '
                         f'{s["wall"][len(s["wall"]) // 2]:.0f} | {s["cpu"][len(s["cpu"]) // 2]:.0f} |')
        out += ['', comparison(task, stats), '']
        with open(os.path.splitext(path)[0] + '_summary.md', 'w') as f:
            f.write('\n'.join(out) + '\n')
        lines += out
        if args.plot and stats:
            plot(task, stats, args.methods, os.path.join(IMG_DIR, f'austen_{task}.png'))
    return '\n'.join(lines)


def comparison(task: str, stats: Dict[str, Dict[str, Any]]) -> str:
    """Plain statement, computed from the numbers: each curvature-aware row against its Euclidean counterpart and
    against Vanilla, in units of the seed spread."""
    key, label, lower, fmt = METRICS[task][0]
    pairs = [('Domain-specific-CA', 'Domain-specific'), ('Ties-CA', 'Ties'), ('Dare-CA', 'Dare'),
             ('Dynamic', 'Domain-specific-CA'), ('Domain-specific-CA', 'Vanilla'), ('Domain-specific-CA', 'SMoE')]
    parts = []
    for a, b in pairs:
        if a not in stats or b not in stats:
            continue
        sa, sb = stats[a], stats[b]
        diff = sa[f'{key}_mean'] - sb[f'{key}_mean']
        spread = max(sa[f'{key}_std'], sb[f'{key}_std'])
        better = diff < 0 if lower else diff > 0
        if min(sa['n'], sb['n']) < 2:
            verdict, ratio = 'undetermined', 'one seed, no spread'
        else:
            verdict = 'ties (within one seed std)' if abs(diff) <= spread else 'wins' if better else 'loses'
            ratio = f'{abs(diff) / spread:.1f}x the larger seed std' if spread > 0 else 'zero seed spread'
        parts.append(f'{a} vs {b}: {("{:+" + fmt[2:]).format(diff)} {label} ({ratio}) → {a} {verdict}')
    return ('Computed comparisons (' + label + ('; lower is better' if lower else '; higher is better') + '): '
            + '; '.join(parts) + '.') if parts else ''


def plot(task: str, stats: Dict[str, Dict[str, Any]], methods: Sequence[str], path: str) -> None:
    """Metric mean with a one-standard-deviation error bar and the individual seeds, per method."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    metrics = METRICS[task][:1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.2), squeeze=False)
    present = [m for m in methods if m in stats]
    for ax, (key, label, lower, _) in zip(axes[0], metrics):
        for i, m in enumerate(present):
            s = stats[m]
            color = method_color(m)
            ax.errorbar(i, s[f'{key}_mean'], yerr=s[f'{key}_std'], fmt='o', color=color, capsize=4)
            ax.scatter([i] * len(s[key]), s[key], s=8, color=color, alpha=0.4)
        if 'Vanilla' in stats:
            ax.axhline(stats['Vanilla'][f'{key}_mean'], color='tab:gray', lw=0.8, ls='--')
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, rotation=60, ha='right', fontsize=8)
        ax.set_ylabel(f'{label} ({"lower" if lower else "higher"} is better)')
        ax.grid(axis='y', alpha=0.3)
    title = 'Austen byte-level LM (validation)' if task == 'clm' else 'Austen which-novel classification (validation)'
    fig.suptitle(f'{title}\nmean ± 1 std over seeds (dots: seeds); red: curvature-aware, blue: Euclidean',
                 fontsize=9)
    save_figure(fig, path)


# ---- command line ----

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=DEFAULT_DATA_DIR,
                   help='folder with the novels, one UTF-8 .txt file each (default: ../shared/data/austen relative '
                        'to the repository)')
    p.add_argument('--tasks', nargs='+', choices=TASKS, default=list(TASKS))
    p.add_argument('--methods', nargs='+', choices=list(METHODS), default=list(METHODS))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--n-embd', type=int, default=64, help='model width (default: 64; FFN width 4x)')
    p.add_argument('--n-layer', type=int, default=4, help='transformer blocks, every FFN an MoE (default: 4)')
    p.add_argument('--n-head', type=int, default=4)
    p.add_argument('--clm-context', type=int, default=128, help='bytes per LM block (default: 128)')
    p.add_argument('--segment-length', type=int, default=32, help='bytes per causal routing segment (default: 32)')
    p.add_argument('--clm-val-blocks', type=int, default=256, help='validation blocks, evenly spaced (default: 256)')
    p.add_argument('--clm-steps', type=int, default=120)
    p.add_argument('--clm-batch', type=int, default=8)
    p.add_argument('--cls-vocab', type=int, default=8000, help='word vocabulary size (default: 8000)')
    p.add_argument('--cls-max-length', type=int, default=96, help='word tokens per passage (default: 96)')
    p.add_argument('--cls-steps', type=int, default=160)
    p.add_argument('--cls-batch', type=int, default=8)
    p.add_argument('--lr', type=float, default=3e-3, help='peak learning rate (default: 3e-3)')
    p.add_argument('--warmup', type=int, default=16, help='warm-up steps (default: 16, paper Table 8)')
    p.add_argument('--workers', type=int, default=3, help='parallel runs (default: 3)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run (default: 1)')
    p.add_argument('--results-dir', default=RESULTS_DIR, help='where the CSVs go (default: benchmarks/results)')
    p.add_argument('--report-only', action='store_true', help='rebuild the tables and plots from the CSVs')
    p.add_argument('--no-plot', dest='plot', action='store_false', help='do not write docs/img/austen_*.png')
    p.add_argument('--quick', action='store_true',
                   help='smoke run: seed 0, 12 steps per run, 64 validation blocks, separate *_quick CSVs, no plots')
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.clm_steps, args.cls_steps, args.clm_val_blocks, args.warmup = [0], 12, 12, 64, 4
        args.plot = False
    if args.clm_context % args.segment_length:
        p.error(f'--clm-context={args.clm_context} must be a multiple of --segment-length={args.segment_length}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = study_config(args)
    if not args.report_only:
        try:
            novel_files(args.data_dir)
        except FileNotFoundError as e:
            sys.exit(f'error: {e}')
        command = 'python benchmarks/reproduce_austen.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        ensure_dir(args.results_dir)
        for task in args.tasks:
            data = prepare_data(task, args.data_dir, cfg)
            meta = dict(command=command.strip(), machine=machine_info(args.threads), config=cfg,
                        transformers=transformers.__version__, novels=data['novels'],
                        split_sha256=data['split_sha256'], sizes=data['sizes'], workers=args.workers,
                        started=time.strftime('%Y-%m-%d %H:%M:%S'))
            print(json.dumps({k: meta[k] for k in ('command', 'split_sha256', 'sizes')}), flush=True)
            with open(os.path.splitext(csv_path(args, task))[0] + '_meta.json', 'w') as f:
                json.dump(meta, f, indent=1)
        run_grid(args, cfg)
    print(report(args, cfg))


if __name__ == '__main__':
    main()
