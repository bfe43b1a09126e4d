"""Helpers of the training and validation scripts (``train_vision.py``, ``validate.py``).

* ``data``: finding datasets offline (Fashion-MNIST from ``--data-dir``, ``./data`` or the Debian package), dataset
  views with strict image loading, image checks;
* ``checkpoint``: atomic files, the atomic checkpoint saver, ``weights_only`` loading, RNG state, safetensors;
* ``distributed``: process-group set-up (torchrun), reductions, primary-only decisions;
* ``metrics``: top-1/top-5 (torchmetrics), loss and expert-usage meters reduced across ranks;
* ``plots``: learning curves and expert-usage heatmaps from ``summary.csv``;
* ``factory``: model creation with clear errors; ``progress``: progress bars or log lines;
* ``synthetic``: small synthetic image folders for smoke tests; ``errors``: ``InputError`` (exit status 2).
"""
from .errors import EXIT_BAD_INPUT, InputError, describe

__all__ = ['EXIT_BAD_INPUT', 'InputError', 'describe']
