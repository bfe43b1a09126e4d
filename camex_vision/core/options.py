"""Validation of merge options.

Every option of the merge core is a plain, JSON-serialisable value. The helpers here reject bad values with a
``ValueError`` that names the option, the value given and what is allowed, so a typo in a config file fails at
construction time, never silently.
"""
import math
from typing import Any, Iterable, Optional

MERGES = ('euclidean', 'camex')
MASKS = (None, 'ties', 'dare')
DARE_MODES = ('expert', 'element')
ROUTER_PER = ('ffn', 'linear')
FIRST_SEGMENT = ('prior', 'uniform', 'own')


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not supported; expected one of {allowed}')
    return value


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{name}={value!r} must be an int')
    if value < low or (high is not None and value > high):
        bound = f'>= {low}' if high is None else f'in {low}..{high}'
        raise ValueError(f'{name}={value!r} is out of range; expected an int {bound}')
    return value


def check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'{name}={value!r} must be a finite number')
    return float(value)


def check_unit_interval(name: str, value: Any, closed_low: bool, closed_high: bool) -> float:
    value = check_finite(name, value)
    ok_low = value >= 0. if closed_low else value > 0.
    ok_high = value <= 1. if closed_high else value < 1.
    if not (ok_low and ok_high):
        interval = ('[' if closed_low else '(') + '0, 1' + (']' if closed_high else ')')
        raise ValueError(f'{name}={value!r} is out of range; expected a value in {interval}')
    return value


def check_num_experts(num_experts: Any) -> int:
    """N counts the base expert too, so a merging layer needs N >= 2 (one base, at least one domain expert)."""
    return check_int('num_experts', num_experts, 2)


def resolve_top_k(top_k: Optional[int], num_experts: int) -> int:
    """``top_k`` selects among the N-1 domain experts; ``None`` means all of them (the paper's setting)."""
    if top_k is None:
        return num_experts - 1
    return check_int('top_k', top_k, 1, num_experts - 1)
