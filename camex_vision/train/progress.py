"""Progress reporting: a tqdm bar on a terminal, plain log lines every ``log_interval`` steps otherwise."""
import logging
import os
import sys
import time
from typing import Optional

_logger = logging.getLogger('train')


def use_progress_bar(mode: str = 'auto') -> bool:
    """``auto``: a bar only when stderr is a terminal with a width (never in logs, CI or pipes)."""
    if mode != 'auto':
        return mode == 'bar'
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        return False


class Progress:
    """Reports the steps of one pass over a loader.

    Args:
        total: number of steps.
        desc: prefix of every line, e.g. ``'Train 3/10'``.
        enabled: False on non-primary ranks (nothing is reported).
        bar: a tqdm bar instead of log lines.
        log_interval: steps between log lines (the first and last step are always logged).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, bar: bool = False, log_interval: int = 50):
        self.total, self.desc, self.enabled, self.log_interval = total, desc, enabled, max(1, log_interval)
        self.start = time.time()
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def wants(self, step: int) -> bool:
        """Whether ``update(step, ...)`` will show something (so callers can skip computing the values)."""
        if not self.enabled:
            return False
        return self.bar is not None or step == 0 or step + 1 == self.total or (step + 1) % self.log_interval == 0

    def update(self, step: int, images: Optional[int] = None, **values) -> None:
        """Reports step ``step`` (0-based) with ``values`` (floats shown with 4 significant digits)."""
        if not self.wants(step):
            return
        text = {k: (f'{v:.4g}' if isinstance(v, float) else str(v)) for k, v in values.items()}
        if images is not None:
            text['img/s'] = f'{images / max(time.time() - self.start, 1e-9):.0f}'
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(step + 1 - self.bar.n)
        else:
            fields = '  '.join(f'{k}: {v}' for k, v in text.items())
            percent = 100. * (step + 1) / self.total
            _logger.info(f'{self.desc} [{step + 1:>4d}/{self.total} ({percent:>3.0f}%)]  {fields}')

    def close(self) -> float:
        """Closes the bar and returns the seconds since the pass started."""
        if self.bar is not None:
            self.bar.close()
        return time.time() - self.start
