"""PNG plots of a run's ``summary.csv``: learning curves and one expert-usage heatmap per MoE layer.

Usable on any finished or running output folder: ``python -m camex_vision.train.plots output/train/<run>``.
"""
import argparse
import csv
import io
import os
from typing import Dict, List, Optional

from .checkpoint import atomic_write
from .metrics import parse_usage_columns

CURVES = 'learning_curves.png'
USAGE = 'expert_usage.png'


def read_summary(path: str) -> List[Dict[str, str]]:
    with open(path, newline='', encoding='utf-8') as f:
        return [row for row in csv.DictReader(f)]


def _values(rows: List[Dict[str, str]], key: str) -> Optional[List[float]]:
    if not rows or key not in rows[0]:
        return None
    return [float(r[key]) if r.get(key) not in (None, '') else float('nan') for r in rows]


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_learning_curves(rows: List[Dict[str, str]], path: str, title: str = '') -> None:
    """Losses (train, aux, eval), top-1/top-5, learning rate and throughput against the epoch."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(float(r['epoch'])) for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    panels = (
        ('loss', [('train_loss', 'train'), ('eval_loss', 'eval'), ('eval_ema_loss', 'eval (EMA)')], False),
        ('accuracy (%)', [('eval_top1', 'top-1'), ('eval_top5', 'top-5'), ('eval_ema_top1', 'top-1 (EMA)')], False),
        ('balance loss', [('train_aux_loss', 'train aux')], False),
        ('learning rate', [('lr', 'lr')], True),
    )
    for ax, (ylabel, series, log) in zip(axes, panels):
        for key, label in series:
            values = _values(rows, key)
            if values is not None:
                ax.plot(epochs, values, marker='o', label=label)
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log and any(v > 0 for v in (_values(rows, 'lr') or [])):
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc='best')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_expert_usage(rows: List[Dict[str, str]], path: str, prefix: str = 'train_usage', title: str = '') -> bool:
    """One heatmap per MoE layer (experts x epochs, mean gate); returns False when the run has no MoE layers."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not rows:
        return False
    layers = parse_usage_columns(rows[0], prefix)
    if not layers:
        return False
    epochs = [int(float(r['epoch'])) for r in rows]
    per_row = [parse_usage_columns(r, prefix) for r in rows]
    n = len(layers)
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, layers):
        experts = sorted(layers[name])
        grid = [[per_row[j].get(name, {}).get(e, float('nan')) for j in range(len(rows))] for e in experts]
        image = ax.imshow(grid, aspect='auto', cmap='viridis', origin='lower', vmin=0.,
                          extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, len(experts) - 0.5))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('epoch')
        ax.set_ylabel('domain expert')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    sizes = sorted({len(experts) for experts in layers.values()})
    uniform = ', '.join(f'{1. / k:.3f}' for k in sizes)
    fig.suptitle(f'{title + ": " if title else ""}mean router score per domain expert (uniform: {uniform})')
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_run(output_dir: str, title: str = '') -> List[str]:
    """Writes the plots of ``output_dir/summary.csv`` next to it; returns the files written."""
    summary = os.path.join(output_dir, 'summary.csv')
    if not os.path.isfile(summary):
        return []
    rows = read_summary(summary)
    if not rows:
        return []
    written = [os.path.join(output_dir, CURVES)]
    plot_learning_curves(rows, written[0], title)
    usage_path = os.path.join(output_dir, USAGE)
    if plot_expert_usage(rows, usage_path, title=title):
        written.append(usage_path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Plot a training run\'s summary.csv')
    parser.add_argument('output_dir', help='the run folder holding summary.csv')
    args = parser.parse_args(argv)
    for path in plot_run(args.output_dir, os.path.basename(os.path.normpath(args.output_dir))):
        print(path)


if __name__ == '__main__':
    main()
