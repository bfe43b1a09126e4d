"""Classification and regression metrics, and which of them GLUE reports for each task.

Plain Python on lists (no scikit-learn or SciPy needed); the formulas are the ones scikit-learn and SciPy use.
"""
import math
from typing import Dict, List, Sequence, Tuple

# GLUE's official metrics per task (Wang et al., 2019): what ``evaluate.load('glue', task)`` reports
GLUE_METRICS: Dict[str, Tuple[str, ...]] = {
    'cola': ('matthews_correlation',),
    'sst2': ('accuracy',),
    'mrpc': ('accuracy', 'f1'),
    'qqp': ('accuracy', 'f1'),
    'stsb': ('pearson', 'spearmanr'),
    'mnli': ('accuracy',),
    'qnli': ('accuracy',),
    'rte': ('accuracy',),
    'wnli': ('accuracy',),
}


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    _check(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def f1(preds: Sequence[int], labels: Sequence[int], num_classes: int = 2) -> float:
    """Binary F1 of class 1 for two classes (GLUE's MRPC/QQP F1), macro-averaged F1 for more."""
    _check(preds, labels)
    classes = [1] if num_classes == 2 else list(range(num_classes))
    scores = []
    for c in classes:
        tp = sum(int(p == c and y == c) for p, y in zip(preds, labels))
        fp = sum(int(p == c and y != c) for p, y in zip(preds, labels))
        fn = sum(int(p != c and y == c) for p, y in zip(preds, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.)
    return sum(scores) / len(scores)


def matthews_correlation(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin, 2004); 0 when undefined."""
    _check(preds, labels)
    classes = sorted(set(preds) | set(labels))
    s = len(labels)
    c = sum(int(p == y) for p, y in zip(preds, labels))
    t = [sum(int(y == k) for y in labels) for k in classes]
    p = [sum(int(q == k) for q in preds) for k in classes]
    numerator = c * s - sum(pk * tk for pk, tk in zip(p, t))
    denominator = math.sqrt((s * s - sum(pk * pk for pk in p)) * (s * s - sum(tk * tk for tk in t)))
    return numerator / denominator if denominator else 0.


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 when either input is constant."""
    _check(x, y)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx, vy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.


def _ranks(x: Sequence[float]) -> List[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    _check(x, y)
    return pearson(_ranks(x), _ranks(y))


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_classes: int,
                           task: str = '') -> Dict[str, float]:
    """GLUE's metrics for ``task``, or accuracy, F1 and Matthews correlation for any other classification task."""
    names = GLUE_METRICS.get(task, ('accuracy', 'f1', 'matthews_correlation'))
    funcs = {'accuracy': lambda: accuracy(preds, labels), 'f1': lambda: f1(preds, labels, num_classes),
             'matthews_correlation': lambda: matthews_correlation(preds, labels)}
    return {name: funcs[name]() for name in names}


def regression_metrics(preds: Sequence[float], labels: Sequence[float]) -> Dict[str, float]:
    """Pearson and Spearman correlation (GLUE's STS-B metrics)."""
    return {'pearson': pearson(preds, labels), 'spearmanr': spearman(preds, labels)}


def _check(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f'{len(a)} predictions but {len(b)} labels')
    if not len(a):
        raise ValueError('no predictions to score')
