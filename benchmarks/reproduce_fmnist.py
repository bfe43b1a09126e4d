"""Fashion-MNIST accuracy study: every row of the paper's vision table, on a small ViT and a small Swin, on the CPU.

The paper's Swin-S / ImageNet-1k table (method section 11) compares Vanilla, SMoE and the six merging variants. This
script runs the same rows at a size a 2-core CPU can train, with the registered ``camex_*`` timm models:

* ``vit``:  ViT, 28 x 28 input, 4 x 4 patches (49 tokens, no class token, global average pooling: it learns much
  faster than the class token on this budget), width 96, depth 6, 3 heads; MoE in the odd blocks (1, 3, 5), the
  models' default (V-MoE placement);
* ``swin``: Swin, 28 x 28 input zero-padded to 32 x 32, 2 x 2 patches, window 4, width 24, depths (2, 2, 4, 2),
  heads (1, 2, 4, 8); MoE in blocks 1 and 3 of stage 3 and block 1 of stage 4, the models' default (Swin-MoE
  placement: the odd blocks of the last two stages), so that the Dynamic row has a chain (stage 3) to propagate.

Rows (``num_experts=8``, i.e. one base and seven domain experts, as in the paper):

=====================  ==========================================================
Vanilla                the dense timm model of the same dimensions
SMoE                   ``merge='smoe'``: token-choice top-2 of 8 expert FFNs
Domain-specific        ``merge='euclidean', mask=None``
Ties / Dare            ``merge='euclidean', mask='ties' / 'dare'``
Domain-specific-CA     ``merge='camex', mask=None``
Ties-CA / Dare-CA      ``merge='camex', mask='ties' / 'dare'``
Dynamic                ``merge='camex', mask=None, dynamic=True``
=====================  ==========================================================

Splits (fixed, the same for every run): the training set is a class-balanced subset of the official 60k training
images (the first ``--train-size / 10`` images of each class in a ``torch.randperm`` order drawn with generator
seed 0; its indices' SHA-256 is recorded); the test set is the official 10k test set, every image. No augmentation.
Inputs are scaled to [0, 1] and normalised with the training subset's mean and standard deviation.

Training (paper Table 8): AdamW, betas (0.9, 0.98), eps 1e-6, weight decay 0.01 (not on biases, norms, position
embeddings and curvature factors: ``model.no_weight_decay()``), linear warm-up then linear decay to zero, batch 32,
cross-entropy plus ``camex_vision.aux_loss`` (zero: ``balance_coef`` is left at 0 as in the paper). The seed sets the
initialisation, data order, router noise and DARE drops. CAMEx models are evaluated after
``camex_vision.reparameterize`` (exact; the largest logit difference to the unfolded model is recorded). FLOPs
(``FlopCounterMode``) are those of one inference image of the evaluated model at the training batch size.

Models are created through their timm entry points (``_common.create_model``): ``timm.create_model`` drops
``None``-valued kwargs, which would turn ``mask=None`` into the models' default ``mask='ties'``.

Upcycling: the Vanilla seed-0 model of the grid is saved, then every MoE row is created from it with
``pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=10, input_size=...)`` (the models'
checkpoint filter upcycles the dense FFN into every expert; the largest logit difference to the dense model is
recorded, it must be ~0) and fine-tuned for a short budget; the Vanilla row fine-tunes the dense model itself for
the same budget, the control every upcycled row is compared with.

Runs execute in ``--workers`` processes of ``--threads`` torch threads each (one thread per process is the most
efficient use of a small, shared CPU). Each finished run appends one row to the CSV; a rerun skips the runs already
there (same model, method, phase, seed and configuration hash), so the study is resumable. ``--report-only`` rebuilds
the summary tables (Markdown) and the plots from the CSV.

Usage:
    python benchmarks/reproduce_fmnist.py --quick                   # smoke run, separate CSV (about 8 minutes)
    nice -n 10 python benchmarks/reproduce_fmnist.py                # the full study (resumable)
    python benchmarks/reproduce_fmnist.py --report-only             # tables and plots from the CSV
"""
import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402  (importing _common registers the camex_* models)
    DEFAULT_FMNIST_DIR, IMG_DIR, REPO, RESULTS_DIR, append_row, balanced_subset, count_flops, create_model, ensure_dir,
    load_fashion_mnist, machine_info, mean_std, num_params, method_color, read_rows, save_figure)

from timm.optim import create_optimizer_v2  # noqa: E402

import camex_vision  # noqa: E402

NUM_EXPERTS = 8
MODELS: Dict[str, Dict[str, Any]] = {
    'vit': dict(
        dense='vit_tiny_patch16_224', moe='camex_vit_tiny_patch16_224', img_size=28,
        dims=dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10,
                  class_token=False, global_pool='avg')),
    'swin': dict(
        dense='swin_tiny_patch4_window7_224', moe='camex_swin_tiny_patch4_window7_224', img_size=32,
        dims=dict(img_size=32, patch_size=2, in_chans=1, window_size=4, embed_dim=24, depths=(2, 2, 4, 2),
                  num_heads=(1, 2, 4, 8), num_classes=10)),
}
METHODS: Dict[str, Optional[Dict[str, Any]]] = {  # row of the paper's table -> MoE kwargs (None: the dense model)
    'Vanilla': None,
    'SMoE': dict(merge='smoe', mask=None),
    'Domain-specific': dict(merge='euclidean', mask=None),
    'Ties': dict(merge='euclidean', mask='ties'),
    'Dare': dict(merge='euclidean', mask='dare'),
    'Domain-specific-CA': dict(merge='camex', mask=None),
    'Ties-CA': dict(merge='camex', mask='ties'),
    'Dare-CA': dict(merge='camex', mask='dare'),
    'Dynamic': dict(merge='camex', mask=None, dynamic=True),
}
PHASES = ('scratch', 'upcycle')
CSV_FIELDS = [
    'model', 'method', 'phase', 'seed', 'top1', 'train_loss', 'params', 'mflops_per_img', 'train_images', 'steps',
    'lr', 'wall_s', 'train_s', 'eval_s', 'cpu_s', 'threads', 'upcycle_err', 'reparam_err', 'config', 'finished']

# ---- data (one copy per worker process) ----

_DATA: Dict[str, Any] = {}


def _init_worker(data_dir: str, train_size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _DATA.clear()
    _DATA.update(prepare_data(data_dir, train_size))


def prepare_data(data_dir: str, train_size: int) -> Dict[str, Any]:
    """The fixed training subset and the official test set as normalised float tensors, per input size."""
    raw = load_fashion_mnist(data_dir)
    if train_size % 10:
        raise ValueError(f'--train-size={train_size} must be a multiple of 10 (a class-balanced subset)')
    idx = balanced_subset(raw['train_labels'], train_size // 10, seed=0)
    train = raw['train_images'][idx].float().div_(255)
    mean, std = train.mean().item(), train.std().item()
    out: Dict[str, Any] = {'train_labels': raw['train_labels'][idx].long(), 'test_labels': raw['test_labels'].long(),
                           'subset_sha256': hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:16],
                           'mean': mean, 'std': std}
    test = raw['test_images'].float().div_(255)
    for size in sorted({m['img_size'] for m in MODELS.values()}):
        pad = (size - 28) // 2
        for split, images in (('train', train), ('test', test)):
            x = F.pad(images.unsqueeze(1), (pad, size - 28 - pad) * 2) if pad else images.unsqueeze(1)
            out[f'{split}_{size}'] = ((x - mean) / std).contiguous()
    return out


# ---- models ----

def create(model_key: str, method: str, pretrained_file: Optional[str] = None) -> nn.Module:
    """The model of one row; with ``pretrained_file`` (a dense state dict), the MoE model upcycled from it."""
    spec, moe = MODELS[model_key], METHODS[method]
    if moe is None:
        model = create_model(spec['dense'], **spec['dims'])
        if pretrained_file:
            model.load_state_dict(torch.load(pretrained_file, map_location='cpu', weights_only=True))
        return model
    kwargs = dict(spec['dims'], num_experts=NUM_EXPERTS, **moe)
    if pretrained_file:
        size = spec['img_size']
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(
            file=pretrained_file, num_classes=10, input_size=(1, size, size)))
    return create_model(spec['moe'], **kwargs)


def needs_folding(model: nn.Module) -> bool:
    """Whether ``camex_vision.reparameterize`` changes anything: curvature, a mask or a dynamic base to fold."""
    return any(m.curvature is not None or m.mask is not None or not m.owns_base
               for m in model.modules() if isinstance(m, camex_vision.core.MergedLinear))


# ---- one run ----

def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at step ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, warmup: int,
          seed: int) -> float:
    """``steps`` AdamW steps on shuffled batches of ``(x, y)``; returns the mean loss of the last 10 steps."""
    opt = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    gen = torch.Generator().manual_seed(1000 + seed)
    per_epoch = x.shape[0] // batch
    order = torch.empty(0, dtype=torch.long)
    losses: List[float] = []
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(x.shape[0], generator=gen)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        loss = F.cross_entropy(model(x[idx]), y[idx]) + camex_vision.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / len(losses[-10:])


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


@torch.inference_mode()
def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    return (a(x) - b(x)).abs().max().item()


def run_job(job: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Train and evaluate one (model, method, phase, seed); returns its CSV row (or, for a dense-source job, the
    checkpoint path)."""
    t0, c0 = time.perf_counter(), time.process_time()
    model_key, method, phase, seed = job['model'], job['method'], job['phase'], job['seed']
    size = MODELS[model_key]['img_size']
    x, y = _DATA[f'train_{size}'], _DATA['train_labels']
    xt, yt = _DATA[f'test_{size}'], _DATA['test_labels']
    torch.manual_seed(seed)
    upcycle_err = reparam_err = float('nan')
    if phase == 'upcycle':
        model = create(model_key, method, pretrained_file=job['source'])
        dense = create(model_key, 'Vanilla', pretrained_file=job['source'])
        upcycle_err = max_logit_diff(model, dense, xt[:256])  # upcycling is exact: must be ~0
        images, lr = cfg['upcycle_images'], cfg['upcycle_lr']
        warmup = cfg['upcycle_warmup']
    else:
        model = create(model_key, method)
        images, lr, warmup = cfg['train_size'] * cfg['epochs'], cfg['lr'], cfg['warmup']
    params = num_params(model)
    steps = max(1, images // cfg['batch'])
    t_train = time.perf_counter()
    loss = train(model, x, y, steps, cfg['batch'], lr, min(warmup, steps), seed)
    t_train = time.perf_counter() - t_train
    if job.get('save'):
        torch.save(model.state_dict(), job['save'])
        if job.get('source_only'):
            return {'saved': job['save']}
    t_eval = time.perf_counter()
    if needs_folding(model):
        folded = camex_vision.reparameterize(copy.deepcopy(model))
        reparam_err = max_logit_diff(folded, model, xt[:cfg['eval_batch']])  # folding is exact: must be ~0
        model = folded
    model.eval()
    with torch.inference_mode():  # FLOPs of the model as evaluated (folded: no curvature, as at test time)
        flops = count_flops(lambda: model(xt[:cfg['batch']])) / cfg['batch']
    top1 = evaluate(model, xt, yt, cfg['eval_batch'])
    t_eval = time.perf_counter() - t_eval
    return dict(
        model=model_key, method=method, phase=phase, seed=seed, top1=f'{top1:.2f}', train_loss=f'{loss:.4f}',
        params=params, mflops_per_img=f'{flops / 1e6:.2f}', train_images=steps * cfg['batch'], steps=steps, lr=lr,
        wall_s=f'{time.perf_counter() - t0:.1f}', train_s=f'{t_train:.1f}', eval_s=f'{t_eval:.1f}',
        cpu_s=f'{time.process_time() - c0:.1f}', threads=torch.get_num_threads(), upcycle_err=f'{upcycle_err:.1e}',
        reparam_err=f'{reparam_err:.1e}',
        config=cfg['hash'], finished=time.strftime('%Y-%m-%d %H:%M:%S'))


def _worker(job: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    return run_job(job, cfg)


# ---- the grid ----

def study_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything that defines a run's result; its hash tags the CSV rows (runs of another config are not reused)."""
    cfg = dict(
        train_size=args.train_size, epochs=args.epochs, batch=args.batch, lr=args.lr, warmup=args.warmup,
        upcycle_images=args.upcycle_images, upcycle_lr=args.upcycle_lr, upcycle_warmup=args.upcycle_warmup,
        eval_batch=args.eval_batch, num_experts=NUM_EXPERTS,
        models={k: dict(MODELS[k], dims={d: list(v) if isinstance(v, tuple) else v for d, v in
                                         MODELS[k]['dims'].items()}) for k in args.models})
    cfg['hash'] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    return cfg


def run_key(row: Dict[str, Any]) -> Tuple[str, str, str, int, str]:
    return row['model'], row['method'], row['phase'], int(row['seed']), row['config']


def source_path(args: argparse.Namespace, cfg: Dict[str, Any], model_key: str) -> str:
    return os.path.join(args.ckpt_dir, f'fmnist_{model_key}_dense_seed0_{cfg["hash"]}.pt')


def run_grid(args: argparse.Namespace, cfg: Dict[str, Any]) -> None:
    ensure_dir(os.path.dirname(args.csv))
    ensure_dir(args.ckpt_dir)
    done = {run_key(r) for r in read_rows(args.csv)}
    scratch = [dict(model=m, method=meth, phase='scratch', seed=s)
               for s in args.seeds for m in args.models for meth in args.methods]
    for job in scratch:  # the Vanilla seed-0 model is the upcycling source
        if job['method'] == 'Vanilla' and job['seed'] == 0:
            job['save'] = source_path(args, cfg, job['model'])
    upcycle = [dict(model=m, method=meth, phase='upcycle', seed=s, source=source_path(args, cfg, m))
               for s in args.upcycle_seeds for m in args.models for meth in args.methods] if args.upcycle else []
    todo = [j for j in scratch if (j['model'], j['method'], j['phase'], j['seed'], cfg['hash']) not in done]
    todo_up = [j for j in upcycle if (j['model'], j['method'], j['phase'], j['seed'], cfg['hash']) not in done]
    print(f'{len(scratch) + len(upcycle)} runs in the study, {len(todo) + len(todo_up)} to do '
          f'({args.workers} workers x {args.threads} threads); results -> {args.csv}', flush=True)
    ctx = get_context('spawn')
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(args.data_dir, args.train_size, args.threads)) as pool:
        pending: Dict[Future, Dict[str, Any]] = {pool.submit(_worker, j, cfg): j for j in todo}
        # upcycling needs the dense source: after the grid, or regenerated if the grid ran in an earlier call
        sources = {j['source'] for j in todo_up}
        queued_up = False
        while pending or (todo_up and not queued_up):
            if not pending or all(j['phase'] == 'source' for j in pending.values()):
                if not queued_up:
                    missing = [s for s in sources if not os.path.isfile(s)
                               and not any(j.get('save') == s for j in pending.values())]
                    for path in missing:
                        model_key = next(j['model'] for j in todo_up if j['source'] == path)
                        job = dict(model=model_key, method='Vanilla', phase='source', seed=0, save=path,
                                   source_only=True)
                        print(f'  regenerating the upcycling source {path}', flush=True)
                        pending[pool.submit(_worker, job, cfg)] = job
                    if not any(j['phase'] == 'source' for j in pending.values()):
                        pending.update({pool.submit(_worker, j, cfg): j for j in todo_up})
                        queued_up = True
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                row = fut.result()
                if job['phase'] == 'source':
                    continue
                append_row(args.csv, row, CSV_FIELDS)
                print(f'  [{time.perf_counter() - start:6.0f} s] {row["model"]:4s} {row["phase"]:7s} '
                      f'{row["method"]:18s} seed {row["seed"]}: top-1 {row["top1"]}%  ({row["wall_s"]} s wall, '
                      f'{row["cpu_s"]} s cpu, upcycle err {row["upcycle_err"]}, reparam err {row["reparam_err"]})',
                      flush=True)
    print(f'grid done in {time.perf_counter() - start:.0f} s', flush=True)


# ---- report ----

def summarise(rows: List[Dict[str, str]], cfg_hash: str) -> Dict[Tuple[str, str, str], Dict[str, Any]]:
    groups: Dict[Tuple[str, str, str], List[Dict[str, str]]] = {}
    for r in rows:
        if r['config'] == cfg_hash:
            groups.setdefault((r['model'], r['phase'], r['method']), []).append(r)
    out = {}
    for key, rs in groups.items():
        top1 = [float(r['top1']) for r in rs]
        mean, std = mean_std(top1)
        out[key] = dict(
            n=len(rs), mean=mean, std=std, top1=top1, seeds=[int(r['seed']) for r in rs],
            params=int(rs[0]['params']), mflops=float(rs[0]['mflops_per_img']),
            wall=statistics.median(float(r['wall_s']) for r in rs),
            cpu=statistics.median(float(r['cpu_s']) for r in rs), train_images=int(rs[0]['train_images']),
            check=max((v for r in rs for v in (float(r['upcycle_err']), float(r['reparam_err'])) if not math.isnan(v)),
                      default=float('nan')))
    return out


def paired_delta(stats: Dict[Tuple[str, str, str], Dict[str, Any]], model_key: str, phase: str,
                 method: str) -> Optional[List[float]]:
    """Per-seed ``top1(method) - top1(Vanilla)`` over the seeds both have: seeds share the data order, so the paired
    difference removes the seed-to-seed variation common to all rows."""
    base, s = stats.get((model_key, phase, 'Vanilla')), stats.get((model_key, phase, method))
    if base is None or s is None or method == 'Vanilla':
        return None
    ref = dict(zip(base['seeds'], base['top1']))
    deltas = [t - ref[seed] for seed, t in zip(s['seeds'], s['top1']) if seed in ref]
    return deltas or None


def report(args: argparse.Namespace, cfg: Dict[str, Any]) -> str:
    rows = read_rows(args.csv)
    stats = summarise(rows, cfg['hash'])
    meta_path = os.path.splitext(args.csv)[0] + '_meta.json'
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    lines = [f'Fashion-MNIST study, configuration {cfg["hash"]} ({os.path.relpath(args.csv, REPO)}, {len(rows)} rows)',
             '']
    if meta:
        lines += [f'- machine: {meta["machine"]["cpu"]}; {meta["machine"]["software"]}',
                  f'- command: `{meta["command"]}`',
                  f'- training subset: {cfg["train_size"]} images (sha256 of indices {meta.get("subset_sha256")}), '
                  f'official 10k test set', '']
    for phase in PHASES:
        for model_key in args.models:
            present = [m for m in args.methods if (model_key, phase, m) in stats]
            if not present:
                continue
            s0 = stats[(model_key, phase, present[0])]
            title = ('from scratch' if phase == 'scratch' else
                     f'upcycled from the Vanilla seed-0 model ({summary_source(stats, model_key)}) and fine-tuned')
            lines += [f'**{model_key}, {title}**: {s0["train_images"]} training images per run, '
                      f'batch {cfg["batch"]}',
                      '',
                      '| method | top-1 % mean | std | seeds | vs Vanilla, paired: mean | std | params (M) '
                      '| MFLOPs/img | wall s | cpu s | max logit err |',
                      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
            for m in present:
                s = stats[(model_key, phase, m)]
                deltas = paired_delta(stats, model_key, phase, m)
                delta = '- | -' if deltas is None else '{:+.2f} | {:.2f}'.format(*mean_std(deltas))
                check = '-' if math.isnan(s['check']) else f'{s["check"]:.0e}'
                lines.append(
                    f'| {m} | {s["mean"]:.2f} | {s["std"]:.2f} | {s["n"]} | {delta} | {s["params"] / 1e6:.2f} | '
                    f'{s["mflops"]:.1f} | {s["wall"]:.0f} | {s["cpu"]:.0f} | {check} |')
            lines.append('')
    text = '\n'.join(lines)
    summary_path = os.path.splitext(args.csv)[0] + '_summary.md'
    with open(summary_path, 'w') as f:
        f.write(text + '\n')
    if args.plot:
        plot(stats, args, os.path.join(IMG_DIR, args.plot))
    return text


def summary_source(stats: Dict[Tuple[str, str, str], Dict[str, Any]], model_key: str) -> str:
    s = stats.get((model_key, 'scratch', 'Vanilla'))
    if s is None or 0 not in s['seeds']:
        return 'source accuracy not in the CSV'
    return f'{s["top1"][s["seeds"].index(0)]:.2f}% top-1'


def plot(stats: Dict[Tuple[str, str, str], Dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Top row: top-1 mean with a one-standard-deviation bar and the individual seeds, per method, model and phase.
    Bottom row: the paired difference to Vanilla (same seed), mean and one standard deviation over seeds."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = [(m, p) for p in PHASES for m in args.models if any((m, p, meth) in stats for meth in args.methods)]
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.6), squeeze=False,
                             gridspec_kw=dict(height_ratios=[3, 2]))
    for col, (model_key, phase) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        methods = [m for m in args.methods if (model_key, phase, m) in stats]
        for i, m in enumerate(methods):
            s = stats[(model_key, phase, m)]
            color = method_color(m)
            top.errorbar(i, s['mean'], yerr=s['std'], fmt='o', color=color, capsize=4)
            top.scatter([i] * len(s['top1']), s['top1'], s=8, color=color, alpha=0.4)
            deltas = paired_delta(stats, model_key, phase, m)
            if deltas:
                mean, std = mean_std(deltas)
                bottom.errorbar(i, mean, yerr=std, fmt='o', color=color, capsize=4)
                bottom.scatter([i] * len(deltas), deltas, s=8, color=color, alpha=0.4)
        base = stats.get((model_key, phase, 'Vanilla'))
        if base:
            top.axhline(base['mean'], color='tab:gray', lw=0.8, ls='--')
        bottom.axhline(0.0, color='tab:gray', lw=0.8, ls='--')
        top.set_title(f'{model_key}, {phase}', fontsize=10)
        top.set_ylabel('Fashion-MNIST top-1 (%)')
        bottom.set_ylabel('top-1 minus Vanilla, same seed (points)')
        for ax in (top, bottom):
            ax.set_xticks(range(len(methods)))
            ax.grid(axis='y', alpha=0.3)
        top.set_xticklabels([])
        bottom.set_xticklabels(methods, rotation=60, ha='right', fontsize=8)
    fig.suptitle('mean +- 1 std over seeds (dots: seeds); red: curvature-aware, blue: Euclidean, orange: SMoE',
                 fontsize=9)
    save_figure(fig, path)


# ---- command line ----

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=DEFAULT_FMNIST_DIR,
                   help='folder with the Fashion-MNIST IDX files (.gz or not; torchvision\'s FashionMNIST/raw works)')
    p.add_argument('--models', nargs='+', choices=sorted(MODELS), default=['vit', 'swin'])
    p.add_argument('--methods', nargs='+', choices=list(METHODS), default=list(METHODS))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--train-size', type=int, default=5000, help='class-balanced training subset (default: 5000)')
    p.add_argument('--epochs', type=int, default=1, help='passes over the subset (default: 1)')
    p.add_argument('--batch', type=int, default=32,
                   help='batch size (default: 32; on this budget more, smaller steps train faster than 128)')
    p.add_argument('--lr', type=float, default=1e-3, help='peak learning rate from scratch (default: 1e-3)')
    p.add_argument('--warmup', type=int, default=10, help='warm-up steps from scratch (default: 10)')
    p.add_argument('--eval-batch', type=int, default=500)
    p.add_argument('--no-upcycle', dest='upcycle', action='store_false', help='skip the upcycling runs')
    p.add_argument('--upcycle-seeds', type=int, nargs='+', default=[0],
                   help='fine-tuning seeds after upcycling (default: 0; the source is always the seed-0 Vanilla)')
    p.add_argument('--upcycle-images', type=int, default=640,
                   help='fine-tuning images after upcycling (default: 640, i.e. 20 steps)')
    p.add_argument('--upcycle-lr', type=float, default=5e-4)
    p.add_argument('--upcycle-warmup', type=int, default=2)
    p.add_argument('--workers', type=int, default=2, help='parallel runs (default: 2)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run (default: 1)')
    p.add_argument('--csv', default=None, help='results CSV (default: benchmarks/results/fmnist_vision.csv; '
                                               'fmnist_vision_quick.csv with --quick)')
    p.add_argument('--ckpt-dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'camex_fmnist'),
                   help='where the dense upcycling source is saved (not a result)')
    p.add_argument('--plot', default=None, help='PNG name under docs/img, or "none" (default: fmnist_accuracy.png; '
                                                'none with --quick)')
    p.add_argument('--report-only', action='store_true', help='rebuild the summary and plot from the CSV')
    p.add_argument('--quick', action='store_true',
                   help='smoke run: 1000 training images, seed 0, upcycling 256 images, separate CSV')
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.seeds, args.upcycle_seeds, args.upcycle_images = 1000, [0], [0], 256
    if args.csv is None:
        args.csv = os.path.join(RESULTS_DIR, 'fmnist_vision_quick.csv' if args.quick else 'fmnist_vision.csv')
    if args.plot is None and not args.quick:
        args.plot = 'fmnist_accuracy.png'
    if args.plot == 'none':
        args.plot = None
    if 'Vanilla' not in args.methods and args.upcycle and not args.report_only:
        p.error('upcycling needs the Vanilla row (its seed-0 model is the source); add it or pass --no-upcycle')
    if args.upcycle and 0 not in args.seeds and not args.report_only:
        p.error('upcycling needs seed 0 of the grid (its Vanilla model is the source); add it or pass --no-upcycle')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = study_config(args)
    if not args.report_only:
        command = 'python benchmarks/reproduce_fmnist.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        data = prepare_data(args.data_dir, args.train_size)
        meta = dict(command=command.strip(), machine=machine_info(args.threads), config=cfg,
                    subset_sha256=data['subset_sha256'], normalisation=dict(mean=data['mean'], std=data['std']),
                    workers=args.workers, started=time.strftime('%Y-%m-%d %H:%M:%S'))
        print(json.dumps({k: meta[k] for k in ('command', 'machine', 'subset_sha256')}, indent=1), flush=True)
        del data
        ensure_dir(os.path.dirname(args.csv))
        with open(os.path.splitext(args.csv)[0] + '_meta.json', 'w') as f:
            json.dump(meta, f, indent=1)
        run_grid(args, cfg)
    print(report(args, cfg))


if __name__ == '__main__':
    main()
