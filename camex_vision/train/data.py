"""Datasets for the training and validation scripts: finding them offline, checking them, viewing them.

Two dataset kinds are supported, both map-style:

* image folders (``--dataset ''``, timm's ``ImageDataset``): ``root/<split>/<class>/<image>``, or a ``.tar`` of the
  same layout, with timm's split search (``validation`` also finds ``val``);
* torchvision datasets (``torch/fashion_mnist``, ``torch/mnist``, ``torch/kmnist``, ``torch/cifar10``,
  ``torch/cifar100``, ``torch/qmnist``).

The MNIST family is found offline before anything is downloaded: in ``--data-dir`` (torchvision's
``<root>/FashionMNIST/raw/`` layout, or the four IDX files, gzipped or not, directly in the folder), in ``./data``, and
for Fashion-MNIST in the Debian package's ``/usr/share/datasets/fashion-mnist/`` (``apt-get install
dataset-fashion-mnist``). IDX files found outside torchvision's layout are unpacked into it once. Only when none is
present does torchvision download the dataset, and a failed download is reported as a clear ``InputError``.

``DatasetView`` is what the loaders see: an index subset (``--train-num-samples``, distributed evaluation shards),
a colour mode matching the model's input channels, and strict image loading: timm's ``ImageDataset`` skips images it
cannot read with a warning, a view stops with an ``UnreadableImageError`` naming the file.
"""
import gzip
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset
from torch.utils.data import Dataset

from .errors import InputError

_logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = 'data'
"""Where torchvision datasets live when ``--data-dir`` is not given (relative to the working directory)."""

TORCH_DATASETS = ('fashion_mnist', 'mnist', 'kmnist', 'qmnist', 'cifar10', 'cifar100')
"""The ``torch/<name>`` datasets the scripts accept (torchvision classes with a ``train`` flag)."""

IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
"""The four files of an MNIST-family dataset, as torchvision expects them in ``<root>/<Folder>/raw/``."""

IDX_FOLDERS = {'fashion_mnist': 'FashionMNIST', 'mnist': 'MNIST', 'kmnist': 'KMNIST'}
"""torchvision's folder name of each MNIST-family dataset."""

SYSTEM_DATA_DIRS: Dict[str, Tuple[str, ...]] = {
    'fashion_mnist': ('/usr/share/datasets/fashion-mnist',),  # Debian/Ubuntu: apt-get install dataset-fashion-mnist
    'mnist': ('/usr/share/datasets/mnist',),
}
"""System-wide folders searched for IDX files when neither ``--data-dir`` nor ``./data`` holds them."""

TRAIN_SPLITS = ('train', 'training')
VERIFY_LEVELS = ('auto', 'full', 'header', 'none')
AUTO_FULL_VERIFY_MAX = 50_000
"""``--verify-images auto`` decodes every image of folders up to this size and reads only headers above it."""


class UnreadableImageError(InputError):
    """An image file that cannot be opened or decoded (raised by ``DatasetView``, also from loader workers)."""


def parse_dataset_name(name: str) -> Tuple[str, Optional[str]]:
    """Splits ``--dataset`` into ``('folder', None)`` or ``('torch', '<name>')``; rejects anything else.

    Raises:
        InputError: for an unknown or unsupported dataset name.
    """
    name = (name or '').strip()
    if name in ('', 'folder', 'imagefolder'):
        return 'folder', None
    prefix, sep, rest = name.partition('/')
    if sep and prefix.lower() == 'torch' and rest.lower() in TORCH_DATASETS:
        return 'torch', rest.lower()
    supported = ', '.join(["'' (image folder)"] + [f'torch/{n}' for n in TORCH_DATASETS])
    raise InputError(f'unknown or unsupported dataset {name!r}; supported: {supported}')


def is_train_split(split: str) -> bool:
    return split.split('[')[0] in TRAIN_SPLITS


# ---- finding MNIST-family files offline ----

def _idx_file(folder: str, name: str, allow_gz: bool = True) -> Optional[str]:
    """Path of IDX file ``name`` in ``folder`` (uncompressed first, then ``.gz``), or None."""
    for candidate in (name, name + '.gz') if allow_gz else (name,):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return path
    return None


def _has_idx_files(folder: str, allow_gz: bool = True) -> bool:
    return all(_idx_file(folder, f, allow_gz) is not None for f in IDX_FILES)


def _unpack_idx_files(src_folder: str, raw_folder: str) -> None:
    """Puts the four IDX files of ``src_folder`` into torchvision's ``raw_folder`` (gunzip or link), atomically."""
    os.makedirs(raw_folder, exist_ok=True)
    for name in IDX_FILES:
        dst = os.path.join(raw_folder, name)
        if _idx_file(raw_folder, name, allow_gz=False) is not None:
            continue
        src = _idx_file(src_folder, name)
        tmp = f'{dst}.partial-{os.getpid()}'
        try:
            if src.endswith('.gz'):
                with gzip.open(src, 'rb') as fin, open(tmp, 'wb') as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            else:
                os.symlink(os.path.abspath(src), tmp)
            os.replace(tmp, dst)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise InputError(f'cannot unpack {src} into {raw_folder}: {e}') from e


def find_idx_dataset(name: str, data_dir: Optional[str] = None) -> Optional[str]:
    """Finds an MNIST-family dataset offline and returns the torchvision root holding it, or None.

    Looks in ``data_dir`` (or ``./data``) for torchvision's layout, then for the IDX files (gzipped or not) in that
    layout, directly in ``data_dir``, or in the system folders (``SYSTEM_DATA_DIRS``). Files found outside
    torchvision's layout are unpacked into ``<data_dir or ./data>/<Folder>/raw/`` once.
    """
    folder = IDX_FOLDERS[name]
    root = data_dir or DEFAULT_DATA_DIR
    raw = os.path.join(root, folder, 'raw')
    if _has_idx_files(raw, allow_gz=False):
        return root
    sources = [raw, root] + list(SYSTEM_DATA_DIRS.get(name, ()))
    for src in sources:
        if _has_idx_files(src):
            _logger.info(f'Using {name} IDX files from {src} (unpacked into {raw}).')
            _unpack_idx_files(src, raw)
            return root
    return None


# ---- dataset construction ----

def _open_torch_dataset(name: str, data_dir: Optional[str], split: str, download: bool) -> Dataset:
    if data_dir and not os.path.isdir(data_dir):
        raise InputError(f'data folder {data_dir} does not exist')
    root = data_dir or DEFAULT_DATA_DIR
    where = os.path.abspath(root) + ''.join(f', {d}' for d in SYSTEM_DATA_DIRS.get(name, ()))
    if name in IDX_FOLDERS:
        found = find_idx_dataset(name, data_dir)
        if found is not None:
            root, download = found, False
        elif not download:
            raise InputError(f'dataset torch/{name} not found (looked in {where}) and downloading is off; '
                             f'pass --data-dir, or allow --dataset-download')
    try:
        return create_dataset(f'torch/{name}', root=root, split=split, download=download)
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        hint = ('; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` provides it offline'
                if name == 'fashion_mnist' else '')
        action = 'could not be downloaded' if download else 'is missing or unreadable'
        raise InputError(f'dataset torch/{name} {action} (looked in {where}): {str(e).strip()}{hint}') from e


def _open_folder_dataset(data_dir: Optional[str], split: str, class_map: str) -> Dataset:
    if not data_dir:
        raise InputError('image-folder datasets need --data-dir (or choose a torch/<name> dataset)')
    if not os.path.exists(data_dir):
        raise InputError(f'data folder {data_dir} does not exist')
    if class_map and not os.path.isfile(class_map):
        raise InputError(f'class map file {class_map} does not exist')
    try:
        ds = create_dataset('', root=data_dir, split=split, class_map=class_map or None)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise InputError(f'no images for split {split!r} in {data_dir}: {e}') from e
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f'cannot read image folder {data_dir} (split {split!r}): {e}') from e
    return ds


def open_dataset(
        name: str,
        data_dir: Optional[str],
        split: str,
        download: bool = False,
        class_map: str = '',
) -> Dataset:
    """Opens a supported dataset split (see the module docstring), with clear errors for bad input.

    Raises:
        InputError: unknown dataset, missing or empty folder, dataset not found offline and not downloadable.
    """
    kind, torch_name = parse_dataset_name(name)
    if kind == 'torch':
        if class_map:
            raise InputError('--class-map applies to image-folder datasets only')
        return _open_torch_dataset(torch_name, data_dir, split, download)
    return _open_folder_dataset(data_dir, split, class_map)


def class_names(dataset: Dataset) -> List[str]:
    """Class names in label order: a folder's ``class_to_idx`` or a torchvision dataset's ``classes``."""
    if isinstance(dataset, DatasetView):
        return class_names(dataset.dataset)
    mapping = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if mapping is None:
        mapping = getattr(dataset, 'class_to_idx', None)
    if mapping:
        return [str(c) for c, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    classes = getattr(dataset, 'classes', None)
    if classes is None:
        raise InputError(f'cannot tell the classes of dataset {type(dataset).__name__}')
    return [str(c) for c in classes]


def image_files(dataset: Dataset) -> List[str]:
    """Absolute paths of the image files behind a dataset (empty for in-memory torchvision datasets)."""
    if isinstance(dataset, DatasetView):
        files = image_files(dataset.dataset)
        return files if dataset.indices is None or not files else [files[i] for i in dataset.indices]
    if isinstance(dataset, ImageDataset) and hasattr(dataset.reader, 'samples'):
        samples = dataset.reader.samples
        if samples and isinstance(samples[0], (tuple, list)) and isinstance(samples[0][0], str):
            return [os.path.abspath(s[0]) for s in samples]
    return []


def subset_indices(total: int, num_samples: Optional[int], seed: int = 0) -> Optional[List[int]]:
    """A fixed random subset of ``num_samples`` of ``range(total)`` in increasing order (None: everything).

    The subset depends only on ``total``, ``num_samples`` and ``seed``, so the training script and
    ``validate.py`` pick the same images.
    """
    if num_samples is None or num_samples <= 0 or num_samples >= total:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:num_samples].tolist())


class DatasetView(Dataset):
    """A map-style dataset seen through an index list, a colour mode and a transform, with strict image loading.

    Args:
        dataset: a timm ``ImageDataset`` or a torchvision dataset returning ``(PIL image, int)``. Its own transform
            is cleared: the view applies ``transform`` after the colour conversion.
        indices: positions of ``dataset`` to expose, in order (None: all).
        img_mode: PIL mode images are converted to (``'L'`` for one input channel, ``'RGB'`` for three).
        transform: applied to each converted image (``timm.data.create_loader`` sets it).
    """

    def __init__(
            self,
            dataset: Dataset,
            indices: Optional[Sequence[int]] = None,
            img_mode: Optional[str] = None,
            transform: Optional[Callable] = None,
    ):
        self.dataset = dataset
        self.indices = list(indices) if indices is not None else None
        self.img_mode = img_mode
        self.transform = transform
        if hasattr(dataset, 'transform'):
            dataset.transform = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def shard(self, rank: int, world_size: int) -> 'DatasetView':
        """The ``rank``-th of ``world_size`` disjoint, unpadded shards (every sample in exactly one shard)."""
        indices = self.indices if self.indices is not None else range(len(self.dataset))
        return DatasetView(self.dataset, list(indices)[rank::world_size], self.img_mode, self.transform)

    def _load(self, index: int):
        ds = self.dataset
        if isinstance(ds, ImageDataset):
            item = ds.reader[index]
            source, target = item[0], item[1]
            try:
                img = Image.open(source)
                img.load()  # decodes now, so a broken file fails here, naming itself
            except (OSError, SyntaxError, ValueError) as e:
                raise UnreadableImageError(
                    f'cannot read image file {ds.filename(index, absolute=True)}: {e}') from None
            finally:
                if hasattr(source, 'close'):
                    source.close()
            return img, (-1 if target is None else target)
        img, target = ds[index]
        return img, target

    def __getitem__(self, i: int):
        index = self.indices[i] if self.indices is not None else i
        img, target = self._load(index)
        if self.img_mode and isinstance(img, Image.Image) and img.mode != self.img_mode:
            img = img.convert(self.img_mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def build_dataset(
        name: str,
        data_dir: Optional[str],
        split: str,
        in_chans: int = 3,
        download: bool = False,
        class_map: str = '',
        num_samples: Optional[int] = None,
) -> DatasetView:
    """Opens a dataset split and wraps it in a ``DatasetView`` (colour mode from ``in_chans``, optional subset)."""
    ds = open_dataset(name, data_dir, split, download=download, class_map=class_map)
    if len(ds) == 0:
        raise InputError(f'split {split!r} of dataset {name or data_dir!r} is empty')
    img_mode = {1: 'L', 3: 'RGB'}.get(in_chans)
    return DatasetView(ds, subset_indices(len(ds), num_samples), img_mode)


# ---- checking image files before anything is written ----

def _check_image(path: str, decode: bool) -> Optional[str]:
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f'{path}: {e}'
    return None


def verify_images(dataset: Dataset, level: str = 'auto', max_workers: int = 8) -> None:
    """Checks that every image file behind ``dataset`` opens (``header``) or decodes (``full``).

    ``auto`` decodes folders up to ``AUTO_FULL_VERIFY_MAX`` images and reads headers above that; in-memory datasets
    have nothing to check.

    Raises:
        InputError: naming the unreadable files (the first ten and a count).
    """
    if level not in VERIFY_LEVELS:
        raise InputError(f'--verify-images {level!r} is not one of {VERIFY_LEVELS}')
    files = image_files(dataset)
    if level == 'none' or not files:
        return
    decode = level == 'full' or (level == 'auto' and len(files) <= AUTO_FULL_VERIFY_MAX)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        errors = [e for e in pool.map(lambda p: _check_image(p, decode), files, chunksize=64) if e]
    if errors:
        shown = '\n  '.join(errors[:10])
        more = f'\n  ... and {len(errors) - 10} more' if len(errors) > 10 else ''
        raise InputError(f'{len(errors)} of {len(files)} image files cannot be read '
                         f'(fix or remove them, or pass --verify-images none to skip this check):\n  {shown}{more}')
