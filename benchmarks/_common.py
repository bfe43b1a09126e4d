"""Helpers shared by the model benchmark (``bench_models.py``) and the Fashion-MNIST study (``reproduce_fmnist.py``).

* what the machine and software are (recorded with every result);
* summaries of repeated measurements (min / median / max);
* FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` and peak memory read from ``torch.profiler``'s
  allocation events (CPU) or the CUDA caching allocator;
* Fashion-MNIST read from the IDX files into uint8 tensors (no torchvision dataset objects, no decoding per step).
"""
import csv
import gzip
import os
import platform
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, 'benchmarks', 'results')
IMG_DIR = os.path.join(REPO, 'docs', 'img')
MIB = 2 ** 20

try:
    import camex_vision  # noqa: F401  (registers the camex_* models)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, REPO)
    import camex_vision  # noqa: F401
import timm  # noqa: E402
from camex_vision.core import release_merge_scratch  # noqa: E402


# ---- machine and software ----

def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'unknown')
    except OSError:
        return platform.processor() or 'unknown'


def git_revision() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ('+dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine_info(threads: int, device: str = 'cpu') -> Dict[str, str]:
    """What a result was measured on, as plain strings (stored with the results and printed in every report)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    info = {
        'cpu': f'{cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), {platform.machine()}',
        'software': (f'Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, '
                     f'camex_vision {camex_vision.__version__} (git {git_revision()})'),
        'threads': str(threads),
        'load_average_at_start': ' '.join(f'{v:.2f}' for v in os.getloadavg()),
    }
    if device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = f'{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}'
    return info


def load_average() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


# ---- models ----

def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` without its removal of ``None``-valued kwargs, checked against the built model.

    ``timm.create_model`` drops every kwarg whose value is ``None`` (so that model defaults apply), which turns the
    ``camex_*`` models' ``mask=None`` into their default ``mask='ties'``. Calling the registered entry point keeps
    ``None``; the MoE options the model reports (``moe_config``) are then checked against the request.
    """
    model = timm.models.model_entrypoint(name)(pretrained=pretrained, **kwargs)
    config = getattr(model, 'moe_config', None)
    if config is not None:
        wrong = {k: (v, config[k]) for k, v in kwargs.items() if k in config and config[k] != v}
        if wrong:
            raise RuntimeError(f'{name}: requested and built MoE options differ (requested, built): {wrong}')
    return model


# ---- summaries ----

def min_med_max(values: Sequence[float]) -> Tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt_mmm(values: Sequence[float], fmt: str = '{:.2f}') -> str:
    """``median (min-max)`` of repeated measurements."""
    lo, med, hi = min_med_max(values)
    return f'{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})'


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- FLOPs and memory ----

def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], None]) -> int:
    """Floating-point operations of ``fn()`` as counted by ``FlopCounterMode`` (2 per multiply-add of every matmul,
    bmm, convolution and attention; elementwise ops are not counted, as in every FLOP counter of this kind).

    ``FlopCounterMode`` has formulas for the CUDA attention kernels but not for the CPU one
    (``_scaled_dot_product_flash_attention_for_cpu``); the same formulas are registered for it here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with counter:
        fn()
    return counter.get_total_flops()


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the CPU allocator's live bytes during ``fn()``, above the bytes live when it started.

    ``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and free with its size; their
    running sum in time order is the live-byte curve. The merge core's scratch buffer for inference passes is freed
    first, so that its allocation (when ``fn`` runs a merging model without gradients) is part of the peak.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    release_merge_scratch()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == 'cpu':
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA memory allocated during ``fn()``, above what was allocated when it started."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


# ---- Fashion-MNIST ----

FMNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
DEFAULT_FMNIST_DIR = '/usr/share/datasets/fashion-mnist'


def _find_idx(data_dir: str, stem: str) -> str:
    """``stem`` or ``stem.gz`` in ``data_dir`` or in torchvision's ``FashionMNIST/raw`` layout below it."""
    for folder in (data_dir, os.path.join(data_dir, 'raw'), os.path.join(data_dir, 'FashionMNIST', 'raw')):
        for name in (stem, stem + '.gz'):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f'{stem}[.gz] not found in {data_dir} (nor in its raw/ or FashionMNIST/raw/ folders); pass --data-dir with '
        f'the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist installs them in {DEFAULT_FMNIST_DIR})')


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor: ``[n, rows, cols]`` images or ``[n]`` labels."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    magic = int.from_bytes(data[:4], 'big')
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f'{path}: not an unsigned-byte IDX file (magic {magic:#x})')
    ndim = magic & 0xff
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f'{path}: header says {shape}, found {array.size} values')
    return torch.from_numpy(array.reshape(shape).copy())


def load_fashion_mnist(data_dir: str) -> Dict[str, torch.Tensor]:
    """The official splits: ``train_images [60000, 28, 28]``, ``train_labels [60000]``, ``test_*`` (10000), uint8."""
    out = {key: read_idx(_find_idx(data_dir, stem)) for key, stem in FMNIST_FILES.items()}
    for split, n in (('train', 60000), ('test', 10000)):
        if out[f'{split}_images'].shape != (n, 28, 28) or out[f'{split}_labels'].shape != (n,):
            raise ValueError(f'unexpected Fashion-MNIST {split} shapes {tuple(out[f"{split}_images"].shape)}, '
                             f'{tuple(out[f"{split}_labels"].shape)}')
    return out


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of the first ``per_class`` images of each class in a fixed random order of ``labels``."""
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    picked: List[torch.Tensor] = []
    for c in range(int(labels.max()) + 1):
        idx = order[labels[order] == c][:per_class]
        if idx.numel() < per_class:
            raise ValueError(f'class {c} has only {idx.numel()} images, {per_class} requested')
        picked.append(idx)
    return torch.cat(picked).sort().values


def optional_device_sync(device: torch.device) -> Callable[[], None]:
    """A function waiting for queued work on ``device`` (a no-op on the CPU), for wall-clock timing."""
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def ensure_dir(path: Optional[str]) -> None:
    if path:
        os.makedirs(path, exist_ok=True)


# ---- result files ----

def read_rows(path: str) -> List[Dict[str, str]]:
    """The rows of a results CSV (none when it does not exist yet)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def append_row(path: str, row: Dict[str, Any], fieldnames: Sequence[str]) -> None:
    """Append one finished run to a results CSV (header first when new) and sync it to disk: a study killed
    mid-way keeps every run it finished, which is what makes it resumable."""
    new = not os.path.isfile(path)
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def method_color(method: str) -> str:
    """Plot colour of a row of the paper's tables: gray Vanilla, orange SMoE, red curvature-aware, blue Euclidean."""
    if method == 'Vanilla':
        return 'tab:gray'
    if method == 'SMoE':
        return 'tab:orange'
    return 'tab:red' if method.endswith('-CA') or method == 'Dynamic' else 'tab:blue'


def save_figure(fig, path: str) -> None:
    """Lay out, write (dpi 120) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    ensure_dir(os.path.dirname(path))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'plot -> {path}', flush=True)
