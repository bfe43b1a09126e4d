"""Layer benchmark: time and peak memory of one FFN layer under each merge rule (CAMEx method section 10).

Variants, all built for the same sizes (``d -> h -> d``, GELU) with ``N`` experts:

* ``dense``: timm ``Mlp``, the reference every ratio is taken against;
* ``euclid``: ``CAMExMlp(merge='euclidean', mask=None)``, Euclidean merging;
* ``camex``: ``CAMExMlp()`` with its defaults (curvature-aware merging with the TIES mask);
* ``reparam``: ``camex_vision.reparameterize`` applied to a copy of ``camex`` (the test-time form);
* ``smoe``: ``SMoEMlp(top_k=2)``, token-choice top-2 of N;
* ``naive``: ``camex`` recomputed the way the authors' code merges, broadcasting the gates over a materialised
  ``[B, N-1, d_out, d_in]`` tensor of curvature-transformed, masked deltas (``NaiveCAMExMlp`` below). It shares the
  parameters of ``camex``; its outputs (and, on a small layer, every gradient) are checked against ``camex`` before
  anything is timed.

Two modes per variant: ``fwd`` is inference (``eval()`` under ``torch.inference_mode()``), ``train`` is one training
step of the layer (``train()``, forward, backward of a fixed output gradient into the parameters and the input; the
parameter gradients are reset to ``None`` first, so allocating them is part of the step). ``reparam`` is an
inference-only form and is timed in ``fwd`` only (trained, it would be exactly a Euclidean merge without a mask).

Timing is interleaved: each repeat runs every (variant, mode) pair once, in a fresh seeded random order, so a burst of
load from other processes hits all variants alike. Wall-clock and process CPU time are both recorded; ratios are the
median over repeats of the ratio of two pairs timed in the same repeat.

Peak memory is the peak of the CPU allocator's live bytes during one step, above what was live when the step started
(parameters, inputs), read from the allocation events of ``torch.profiler`` with ``profile_memory=True``: every CPU
tensor allocation and free is recorded with its size and time, so their running sum is exactly the bytes held by
tensors (memory that libraries allocate outside it, such as MKL's packing buffers, is not counted). That profiled
step is also each pair's warm-up and is not timed. ``--check-rss`` cross-checks it against the peak resident set size
of one step in a fresh process per pair.

Usage:
    python benchmarks/bench_merge.py                          # ViT-S and ViT-B FFNs, batch 32, 3 repeats
    python benchmarks/bench_merge.py --quick                  # smoke run: ViT-S, batch 8, 2 repeats
    python benchmarks/bench_merge.py --sizes vit_s --repeats 7 --threads 1 --variants dense reparam
"""
import argparse
import copy
import ctypes
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_peak_bytes, load_average, machine_info  # noqa: E402  (puts the checkout on the path)
from timm.layers import Mlp  # noqa: E402

from camex_vision import CAMExMlp, SMoEMlp, reparameterize  # noqa: E402
from camex_vision.core.merge import MergedLinear, ties_mask  # noqa: E402
from camex_vision.core.router import pool_units  # noqa: E402

SIZES = {'vit_s': (384, 1536), 'vit_b': (768, 3072)}  # (embed dim, FFN hidden dim)
SEQ_LEN = 197  # 14 x 14 patches + class token at 224 px
VARIANTS = ('dense', 'euclid', 'camex', 'reparam', 'smoe', 'naive')
MODES = ('fwd', 'train')
INFERENCE_ONLY = {'reparam'}
MIB = 2 ** 20


class NaiveCAMExMlp(nn.Module):
    """CAMEx merged the way the authors' code does it: per-sample weights from a materialised ``[B, N-1, out, in]``.

    ``W_b = E_m + sum_i (s_b * delta)[b, i]`` where ``delta_i = mask_i * M_i(tau_i)`` and the product
    ``s[:, :, None, None] * delta[None]`` exists in memory. Shares every parameter (experts, curvature, router) of
    ``ref``, so it must compute what ``ref`` computes; only how the merge is materialised differs.
    """

    def __init__(self, ref: CAMExMlp):
        super().__init__()
        if ref.router_per != 'ffn' or ref.segment_length is not None:
            raise ValueError('the naive reference covers one router per FFN and per-image routing only')
        for layer in (ref.fc1, ref.fc2):
            if layer.merge != 'camex' or layer.mask != 'ties' or layer.alpha != 1.0 or not layer.owns_base:
                raise ValueError(f'the naive reference covers camex + ties with alpha 1 only, got {layer}')
        self.ref = ref

    @staticmethod
    def _merged(layer: MergedLinear, gates: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        tau = layer.weight_experts - layer.weight_base
        delta = layer.curvature(tau) * ties_mask(tau, layer.density)
        per_sample = gates[:, :, None, None] * delta[None]  # [B, N-1, out, in]: the tensor the core never builds
        weight = layer.weight_base + per_sample.sum(1)
        bias = None
        if layer.has_bias:
            tau_b = layer.bias_experts - layer.bias_base
            bias = layer.bias_base + (gates[:, :, None] * (tau_b * ties_mask(tau_b, layer.density))[None]).sum(1)
        return weight, bias

    @staticmethod
    def _apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.ref
        gates, _ = ref.routers[0](pool_units(x))
        h = ref.norm(ref.drop1(ref.act(self._apply(x, *self._merged(ref.fc1, gates)))))
        return ref.drop2(self._apply(h, *self._merged(ref.fc2, gates)))


def perturb_curvature(module: nn.Module, scale: float = 0.05) -> None:
    """Move every curvature factor away from identity, so the cross-checks exercise the curvature."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'curvature' in name.split('.'):
                p.add_(torch.randn_like(p) * scale)


def build_variants(dim: int, hidden: int, num_experts: int) -> Dict[str, nn.Module]:
    """The benchmarked layers for one FFN size; ``naive`` shares ``camex``'s parameters, ``reparam`` folds a copy."""
    camex = CAMExMlp(dim, hidden, num_experts=num_experts)
    perturb_curvature(camex)
    reparam = reparameterize(copy.deepcopy(camex).eval())
    return {
        'dense': Mlp(dim, hidden),
        'euclid': CAMExMlp(dim, hidden, num_experts=num_experts, merge='euclidean', mask=None),
        'camex': camex,
        'reparam': reparam,
        'smoe': SMoEMlp(dim, hidden, num_experts=num_experts, top_k=2),
        'naive': NaiveCAMExMlp(camex),
    }


# ---- correctness checks (run before timing) ----

def check_outputs(variants: Dict[str, nn.Module], x: torch.Tensor) -> Dict[str, float]:
    """Assert ``naive`` and ``reparam`` give ``camex``'s eval outputs; returns the largest absolute difference."""
    for module in variants.values():
        module.eval()
    errors = {}
    with torch.inference_mode():
        want = variants['camex'](x)
        for name in ('naive', 'reparam'):
            got = variants[name](x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda text: f'{name} != camex: {text}')
            errors[name] = (got - want).abs().max().item()
    return errors


def check_gradients(camex: CAMExMlp, naive: NaiveCAMExMlp, x: torch.Tensor) -> None:
    """Assert ``naive`` gives ``camex``'s training-mode gradients for the input and every parameter."""
    camex.train()
    results = []
    for fn in (camex, naive):
        camex.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(0)  # the same router noise for both
        fn(xi).square().sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in camex.parameters()]
        results.append([xi.grad] + grads)
    names = ['input'] + [n for n, _ in camex.named_parameters()]
    for name, want, got in zip(names, *results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                   msg=lambda text: f'naive != camex, grad {name}: {text}')
    camex.zero_grad(set_to_none=True)


def self_check_small(num_experts: int) -> None:
    """Outputs and every gradient of the naive reference against ``CAMExMlp`` on a small layer."""
    torch.manual_seed(0)
    variants = build_variants(48, 192, num_experts)
    x = torch.randn(4, 9, 48)
    check_outputs(variants, x)
    check_gradients(variants['camex'], variants['naive'], x)


# ---- one step of a variant ----

def make_step(module: nn.Module, mode: str, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """A closure running one ``fwd`` (inference) or ``train`` (forward + backward) step of ``module``."""
    if mode == 'fwd':
        def step():
            module.eval()
            with torch.inference_mode():
                module(x)
    else:
        params = list(module.parameters())

        def step():
            module.train()
            for p in params:
                p.grad = None
            xi = x.detach().requires_grad_()
            module(xi).backward(grad_out)
    return step


# ---- the measurement ----

Key = Tuple[str, str]  # (variant, mode)


@dataclass
class Result:
    wall: Dict[Key, List[float]]  # seconds per repeat
    cpu: Dict[Key, List[float]]  # process CPU seconds (all threads) per repeat
    peaks: Dict[Key, int]  # bytes
    params: Dict[str, int]  # variant -> parameter count

    def ratio(self, a: Key, b: Key, clock: str = 'wall') -> float:
        """Median over repeats of ``time(a) / time(b)``, both timed in the same repeat."""
        times = getattr(self, clock)
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def bench_size(dim: int, hidden: int, args: argparse.Namespace) -> Result:
    torch.manual_seed(0)
    variants = build_variants(dim, hidden, args.experts)
    x = torch.randn(args.batch, SEQ_LEN, dim)
    grad_out = torch.randn(args.batch, SEQ_LEN, dim)
    errors = check_outputs(variants, x)
    print(f'  checks: eval outputs |naive - camex| <= {errors["naive"]:.1e}, |reparam - camex| <= '
          f'{errors["reparam"]:.1e}')

    keys = [(v, m) for v in args.variants for m in MODES if not (m == 'train' and v in INFERENCE_ONLY)]
    steps = {key: make_step(variants[key[0]], key[1], x, grad_out) for key in keys}
    peaks = {key: cpu_peak_bytes(steps[key]) for key in keys}  # doubles as the warm-up: this pass is not timed

    wall: Dict[Key, List[float]] = {key: [] for key in keys}
    cpu: Dict[Key, List[float]] = {key: [] for key in keys}
    for rep in range(args.repeats):
        order = list(keys)
        random.Random(rep).shuffle(order)
        for key in order:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[key]()
            cpu[key].append(time.process_time() - c0)
            wall[key].append(time.perf_counter() - w0)
    params = {v: sum(p.numel() for p in m.parameters()) for v, m in variants.items()}
    params['naive'] = params['camex']  # shared
    return Result(wall, cpu, peaks, params)


def disable_malloc_mmap() -> None:
    """glibc: serve every allocation from the heap and keep freed memory (``mallopt``), as jemalloc or tcmalloc do.

    By default glibc maps each allocation above 32 MiB fresh from the kernel and unmaps it on free, so every large
    temporary pays page faults and zeroing on first touch (about 2 GiB/s here, against about 18 GiB/s for writing
    memory the process already holds).
    """
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)):
        raise RuntimeError('mallopt failed')


# ---- checking the memory measure against a fresh process's peak RSS ----

def rss_probe(args: argparse.Namespace) -> None:
    """Child process: build the variants, run one step of one, print its peak-RSS increase in bytes.

    A first step runs unmeasured (thread pools, library workspaces), then ``malloc_trim`` hands every free heap page
    back to the kernel (so the step cannot reuse pages that are resident but free) and the kernel's peak-RSS mark
    (``VmHWM``) is reset by writing 5 to ``/proc/self/clear_refs``; the second step is measured.
    """
    torch.set_num_threads(args.threads)
    dim, hidden = SIZES[args.sizes[0]]
    torch.manual_seed(0)
    module = build_variants(dim, hidden, args.experts)[args.rss_probe[0]]
    x = torch.randn(args.batch, SEQ_LEN, dim)
    step = make_step(module, args.rss_probe[1], x, torch.randn_like(x))
    step()
    for p in module.parameters():
        p.grad = None
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    before = _proc_status_bytes('VmRSS')
    step()
    print(_proc_status_bytes('VmHWM') - before)


def _proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        line = next(line for line in f if line.startswith(field + ':'))
    return int(line.split()[1]) * 1024


def check_rss(args: argparse.Namespace, result: Result) -> List[str]:
    """Peak-RSS increase of one step of each pair in a fresh process (see ``rss_probe``), beside the allocator peak.

    Two children per pair: one with glibc's defaults, and one with ``MALLOC_MMAP_THRESHOLD_=131072``, which pins the
    threshold so that every block of 128 KiB or more is mapped on allocation and unmapped on free. In the second, RSS
    follows the live tensor bytes page by page and must agree with the allocator peak; the first shows what heap
    fragmentation adds in a default process.
    """
    size = args.sizes[0]
    lines = [f'Peak-RSS increase of one step in a fresh process vs allocator peak ({size}, batch {args.batch}), MiB:',
             '', '| variant | mode | allocator peak | RSS, fixed mmap threshold | RSS, glibc defaults |',
             '| --- | --- | ---: | ---: | ---: |']
    for key in result.peaks:
        cmd = [sys.executable, os.path.abspath(__file__), '--sizes', size, '--batch', str(args.batch),
               '--threads', str(args.threads), '--experts', str(args.experts), '--rss-probe', *key]
        env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
        rss = [int(subprocess.run(cmd, capture_output=True, text=True, check=True, env=e).stdout.split()[-1])
               for e in ({**env, 'MALLOC_MMAP_THRESHOLD_': '131072'}, env)]
        cells = [key[0], key[1]] + [f'{b / MIB:.1f}' for b in (result.peaks[key], *rss)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


# ---- reporting ----

def machine_lines(args: argparse.Namespace) -> List[str]:
    info = machine_info(args.threads)
    malloc = 'heap only (--no-mmap)' if args.no_mmap else 'system'
    return [f'CPU: {info["cpu"]}', f'{info["software"]}, torch threads {args.threads}, malloc {malloc}']


def format_table(size: str, res: Result, args: argparse.Namespace) -> List[str]:
    dim, hidden = SIZES[size]
    lines = [
        f'{size}: d={dim}, h={hidden}, L={SEQ_LEN}, batch {args.batch}, N={args.experts}, float32, {args.repeats} '
        f'repeats. Wall-clock ms (min / median); x dense = median of per-repeat ratios to dense, by wall-clock and by '
        f'process CPU time; peak = allocator peak above parameters and inputs.',
        '',
        '| variant | params (M) | fwd min | fwd median | fwd x dense | (CPU) | train min | train median '
        '| train x dense | (CPU) | fwd peak (MiB) | train peak (MiB) |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for v in args.variants:
        cells = [v, f'{res.params[v] / 1e6:.2f}']
        for m in MODES:
            key = (v, m)
            if key not in res.wall:
                cells += ['-'] * 4
                continue
            ts = res.wall[key]
            cells += [f'{min(ts) * 1e3:.1f}', f'{statistics.median(ts) * 1e3:.1f}',
                      f'{res.ratio(key, ("dense", m)):.2f}', f'{res.ratio(key, ("dense", m), "cpu"):.2f}']
        cells += [f'{res.peaks[(v, m)] / MIB:.1f}' if (v, m) in res.peaks else '-' for m in MODES]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def format_targets(size: str, res: Result, args: argparse.Namespace) -> List[str]:
    """The issue's targets that the measured variants cover, each with its measured ratio and bound."""
    targets = [  # (name, clock or 'memory', numerator, denominator, op, bound)
        ('reparameterised CAMEx inference / dense', 'time', ('reparam', 'fwd'), ('dense', 'fwd'), '<=', 1.15),
        ('CAMEx training step / Euclidean merged', 'time', ('camex', 'train'), ('euclid', 'train'), '<=', 1.5),
        ('naive / CAMEx time, inference', 'time', ('naive', 'fwd'), ('camex', 'fwd'), '>=', 2.0),
        ('naive / CAMEx time, training step', 'time', ('naive', 'train'), ('camex', 'train'), '>=', 2.0),
        ('CAMEx / naive peak memory, inference', 'memory', ('camex', 'fwd'), ('naive', 'fwd'), '<=', 0.5),
        ('CAMEx / naive peak memory, training step', 'memory', ('camex', 'train'), ('naive', 'train'), '<=', 0.5),
    ]
    note = '' if args.batch == 32 else f' (the targets are stated for batch 32; this is batch {args.batch})'
    lines = [f'Targets ({size}), time ratios as median of per-repeat ratios{note}:', '']
    for name, kind, a, b, op, bound in targets:
        if a not in res.peaks or b not in res.peaks:
            continue
        if kind == 'time':
            value = res.ratio(a, b)
            detail = f'{value:.2f} wall ({res.ratio(a, b, "cpu"):.2f} CPU time)'
        else:
            value = res.peaks[a] / res.peaks[b]
            detail = f'{value:.2f}'
        ok = value <= bound if op == '<=' else value >= bound
        lines.append(f'- {name}: {detail}, target {op} {bound}: {"holds" if ok else "MISSES"}')
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', choices=sorted(SIZES), default=['vit_s', 'vit_b'],
                        help='FFN sizes: vit_s = 384/1536, vit_b = 768/3072 (default: both)')
    parser.add_argument('--batch', type=int, default=32, help='images per batch (default: 32)')
    parser.add_argument('--repeats', type=int, default=3, help='interleaved timing rounds (default: 3)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: the usable cores)')
    parser.add_argument('--experts', type=int, default=8, help='N, experts per merged linear incl. base (default: 8)')
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS),
                        help='variants to measure; dense is always included (default: all)')
    parser.add_argument('--quick', action='store_true', help='smoke run: vit_s, batch 8, 2 repeats')
    parser.add_argument('--no-mmap', action='store_true',
                        help='glibc: never return large blocks to the kernel (no page faults on fresh tensors)')
    parser.add_argument('--check-rss', action='store_true',
                        help='also measure each step\'s peak-RSS increase in a fresh process (first size only)')
    parser.add_argument('--rss-probe', nargs=2, metavar=('VARIANT', 'MODE'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.repeats = ['vit_s'], 8, 2
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    args.variants = [v for v in VARIANTS if v in set(args.variants) | {'dense'}]
    for name in ('batch', 'repeats', 'threads', 'experts'):
        if getattr(args, name) < (2 if name == 'experts' else 1):
            parser.error(f'--{name} is too small')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.no_mmap:
        disable_malloc_mmap()
    if args.rss_probe:
        rss_probe(args)
        return
    torch.set_num_threads(args.threads)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    print('\n'.join(machine_lines(args)))
    print(f'command: python benchmarks/bench_merge.py {" ".join(sys.argv[1:] if argv is None else argv)}')
    print(f'start: load average {load_average()}')
    self_check_small(args.experts)
    print('checks: naive and reparam == camex on a small layer (outputs; every gradient of naive)')
    results = {}
    for size in args.sizes:
        print(f'benchmarking {size} ...', flush=True)
        results[size] = bench_size(*SIZES[size], args)
    for size in args.sizes:
        print('\n' + '\n'.join(format_table(size, results[size], args)))
        print('\n' + '\n'.join(format_targets(size, results[size], args)))
    if args.check_rss:
        print('\n' + '\n'.join(check_rss(args, results[args.sizes[0]])))
    print(f'\nend: load average {load_average()}; total {time.perf_counter() - start_wall:.0f} s wall, '
          f'{time.process_time() - start_cpu:.0f} s CPU')


if __name__ == '__main__':
    main()
