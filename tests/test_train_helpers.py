"""camex_vision.train helpers: atomic checkpoints, RNG state, offline dataset discovery, strict image loading,
meters with hand-computed numbers, plots."""
import gzip
import os
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from camex_vision.train import checkpoint as ckpt
from camex_vision.train import data as data_mod
from camex_vision.train.data import (
    UnreadableImageError, build_dataset, class_names, find_idx_dataset, parse_dataset_name,
    subset_indices, verify_images)
from camex_vision.train.errors import InputError, describe
from camex_vision.train.metrics import ClassificationMeter, UsageMeter, parse_usage_columns, usage_columns
from camex_vision.train.plots import plot_run
from camex_vision.train.synthetic import write_image_folder


# ---- atomic files and the saver

class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError('boom while writing')


def test_atomic_save_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / 'last.pth.tar'
    ckpt.atomic_save({'state_dict': {'w': torch.ones(3)}}, str(path))
    with pytest.raises(RuntimeError, match='boom'):
        ckpt.atomic_save({'state_dict': {'w': torch.zeros(1000)}, 'bad': _Unpicklable()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)['state_dict']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['last.pth.tar']


@pytest.mark.parametrize('hardlink', [True, False])
def test_saver_keeps_bounded_ranked_history_of_loadable_files(tmp_path, hardlink):
    saver = ckpt.AtomicCheckpointSaver(lambda epoch: {'state_dict': {'w': torch.full((2,), float(epoch))}},
                                       str(tmp_path), max_history=2)
    saver.can_hardlink = hardlink
    for epoch, metric in enumerate([10., 30., 20., 5., 25.]):
        saver.save_checkpoint(epoch, metric=metric)
    files = sorted(os.listdir(tmp_path))
    assert files == ['checkpoint-1.pth.tar', 'checkpoint-4.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    for name in files:
        state = torch.load(tmp_path / name, weights_only=True)
        assert state['version'] == 2 and isinstance(state['saver'], dict)
    assert torch.load(tmp_path / 'last.pth.tar', weights_only=True)['epoch'] == 4
    assert torch.load(tmp_path / 'model_best.pth.tar', weights_only=True)['metric'] == 30.
    assert (saver.best_metric, saver.best_epoch) == (30., 1)

    # a resumed saver restores the history from the checkpoint and keeps ranking
    state = torch.load(tmp_path / 'last.pth.tar', weights_only=True)
    resumed = ckpt.AtomicCheckpointSaver(lambda epoch: {'state_dict': {}}, str(tmp_path), max_history=2)
    resumed.load_state_dict(state['saver'])
    resumed.save_checkpoint(5, metric=40.)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('checkpoint')) == \
        ['checkpoint-1.pth.tar', 'checkpoint-5.pth.tar']
    assert torch.load(tmp_path / 'model_best.pth.tar', weights_only=True)['epoch'] == 5


def test_remove_partial_files(tmp_path):
    (tmp_path / '.last.pth.tar.partial-123').write_bytes(b'half')
    (tmp_path / 'tmp.pth.tar').write_bytes(b'x')
    (tmp_path / 'last.pth.tar').write_bytes(b'keep')
    assert sorted(ckpt.remove_partial_files(str(tmp_path))) == ['.last.pth.tar.partial-123', 'tmp.pth.tar']
    assert os.listdir(tmp_path) == ['last.pth.tar']


def test_plain_values_load_with_weights_only(tmp_path):
    import argparse
    value = ckpt.plain({'ns': argparse.Namespace(a=1), 'tuple': (1, 'a'), 'list': [np.float32(0.5)],
                        'dev': torch.device('cpu'), 'nested': {'x': None}})
    assert value == {'ns': 'Namespace(a=1)', 'tuple': (1, 'a'), 'list': [0.5], 'dev': 'cpu', 'nested': {'x': None}}
    ckpt.atomic_save(value, str(tmp_path / 'p.pt'))
    assert torch.load(tmp_path / 'p.pt', weights_only=True) == value


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    ckpt.atomic_save({'rng': ckpt.rng_state()}, str(tmp_path / 'r.pt'))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / 'r.pt', weights_only=True)['rng'])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoint_loading_errors(tmp_path):
    with pytest.raises(InputError, match='does not exist'):
        ckpt.load_checkpoint_file(str(tmp_path / 'missing.pth'))
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(InputError, match='is empty'):
        ckpt.load_checkpoint_file(str(tmp_path / 'empty.pth'))
    torch.save({'a': 1}, tmp_path / 'notmodel.pth')
    with pytest.raises(InputError, match='not a model checkpoint'):
        ckpt.load_checkpoint_file(str(tmp_path / 'notmodel.pth'))
    torch.save({'state_dict': {'w': torch.ones(1)}, 'args': __import__('argparse').Namespace(a=1)},
               tmp_path / 'unsafe.pth')
    with pytest.raises(InputError, match='arbitrary Python objects'):
        ckpt.load_checkpoint_file(str(tmp_path / 'unsafe.pth'))
    torch.save({'w': torch.ones(1)}, tmp_path / 'sd.pth')
    assert torch.equal(ckpt.load_checkpoint_file(str(tmp_path / 'sd.pth'))['state_dict']['w'], torch.ones(1))


# ---- datasets

def _write_idx(folder, gz=True, count=6):
    """Four tiny MNIST-format files (``count`` 28x28 images) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    images = (np.arange(count * 784) % 255).astype(np.uint8).tobytes()
    labels = bytes(i % 10 for i in range(count))
    for split in ('train', 't10k'):
        for kind, payload in (('images-idx3-ubyte', struct.pack('>IIII', 2051, count, 28, 28) + images),
                              ('labels-idx1-ubyte', struct.pack('>II', 2049, count) + labels)):
            name = os.path.join(folder, f'{split}-{kind}')
            opener = gzip.open if gz else open
            with opener(name + ('.gz' if gz else ''), 'wb') as f:
                f.write(payload)


def test_fashion_mnist_found_offline_in_flat_gz_files(tmp_path, monkeypatch):
    monkeypatch.setitem(data_mod.SYSTEM_DATA_DIRS, 'fashion_mnist', (str(tmp_path / 'system'),))
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    assert find_idx_dataset('fashion_mnist', str(data_dir)) is None
    _write_idx(str(tmp_path / 'system'))
    assert find_idx_dataset('fashion_mnist', str(data_dir)) == str(data_dir)
    raw = data_dir / 'FashionMNIST' / 'raw'
    assert sorted(os.listdir(raw)) == sorted(data_mod.IDX_FILES)
    ds = build_dataset('torch/fashion_mnist', str(data_dir), 'validation', in_chans=3)
    img, label = ds[1]
    assert len(ds) == 6 and img.mode == 'RGB' and img.size == (28, 28) and label == 1
    assert class_names(ds)[0] == 'T-shirt/top'


def test_idx_files_directly_in_data_dir_and_missing_data(tmp_path, monkeypatch):
    monkeypatch.setitem(data_mod.SYSTEM_DATA_DIRS, 'fashion_mnist', ())
    _write_idx(str(tmp_path / 'flat'), gz=False)
    ds = build_dataset('torch/fashion_mnist', str(tmp_path / 'flat'), 'train', in_chans=1)
    assert len(ds) == 6 and ds[0][0].mode == 'L'
    (tmp_path / 'none').mkdir()
    with pytest.raises(InputError, match='not found .* downloading is off'):
        build_dataset('torch/fashion_mnist', str(tmp_path / 'none'), 'train', download=False)


def test_parse_dataset_name():
    assert parse_dataset_name('') == ('folder', None)
    assert parse_dataset_name('torch/Fashion_MNIST') == ('torch', 'fashion_mnist')
    for bad in ('torch/imagenet22k', 'hfds/beans', 'cifar10'):
        with pytest.raises(InputError, match='unknown or unsupported dataset'):
            parse_dataset_name(bad)


def test_dataset_view_subsets_shards_and_strict_loading(tmp_path):
    root = write_image_folder(str(tmp_path), 2, {'train': 5}, size=8)
    view = build_dataset('', root, 'train', in_chans=1)
    assert len(view) == 10 and view[0][0].mode == 'L' and class_names(view) == ['class_a', 'class_b']
    shards = [view.shard(r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s.indices) == list(range(10))  # disjoint, complete, unpadded
    assert subset_indices(10, 4, seed=0) == subset_indices(10, 4, seed=0) and len(subset_indices(10, 4)) == 4
    assert subset_indices(10, None) is None and subset_indices(10, 20) is None

    bad = os.path.join(root, 'train', 'class_b', 'zz_bad.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    view = build_dataset('', root, 'train')
    with pytest.raises(UnreadableImageError, match='zz_bad.png'):
        view[len(view) - 1]
    with pytest.raises(InputError, match='1 of 11 image files cannot be read'):
        verify_images(view, 'header')
    verify_images(view, 'none')


def test_verify_images_full_decodes_truncated_files(tmp_path):
    root = write_image_folder(str(tmp_path), 1, {'train': 2}, size=32)
    path = os.path.join(root, 'train', 'class_a', '0.png')
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    view = build_dataset('', root, 'train')
    verify_images(view, 'header')  # the header is fine
    with pytest.raises(InputError, match='0.png'):
        verify_images(view, 'full')


def test_describe_strips_worker_traceback():
    wrapped = UnreadableImageError('Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback '
                                   '(most recent call last):\n  File "x.py"\ncamex_vision.train.data.'
                                   'UnreadableImageError: cannot read image file /d/a.png: broken')
    assert describe(wrapped) == 'cannot read image file /d/a.png: broken'
    assert describe(InputError('plain')) == 'plain'


# ---- meters, with numbers a person can check

def test_classification_meter_by_hand():
    meter = ClassificationMeter(num_classes=6, device=torch.device('cpu'))
    logits = torch.tensor([[9., 8, 7, 6, 5, 0],   # target 0: top-1 hit
                           [9., 8, 7, 6, 5, 0],   # target 4: top-5 hit only
                           [9., 8, 7, 6, 5, 0]])  # target 5: miss
    meter.update(logits, torch.tensor([0, 4, 5]), torch.tensor(2.0))
    meter.update(logits[:1], torch.tensor([1]), torch.tensor(1.0))  # top-5 hit
    m = meter.compute()
    assert m['top1'] == pytest.approx(25.0) and m['top5'] == pytest.approx(75.0)
    assert m['loss'] == pytest.approx((2.0 * 3 + 1.0) / 4) and m['count'] == 4


def test_usage_meter_weights_batches_by_size():
    meter = UsageMeter()
    meter.update({'blocks.1.mlp': torch.tensor([0.5, 0.5])}, 2)
    meter.update({'blocks.1.mlp': torch.tensor([1.0, 0.0])}, 6)
    usage = meter.compute()
    assert torch.allclose(usage['blocks.1.mlp'], torch.tensor([0.875, 0.125]))
    cols = usage_columns(usage)
    assert cols == {'usage/blocks.1.mlp/e0': 0.875, 'usage/blocks.1.mlp/e1': 0.125}
    assert parse_usage_columns({'train_' + k: str(v) for k, v in cols.items()}, 'train_usage') == \
        {'blocks.1.mlp': {0: 0.875, 1: 0.125}}


def test_plots_from_a_summary(tmp_path):
    header = 'epoch,train_loss,train_aux_loss,train_usage/blocks.1.mlp/e0,train_usage/blocks.1.mlp/e1,' \
             'eval_loss,eval_top1,eval_top5,lr\n'
    rows = ['0,2.0,0.01,0.6,0.4,1.9,40,80,0.001\n', '1,1.5,0.02,0.55,0.45,1.4,60,90,0.0005\n']
    (tmp_path / 'summary.csv').write_text(header + ''.join(rows))
    written = plot_run(str(tmp_path), 'test')
    assert [os.path.basename(p) for p in written] == ['learning_curves.png', 'expert_usage.png']
    for path in written:
        assert Image.open(path).size[0] > 100
    (tmp_path / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2,1.9,40,80,0.1\n')
    assert [os.path.basename(p) for p in plot_run(str(tmp_path))] == ['learning_curves.png']
