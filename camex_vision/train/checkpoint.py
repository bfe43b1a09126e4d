"""Checkpoints that never lose work: atomic writes, ``weights_only`` loading, exact resume, safetensors export.

Every file is written to a temporary name in the target folder, flushed to disk and renamed over the target, so a
reader (or a run killed at any instant) sees either the old file or the new one, never a torn one. History and
best-checkpoint bookkeeping is timm's ``CheckpointSaver``; ``AtomicCheckpointSaver`` only replaces how files are
written, linked and what they contain.

Checkpoints hold plain values only (tensors, numbers, strings, lists, dicts; arguments as a dict, not an argparse
``Namespace``), so ``torch.load(path, weights_only=True)`` reads them. Keys:

* ``state_dict``, ``state_dict_ema``: model and EMA weights; ``optimizer``, ``scheduler``, ``amp_scaler``: their
  ``state_dict()``; ``rng``: one random-number-generator state per rank (torch, CUDA, numpy, python);
* ``epoch`` (last completed epoch), ``num_updates``, ``metric``, ``saver`` (timm's history), ``version`` (2);
* ``arch``, ``args``, ``model_kwargs``, ``num_classes``, ``class_names``, ``data_config``: what ``validate.py`` needs
  to rebuild the model and its preprocessing without further arguments.
"""
import logging
import os
import pickle
import random
import shutil
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from timm.utils import CheckpointSaver
from torch import nn

from .errors import InputError

_logger = logging.getLogger(__name__)

EXTENSION = '.pth.tar'
LAST = 'last' + EXTENSION
BEST = 'model_best' + EXTENSION
PARTIAL = '.partial-'
RUN_FILES = ('args.yaml', 'summary.csv', LAST, BEST)
"""Files whose presence marks a folder as holding a training run."""


# ---- atomic files ----

def fsync_dir(path: str) -> None:
    """Makes a rename in ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _partial_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f'.{name}{PARTIAL}{os.getpid()}')


def atomic_write(path: str, write_fn: Callable[[Any], None], binary: bool = True) -> None:
    """Writes ``path`` through ``write_fn(file)`` to a temporary name, fsyncs it and renames it into place.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    tmp = _partial_name(path)
    try:
        with open(tmp, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a torn file at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def remove_partial_files(folder: str) -> List[str]:
    """Deletes temporary files a killed writer left in ``folder`` (and timm's ``tmp.pth.tar``); returns them."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if PARTIAL in name or name == 'tmp' + EXTENSION:
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


# ---- plain values ----

def plain(value: Any) -> Any:
    """A ``weights_only``-loadable copy of ``value``: containers of str/int/float/bool/None/tensors; others as str."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def rng_state() -> Dict[str, Any]:
    """This process's random-number-generator states, as plain values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        'python': [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what ``rng_state`` captured."""
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _copy_file(src: str, dst: str) -> None:
    with open(src, 'rb') as fin, open(dst, 'wb') as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


# ---- the saver ----

class AtomicCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` (``last``, ``model_best`` and a bounded, ranked ``checkpoint-N`` history) with
    atomic writes, atomic links and ``weights_only``-loadable contents.

    Args:
        state_fn: returns the checkpoint contents for an epoch (everything but ``epoch``, ``metric``, ``saver`` and
            ``version``, which the saver adds).
        checkpoint_dir: the run's output folder.
        decreasing: a lower metric is better.
        max_history: number of ``checkpoint-N`` files kept (the best ones by metric).
    """

    def __init__(
            self,
            state_fn: Callable[[int], Dict[str, Any]],
            checkpoint_dir: str,
            decreasing: bool = False,
            max_history: int = 10,
    ):
        super().__init__(
            model=None, optimizer=None, checkpoint_dir=checkpoint_dir, recovery_dir=checkpoint_dir,
            decreasing=decreasing, max_history=max_history)
        self.state_fn = state_fn

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state = self.state_fn(epoch)
        state.update(epoch=epoch, metric=metric, saver=plain(self.state_dict(epoch, metric)), version=2)
        atomic_save(state, save_path)

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        fsync_dir(self.checkpoint_dir)

    def _duplicate(self, src: str, dst: str) -> None:
        tmp = _partial_name(dst)
        try:
            if self.can_hardlink:
                try:
                    os.link(src, tmp)
                except OSError:
                    self.can_hardlink = False
            if not self.can_hardlink:
                _copy_file(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise
        fsync_dir(self.checkpoint_dir)


# ---- loading ----

def resolve_checkpoint(path: str, prefer: Iterable[str] = (BEST, LAST)) -> str:
    """A checkpoint file: ``path`` itself, or the first of ``prefer`` (then ``model.safetensors``) in a folder.

    Raises:
        InputError: missing path, or a folder with no checkpoint in it.
    """
    if not os.path.exists(path):
        raise InputError(f'checkpoint {path} does not exist')
    if os.path.isfile(path):
        return path
    for name in list(prefer) + ['model.safetensors']:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise InputError(f'no checkpoint in folder {path} (looked for {", ".join(list(prefer) + ["model.safetensors"])})')


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Loads a training checkpoint, a plain state dict or a ``.safetensors`` file with ``weights_only=True``.

    Returns a dict with at least ``state_dict``; training checkpoints keep all their keys. A ``.safetensors`` file's
    string metadata is returned under ``metadata``.

    Raises:
        InputError: missing, empty, truncated or corrupt files, or files that need unsafe unpickling.
    """
    path = resolve_checkpoint(path)
    if os.path.getsize(path) == 0:
        raise InputError(f'checkpoint {path} is empty')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework='pt') as f:
                return {'state_dict': {k: f.get_tensor(k) for k in f.keys()}, 'metadata': f.metadata() or {}}
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f'checkpoint {path} is corrupt or truncated: {e}') from e
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' in str(e) or 'GLOBAL' in str(e):
            raise InputError(f'checkpoint {path} holds arbitrary Python objects and cannot be loaded with '
                             f'weights_only=True: {_first_sentence(e)}') from e
        raise InputError(f'checkpoint {path} is corrupt or truncated (not a readable PyTorch file)') from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise InputError(f'checkpoint {path} is corrupt or truncated: {_first_sentence(e)}') from e
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {'state_dict': obj}
    raise InputError(f'{path} is not a model checkpoint (expected a state dict or a dict with "state_dict")')


def _first_sentence(error: BaseException) -> str:
    text = ' '.join(str(error).split()) or type(error).__name__
    end = text.find('. ')
    return text[:end + 1] if end > 0 else text


def clean_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strips the ``module.`` prefix DistributedDataParallel and EMA wrappers add."""
    return {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def classifier_outputs(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[int]:
    """Number of classes a state dict's classifier predicts, found through the model's ``pretrained_cfg``."""
    names = getattr(model, 'pretrained_cfg', {}).get('classifier') or 'head'
    for name in (names if isinstance(names, (list, tuple)) else (names,)):
        weight = state_dict.get(f'{name}.weight')
        if weight is not None:
            return int(weight.shape[0])
    return None


def load_model_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state_dict)`` with a clear message for missing, unexpected or mis-shaped entries.

    Raises:
        InputError: the state dict does not fit the model.
    """
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
            if keys:
                parts.append(f'{label}: {", ".join(keys[:5])}' + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else ''))
        raise InputError(f'weights in {source} do not fit model {type(model).__name__} ({"; ".join(parts)}); '
                         f'check --model and --model-kwargs')
    model.load_state_dict(state_dict)


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None):
    """Writes ``state_dict`` as ``.safetensors`` (contiguous copies, shared storage broken), atomically."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    data = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda f: f.write(data))
