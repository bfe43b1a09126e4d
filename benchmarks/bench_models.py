"""Model benchmark: speed, memory, parameters and FLOPs of whole CAMEx models against their dense timm counterparts.

For each model family (``--models``), five variants are built with the same dimensions:

* ``dense``:   the timm model (``vit_small_patch16_224``, ``swin_tiny_patch4_window7_224``, ...), the reference;
* ``euclid``:  the ``camex_*`` model with ``merge='euclidean'`` (Euclidean merging, mask ``--mask``);
* ``smoe``:    the ``camex_*`` model with ``merge='smoe'`` (token-choice top-2 of N expert FFNs);
* ``camex``:   the ``camex_*`` model with ``merge='camex'`` (curvature-aware merging, mask ``--mask``);
* ``reparam``: a copy of ``camex`` folded by ``camex_vision.reparameterize`` (the test-time form; inference only).

``euclid`` and ``camex`` share the mask (default ``ties``, the models' default and the paper's best vision setting),
so their difference is exactly the curvature. MoE placement is the models' default (odd ViT blocks; odd blocks of
the last two Swin stages), with ``--experts`` experts (default 8, as in the paper).

Two modes: ``infer`` is one forward pass of a batch in ``eval()`` under ``torch.inference_mode()``; ``train`` is
one full training step in ``train()``: forward, cross-entropy, backward, AdamW step, gradients reset to ``None``
(AdamW's state exists before the first measured step, as in steady-state training).

Measurement, per family: one untimed step of every (variant, mode) pair measures peak memory (CPU: the live-byte
peak of the allocator from ``torch.profiler``'s allocation events; CUDA: ``max_memory_allocated``) and counts FLOPs
(``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of matmuls, convolutions and attention, at the
benchmark batch, so batch-independent costs such as the curvature are spread over its images); it is also the
warm-up. Then ``--repeats`` timed rounds run every inference step once, and the first ``--train-repeats`` of them
every training step too, in an order rotated from round to round, so load from other processes hits every variant
alike. Throughput ratios are taken within a round and summarised as median (min-max) over rounds. (Training steps
cost about three inference steps, hence fewer training rounds by default: the CPU run must fit in ~15 minutes.)

Usage:
    python benchmarks/bench_models.py                               # ViT-S and Swin-T, CPU float32, batch 32
    python benchmarks/bench_models.py --quick                       # smoke run: batch 4, 1 round
    python benchmarks/bench_models.py --models vit_s --repeats 5 --batch 16
    python benchmarks/bench_models.py --profile camex:train          # torch.profiler table of one step
    python benchmarks/bench_models.py --device cuda --dtype bfloat16 --batch 256   # see benchmarks/gpu.sh
    python benchmarks/bench_models.py --report-only                 # tables and plot from the saved JSON
"""
import argparse
import contextlib
import copy
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402  (also registers the camex_* models)
    IMG_DIR, MIB, RESULTS_DIR, count_flops, cpu_peak_bytes, create_model, cuda_peak_bytes, ensure_dir, fmt_mmm,
    load_average, machine_info, min_med_max, num_params, optional_device_sync, save_figure)

import camex_vision  # noqa: E402

MODELS = {  # key -> (dense timm model, CAMEx model)
    'vit_s': ('vit_small_patch16_224', 'camex_vit_small_patch16_224'),
    'vit_b': ('vit_base_patch16_224', 'camex_vit_base_patch16_224'),
    'swin_t': ('swin_tiny_patch4_window7_224', 'camex_swin_tiny_patch4_window7_224'),
    'swin_s': ('swin_small_patch4_window7_224', 'camex_swin_small_patch4_window7_224'),
}
VARIANTS = ('dense', 'euclid', 'smoe', 'camex', 'reparam')
MODES = ('infer', 'train')
INFERENCE_ONLY = {'reparam'}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
TARGETS = [  # (description, (variant, mode), (reference variant, mode), lowest acceptable throughput ratio)
    ('reparameterised CAMEx inference vs dense', ('reparam', 'infer'), ('dense', 'infer'), 0.85),
    ('CAMEx training vs Euclidean merged', ('camex', 'train'), ('euclid', 'train'), 0.80),
]


# ---- models and steps ----

def perturb_curvature(model: nn.Module, scale: float = 0.05) -> None:
    """Move the curvature factors off identity, so that folding does real work and the check below means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.curvature.' in name:
                p.add_(torch.randn_like(p) * scale)


def build_variants(family: str, args: argparse.Namespace, variants: Sequence[str]) -> Dict[str, nn.Module]:
    dense_name, camex_name = MODELS[family]
    moe = dict(num_experts=args.experts)
    specs = {
        'dense': lambda: create_model(dense_name),
        'euclid': lambda: create_model(camex_name, merge='euclidean', mask=args.mask, **moe),
        'smoe': lambda: create_model(camex_name, merge='smoe', top_k=2, **moe),
        'camex': lambda: create_model(camex_name, merge='camex', mask=args.mask, **moe),
    }
    out = {}
    for v in variants:
        if v == 'reparam':
            continue
        torch.manual_seed(0)
        out[v] = specs[v]()
        if v == 'camex':
            perturb_curvature(out[v])
    if 'reparam' in variants:
        source = out['camex'] if 'camex' in out else specs['camex']()
        if 'camex' not in out:
            perturb_curvature(source)
        out['reparam'] = camex_vision.reparameterize(copy.deepcopy(source).eval())
        check_reparam(source, out['reparam'])
    return out


@torch.no_grad()
def check_reparam(camex: nn.Module, reparam: nn.Module) -> None:
    """The folded model must compute the unfolded model's eval outputs (two images, float32, on the CPU)."""
    x = torch.randn(2, 3, 224, 224)
    camex.eval()
    want, got = camex(x), reparam(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f'reparam != camex: {m}')
    print(f'  check: reparameterised == camex (eval logits, max |diff| {(got - want).abs().max().item():.1e})')


class Runner:
    """One (variant, mode) of the benchmark on its device: ``step()`` runs a batch, ``timed()`` times one, ``measure()``
    takes the peak memory and FLOPs of one."""

    def __init__(self, model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace):
        self.model, self.mode, self.x, self.y = model, mode, x, y
        self.device = x.device
        self.dtype = DTYPES[args.dtype]
        self.sync = optional_device_sync(self.device)
        self.opt = None
        if mode == 'train':
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
            for p in model.parameters():  # create AdamW's state now: steady-state steps do not allocate it
                p.grad = torch.zeros_like(p)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def _autocast(self):
        if self.mode == 'train' and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def step(self) -> None:
        if self.mode == 'infer':
            self.model.eval()
            with torch.inference_mode():
                self.model(self.x)
        else:
            self.model.train()
            with self._autocast():
                loss = F.cross_entropy(self.model(self.x), self.y) + camex_vision.aux_loss(self.model)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sync()

    def timed(self) -> Tuple[float, float]:
        """Wall-clock and process CPU seconds of one step."""
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.step()
        return time.perf_counter() - t0, time.process_time() - c0

    def measure(self) -> Tuple[int, int]:
        """Peak memory (bytes above the start) and FLOPs of one step, measured together in the same step."""
        flops = []
        step = lambda: flops.append(count_flops(self.step))  # noqa: E731
        peak = cuda_peak_bytes(step, self.device) if self.device.type == 'cuda' else cpu_peak_bytes(step)
        return peak, flops[0]


def make_inputs(args: argparse.Namespace, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images for inference (in ``--dtype``), images for training (float32: autocast casts) and labels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    return x.to(DTYPES[args.dtype]), x, y


# ---- the measurement ----

def bench_family(family: str, args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    print(f'\n{family}: building {", ".join(args.variants)} ...', flush=True)
    models = build_variants(family, args, args.variants)
    params = {v: num_params(m) for v, m in models.items()}
    x_infer, x_train, y = make_inputs(args, device)
    runners: Dict[Tuple[str, str], Runner] = {}
    for v, m in models.items():
        for mode in args.modes:
            if mode == 'train' and v in INFERENCE_ONLY:
                continue
            model = m.to(device)
            if mode == 'infer' and args.dtype != 'float32':
                # inference runs in the low precision itself; training keeps float32 weights under autocast
                model = copy.deepcopy(m).to(DTYPES[args.dtype]) if 'train' in args.modes else m.to(DTYPES[args.dtype])
            runners[(v, mode)] = Runner(model, mode, x_infer if mode == 'infer' else x_train, y, args)
    pairs = list(runners)

    peaks, flops = {}, {}
    for key in pairs:  # untimed: memory and FLOPs of one step, which is also the warm-up
        t0 = time.perf_counter()
        peaks[key], flops[key] = runners[key].measure()
        print(f'  {key[0]:8s} {key[1]:5s}  peak {peaks[key] / MIB:8.1f} MiB  '
              f'{flops[key] / args.batch / 1e9:7.2f} GFLOPs/img  (measured in {time.perf_counter() - t0:.0f} s)',
              flush=True)

    times: Dict[Tuple[str, str], List[float]] = {key: [] for key in pairs}
    cpu_times: Dict[Tuple[str, str], List[float]] = {key: [] for key in pairs}
    loads = []
    for rnd in range(max(args.repeats, args.train_repeats)):
        due = [key for key in pairs if rnd < (args.repeats if key[1] == 'infer' else args.train_repeats)]
        shift = rnd % len(due)
        t0 = time.perf_counter()
        for key in due[shift:] + due[:shift]:
            wall, cpu = runners[key].timed()
            times[key].append(wall)
            cpu_times[key].append(cpu)
        loads.append(load_average())
        print(f'  round {rnd + 1}: {len(due)} steps in {time.perf_counter() - t0:.0f} s  (load average {loads[-1]})',
              flush=True)
    return dict(
        family=family, dense=MODELS[family][0], camex=MODELS[family][1], params=params,
        times={f'{v}/{m}': ts for (v, m), ts in times.items()},
        cpu_times={f'{v}/{m}': ts for (v, m), ts in cpu_times.items()},
        peak_bytes={f'{v}/{m}': b for (v, m), b in peaks.items()},
        flops={f'{v}/{m}': f for (v, m), f in flops.items()}, load_per_round=loads)


def profile_step(family: str, spec: str, args: argparse.Namespace) -> str:
    """``torch.profiler`` table (self CPU/CUDA time per op) of one step of ``variant:mode``, after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    variant, mode = spec.split(':')
    if variant not in VARIANTS or mode not in MODES or (mode == 'train' and variant in INFERENCE_ONLY):
        raise SystemExit(f'--profile {spec!r}: expected VARIANT:MODE with VARIANT in {VARIANTS}, MODE in {MODES}')
    device = torch.device(args.device)
    model = build_variants(family, args, [variant])[variant].to(device)
    if mode == 'infer' and args.dtype != 'float32':
        model = model.to(DTYPES[args.dtype])
    x_infer, x_train, y = make_inputs(args, device)
    runner = Runner(model, mode, x_infer if mode == 'infer' else x_train, y, args)
    runner.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        runner.step()
    wall = time.perf_counter() - t0
    sort = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    by_op = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=40)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=args.profile_rows, max_name_column_width=40, max_shapes_column_width=70)
    header = (f'{family} {variant} {mode}, batch {args.batch}, {args.device} {args.dtype}, {args.threads} threads, '
              f'one profiled step {wall:.2f} s wall (load average {load_average()})')
    return f'{header}\n\nby op:\n{by_op}\nby op and input shapes:\n{by_shape}'


# ---- reporting ----

def ratio_stats(res: Dict[str, Any], key: str, ref: str, clock: str = 'times') -> List[float]:
    """Per-round throughput ratios ``throughput(key) / throughput(ref)`` = ``time(ref) / time(key)``, by wall clock
    (``clock='times'``) or by process CPU time (``'cpu_times'``)."""
    return [tr / tk for tk, tr in zip(res[clock][key], res[clock][ref])]


def _has_cpu_clock(res: Dict[str, Any], device: str) -> bool:
    """Process CPU time is a second clock on the CPU (it does not count waiting for a core); meaningless on CUDA."""
    return 'cpu_times' in res and not device.startswith('cuda')


def family_table(res: Dict[str, Any], batch: int, device: str) -> List[str]:
    cpu = _has_cpu_clock(res, device)
    extra = ' and, in brackets, by process CPU time' if cpu else ''
    lines = [
        f'**{res["family"]}** ({res["dense"]} / {res["camex"]}): images/s (wall clock) and throughput ratio to dense '
        f'by wall clock{extra}, as median (min-max) over rounds',
        '',
        '| variant | params (M) | GFLOPs/img infer | GFLOPs/img train | infer img/s | infer x dense | train img/s '
        '| train x dense | infer peak (MiB) | train peak (MiB) |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for v in VARIANTS:
        if v not in res['params']:
            continue
        cells = [v, f'{res["params"][v] / 1e6:.1f}']
        for m in MODES:
            f = res['flops'].get(f'{v}/{m}')
            cells.append('-' if f is None else f'{f / batch / 1e9:.2f}')
        for m in MODES:
            key, ref = f'{v}/{m}', f'dense/{m}'
            if key not in res['times']:
                cells += ['-', '-']
                continue
            cells.append(fmt_mmm([batch / t for t in res['times'][key]], '{:.2f}'))
            if ref not in res['times']:
                cells.append('-')
                continue
            ratio = fmt_mmm(ratio_stats(res, key, ref))
            if cpu:
                ratio += f' [{fmt_mmm(ratio_stats(res, key, ref, "cpu_times"))}]'
            cells.append(ratio)
        for m in MODES:
            b = res['peak_bytes'].get(f'{v}/{m}')
            cells.append('-' if b is None else f'{b / MIB:.0f}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def target_lines(res: Dict[str, Any], device: str) -> List[str]:
    lines = []
    clocks = [('wall clock', 'times')] + ([('CPU time', 'cpu_times')] if _has_cpu_clock(res, device) else [])
    for name, (v, m), (rv, rm), bound in TARGETS:
        key, ref = f'{v}/{m}', f'{rv}/{rm}'
        if key not in res['times'] or ref not in res['times']:
            continue
        parts = []
        for clock_name, clock in clocks:
            lo, med, hi = min_med_max(ratio_stats(res, key, ref, clock))
            parts.append(f'{clock_name} {med:.2f} (min {lo:.2f}, max {hi:.2f}): '
                         f'{"holds" if med >= bound else "MISSED"}')
        lines.append(f'- {res["family"]}: {name} (target >= {bound}): ' + '; '.join(parts))
    return lines


def render(report: Dict[str, Any]) -> str:
    s = report['settings']
    lines = [
        f'Model benchmark: {s["device"]} {s["dtype"]}, batch {s["batch"]}, 224 x 224, {s["experts"]} experts, '
        f'mask {s["mask"]}, {s["repeats"]} interleaved inference rounds, {s.get("train_repeats", s["repeats"])} '
        f'with training',
        '',
        f'- machine: {report["machine"]["cpu"]}' + (f'; {report["machine"]["gpu"]}' if 'gpu' in report['machine']
                                                    else ''),
        f'- software: {report["machine"]["software"]}; torch threads {report["machine"]["threads"]}',
        f'- load average at start {report["machine"]["load_average_at_start"]}, '
        f'after each round: ' + '; '.join(', '.join(r['load_per_round']) for r in report['results']),
        f'- command: `{report["command"]}` ({report["total_s"]:.0f} s)',
        '',
    ]
    for res in report['results']:
        lines += family_table(res, s['batch'], s['device']) + ['']
    targets = [t for res in report['results'] for t in target_lines(res, s['device'])]
    if targets:
        lines += ['Targets (throughput ratio, median over rounds):', ''] + targets + ['']
    return '\n'.join(lines)


def plot(report: Dict[str, Any], path: str) -> None:
    """Throughput ratio to dense per variant and mode, median with a min-max bar, one panel per family; a second row
    by process CPU time when the run recorded it on the CPU."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    s = report['settings']
    results = report['results']
    clocks = [('wall clock', 'times')]
    if all(_has_cpu_clock(res, s['device']) for res in results):
        clocks.append(('process CPU time', 'cpu_times'))
    fig, axes = plt.subplots(len(clocks), len(results), figsize=(5.2 * len(results), 3.6 * len(clocks)),
                             squeeze=False)
    width = 0.38
    for row, (clock_name, clock) in enumerate(clocks):
        for ax, res in zip(axes[row], results):
            variants = [v for v in VARIANTS if v in res['params'] and v != 'dense']
            for j, mode in enumerate(MODES):
                xs, meds, errs = [], [], [[], []]
                for i, v in enumerate(variants):
                    key, ref = f'{v}/{mode}', f'dense/{mode}'
                    if key not in res['times'] or ref not in res['times']:
                        continue
                    lo, med, hi = min_med_max(ratio_stats(res, key, ref, clock))
                    xs.append(i + (j - 0.5) * width)
                    meds.append(med)
                    errs[0].append(med - lo)
                    errs[1].append(hi - med)
                ax.bar(xs, meds, width, yerr=errs, capsize=3, label=mode)
            ax.axhline(1.0, color='k', lw=0.8)
            ax.axhline(0.85, color='tab:red', lw=0.8, ls='--', label='0.85 target (reparam infer)')
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels(variants)
            ax.set_ylabel('throughput / dense')
            ax.set_title(f'{res["family"]}, by {clock_name}', fontsize=10)
            ax.legend(fontsize=7)
            ax.grid(axis='y', alpha=0.3)
    fig.suptitle(f'{s["device"]} {s["dtype"]}, batch {s["batch"]}, {report["machine"]["threads"]} thread(s): median '
                 f'and min-max over rounds ({s["repeats"]} inference, {s.get("train_repeats", s["repeats"])} '
                 f'training)', fontsize=9)
    save_figure(fig, path)


# ---- command line ----

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', choices=sorted(MODELS), default=['vit_s', 'swin_t'],
                   help='model families (default: vit_s swin_t)')
    p.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    p.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    p.add_argument('--batch', type=int, default=32, help='images per step (default: 32)')
    p.add_argument('--repeats', type=int, default=3, help='timed interleaved inference rounds (default: 3)')
    p.add_argument('--train-repeats', type=int, default=2,
                   help='how many of those rounds also time the training steps (default: 2)')
    p.add_argument('--experts', type=int, default=8, help='experts per MoE layer, base included (default: 8)')
    p.add_argument('--mask', choices=['ties', 'dare', 'none'], default='ties',
                   help='mask of the euclid and camex variants (default: ties)')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:i] (default: cpu)')
    p.add_argument('--dtype', choices=sorted(DTYPES), default='float32',
                   help='inference runs in this dtype; training uses autocast to it with float32 weights')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the usable cores)')
    p.add_argument('--quick', action='store_true', help='smoke run: batch 4, 1 round')
    p.add_argument('--profile', metavar='VARIANT:MODE', default=None,
                   help='instead of the benchmark, print a torch.profiler table of one step (first --models entry)')
    p.add_argument('--profile-rows', type=int, default=25)
    p.add_argument('--out', default=None, help='results JSON (default: benchmarks/results/bench_models_<device>_'
                                               '<dtype>_b<batch>.json; nothing is saved with --quick)')
    p.add_argument('--plot', default=None, help='PNG under docs/img, or "none" (default: bench_models_<device>_'
                                                '<dtype>_b<batch>.png; none with --quick)')
    p.add_argument('--report-only', action='store_true', help='print the tables and redraw the plot from --out')
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.train_repeats = 4, 1, 1
    args.mask = None if args.mask == 'none' else args.mask
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if min(args.batch, args.repeats, args.train_repeats, args.threads) < 1 or args.experts < 2:
        p.error('--batch, --repeats, --train-repeats and --threads must be >= 1 and --experts >= 2')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda but torch.cuda.is_available() is False')
    tag = f'{args.device.split(":")[0]}_{args.dtype}_b{args.batch}'
    if args.out is None and not args.quick:
        args.out = os.path.join(RESULTS_DIR, f'bench_models_{tag}.json')
    if args.plot is None and not args.quick:
        args.plot = f'bench_models_{tag}.png'
    if args.plot == 'none':
        args.plot = None
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    command = 'python benchmarks/bench_models.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    if args.report_only:
        with open(args.out) as f:
            report = json.load(f)
    elif args.profile:
        print(profile_step(args.models[0], args.profile, args))
        return
    else:
        start = time.perf_counter()
        machine = machine_info(args.threads, args.device)
        print('\n'.join(f'{k}: {v}' for k, v in machine.items()), flush=True)
        results = [bench_family(family, args) for family in args.models]
        report = dict(
            command=command.strip(), machine=machine, results=results, total_s=time.perf_counter() - start,
            settings=dict(batch=args.batch, repeats=args.repeats, train_repeats=args.train_repeats,
                          experts=args.experts, mask=args.mask,
                          device=args.device, dtype=args.dtype, variants=args.variants, modes=args.modes))
        if args.out:
            ensure_dir(os.path.dirname(args.out))
            with open(args.out, 'w') as f:
                json.dump(report, f, indent=1)
    text = render(report)
    print('\n' + text)
    if args.out:
        with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
            f.write(text + '\n')
    if args.plot:
        plot(report, os.path.join(IMG_DIR, args.plot))


if __name__ == '__main__':
    main()
