"""train_vision.py end to end: a short run that learns, validate.py agreeing with it, DDP gradient equivalence,
kill-and-resume, Fashion-MNIST subsets (when the Debian files exist) and every kind of bad input.

Training runs in-process through ``main(argv)`` where that is enough (fast: no interpreter start) and in
subprocesses where processes are the point (torchrun, SIGKILL).
"""
import csv
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import camex_vision  # noqa: F401 (registers the models)
import timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_vision  # noqa: E402
import validate  # noqa: E402
from camex_vision.train.data import SYSTEM_DATA_DIRS  # noqa: E402
from camex_vision.train.synthetic import write_image_folder  # noqa: E402

TRAIN = os.path.join(REPO, 'train_vision.py')
FASHION = SYSTEM_DATA_DIRS['fashion_mnist'][0]
TINY_MODEL = ['--model', 'test_camex_vit', '--img-size', '16',
              '--model-kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2', 'num_heads=2', 'num_experts=4']
TINY = TINY_MODEL + ['--dataset', '', '--batch-size', '16', '--workers', '0', '--warmup-epochs', '0',
                     '--smoothing', '0', '--lr', '1e-2', '--progress', 'log']


pytestmark = pytest.mark.usefixtures('one_thread')


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))


def _rows(run_dir):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def _tree_digest(folder):
    """Name, size and content hash of every file under ``folder`` (to prove a rejected command wrote nothing)."""
    digest = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return digest


def _result_line(text):
    line = next(line for line in text.splitlines() if line.startswith('--result '))
    return json.loads(line[len('--result '):])


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp('synthetic')), 3, {'train': 48, 'validation': 16}, size=16)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, data_root):
    """A six-epoch run of a tiny CAMEx ViT on the synthetic folders (about ten seconds)."""
    out = tmp_path_factory.mktemp('runs')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = train_vision.main(TINY + ['--data-dir', data_root, '--epochs', '6', '--checkpoint-hist', '2',
                                           '--output', str(out), '--experiment', 'run'])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return str(out / 'run')


# ---- a short run that learns, and what it writes

def test_short_run_beats_chance_and_writes_its_outputs(trained_run):
    rows = _rows(trained_run)
    assert [int(r['epoch']) for r in rows] == list(range(6))
    final = rows[-1]
    assert float(final['eval_top1']) >= 75.0, final  # three classes: chance is 33%
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    for column in ('train_loss', 'train_aux_loss', 'train_images_per_sec', 'eval_loss', 'eval_top1', 'eval_top5',
                   'lr', 'train_usage/blocks.1.mlp/e0', 'train_usage/blocks.1.mlp/e2', 'eval_usage/blocks.1.mlp/e0'):
        assert column in final, column
    usage = [float(final[f'train_usage/blocks.1.mlp/e{i}']) for i in range(3)]  # N=4: 3 domain experts
    assert abs(sum(usage) - 1.0) < 1e-3
    assert float(final['train_aux_loss']) > 0  # the default balance loss is on

    files = set(os.listdir(trained_run))
    assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'model_best.safetensors',
            'learning_curves.png', 'expert_usage.png'} <= files
    assert len([f for f in files if f.startswith('checkpoint-')]) == 2  # --checkpoint-hist 2
    assert not [f for f in files if '.partial-' in f or f == 'tmp.pth.tar']
    with open(os.path.join(trained_run, 'args.yaml')) as f:
        saved = yaml.safe_load(f)
    assert saved['model'] == 'test_camex_vit' and saved['model_kwargs']['patch_size'] == 4

    for name in files:
        if name.endswith('.pth.tar'):
            state = torch.load(os.path.join(trained_run, name), map_location='cpu', weights_only=True)
            assert {'state_dict', 'optimizer', 'scheduler', 'rng', 'epoch', 'args', 'arch'} <= set(state)
    last = torch.load(os.path.join(trained_run, 'last.pth.tar'), map_location='cpu', weights_only=True)
    assert last['epoch'] == 5 and last['num_classes'] == 3 and isinstance(last['args'], dict)

    from safetensors.torch import load_file
    weights = load_file(os.path.join(trained_run, 'model_best.safetensors'))
    model = timm.create_model('test_camex_vit', num_classes=3, **last['model_kwargs'])
    model.load_state_dict(weights)


def test_validate_agrees_with_training_eval(trained_run, capsys, tmp_path):
    eval_top1 = float(_rows(trained_run)[-1]['eval_top1'])
    last = os.path.join(trained_run, 'last.pth.tar')
    assert validate.main(['--checkpoint', last, '--no-reparameterize', '-b', '16', '--workers', '0',
                          '--results-file', str(tmp_path / 'r.json')]) == 0
    exact = _result_line(capsys.readouterr().out)
    assert exact['top1'] == pytest.approx(eval_top1, abs=1e-3)
    assert exact['loss'] == pytest.approx(float(_rows(trained_run)[-1]['eval_loss']), abs=1e-4)
    assert exact['param_count'] > 0 and exact['images_per_sec'] > 0 and exact['images'] == 48
    assert json.loads((tmp_path / 'r.json').read_text())['top1'] == exact['top1']

    # reparameterised (the default for CAMEx models): the same predictions up to float rounding
    assert validate.main(['--checkpoint', trained_run, '--workers', '0',
                          '--results-file', str(tmp_path / 'r.csv')]) == 0
    folded = _result_line(capsys.readouterr().out)
    assert folded['reparameterized'] is True
    best_top1 = max(float(r['eval_top1']) for r in _rows(trained_run))
    assert folded['top1'] == pytest.approx(best_top1, abs=100 / 48 + 1e-6)  # model_best, at most one image flips
    with open(tmp_path / 'r.csv', newline='') as f:
        assert len(list(csv.DictReader(f))) == 1


# ---- distributed

def test_ddp_two_processes_match_one_process_gradients(tmp_path):
    """One SGD step (lr 1, no momentum) on the same global batch: w0 - w1 is the gradient, for both launches."""
    root = write_image_folder(str(tmp_path / 'data'), 2, {'train': 4, 'validation': 3}, size=16)
    init = tmp_path / 'init.pth'
    model = timm.create_model('test_camex_vit', num_classes=2, img_size=16, embed_dim=32, depth=2, num_heads=2,
                              num_experts=4, router_noise=False, **train_vision.DEFAULT_MODEL_KWARGS)
    torch.save(model.state_dict(), init)
    common = TINY_MODEL + ['--model-kwargs', 'router_noise=False', '--dataset', '', '--data-dir', root,
                           '--epochs', '1', '--opt', 'momentum', '--momentum', '0', '--weight-decay', '0', '--lr', '1',
                           '--sched', 'none', '--warmup-epochs', '0', '--no-aug', '--smoothing', '0',
                           '--balance-coef', '0', '--workers', '0', '--initial-checkpoint', str(init),
                           '--output', str(tmp_path / 'out'), '--no-plots', '--no-export-safetensors']
    single = subprocess.run([sys.executable, TRAIN, *common, '--batch-size', '8', '--experiment', 'single'],
                            env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          TRAIN, *common, '--batch-size', '4', '--experiment', 'ddp'],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert '2 process(es)' in ddp.stdout
    assert 'Grad strides do not match' not in ddp.stderr  # every gradient matches its DDP bucket's layout

    w0 = torch.load(init, weights_only=True)
    states = {name: torch.load(tmp_path / 'out' / name / 'last.pth.tar', weights_only=True)
              for name in ('single', 'ddp')}
    assert all(s['num_updates'] == 1 for s in states.values())
    for key, value in w0.items():
        g_single = value - states['single']['state_dict'][key]
        g_ddp = value - states['ddp']['state_dict'][key]
        assert torch.allclose(g_single, g_ddp, rtol=1e-4, atol=1e-6), key
    assert any((value - states['ddp']['state_dict'][k]).abs().max() > 0 for k, value in w0.items())
    # metrics are reduced across ranks: the same numbers as one process on all the data
    rows = {name: _rows(tmp_path / 'out' / name)[0] for name in states}
    for column in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5'):
        assert float(rows['ddp'][column]) == pytest.approx(float(rows['single'][column]), rel=1e-5, abs=1e-5)


# ---- checkpoints that never lose work

def test_sigkill_mid_epoch_then_resume_continues_exactly(tmp_path, data_root):
    args = [sys.executable, TRAIN, *TINY, '--data-dir', data_root, '--epochs', '4', '--batch-size', '8',
            '--log-interval', '1', '--output', str(tmp_path), '--no-plots', '--no-export-safetensors']
    run_dir = tmp_path / 'killed'
    proc = subprocess.Popen(args + ['--experiment', 'killed'], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = False
    for line in proc.stdout:
        if line.startswith('Train 2/3 [   3/'):  # third step of the third epoch: checkpoints 0 and 1 exist
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert killed and proc.returncode == -signal.SIGKILL

    # nothing torn: every checkpoint loads (weights_only), the last one is the end of epoch 1
    for name in os.listdir(run_dir):
        if name.endswith('.pth.tar'):
            torch.load(run_dir / name, map_location='cpu', weights_only=True)
    assert torch.load(run_dir / 'last.pth.tar', weights_only=True)['epoch'] == 1
    assert [int(r['epoch']) for r in _rows(run_dir)] == [0, 1]

    resumed = subprocess.run([sys.executable, TRAIN, '--resume', str(run_dir), '--progress', 'log'], env=_env(),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming' in resumed.stderr and 'epochs          2..3' in resumed.stdout
    assert [int(r['epoch']) for r in _rows(run_dir)] == [0, 1, 2, 3]
    final = torch.load(run_dir / 'last.pth.tar', weights_only=True)
    assert final['epoch'] == 3

    # continues exactly: the same weights as a run that was never interrupted
    straight = subprocess.run(args + ['--experiment', 'straight'], env=_env(), cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = torch.load(tmp_path / 'straight' / 'last.pth.tar', weights_only=True)
    for key, value in reference['state_dict'].items():
        assert torch.allclose(value, final['state_dict'][key], rtol=1e-5, atol=1e-6), key
    assert _rows(run_dir)[-1]['eval_top1'] == _rows(tmp_path / 'straight')[-1]['eval_top1']


def test_resume_restores_amp_scaler_and_ema(tmp_path, data_root):
    argv = TINY + ['--data-dir', data_root, '--output', str(tmp_path), '--experiment', 'amp', '--no-plots', '--amp',
                   '--amp-dtype', 'float16', '--model-ema', '--model-ema-decay', '0.9']
    assert train_vision.main(argv + ['--epochs', '1']) == 0
    first = torch.load(tmp_path / 'amp' / 'last.pth.tar', weights_only=True)
    assert {'amp_scaler', 'state_dict_ema'} <= set(first)
    assert train_vision.main(['--resume', str(tmp_path / 'amp'), '--epochs', '2']) == 0
    second = torch.load(tmp_path / 'amp' / 'last.pth.tar', weights_only=True)
    assert second['epoch'] == 1 and second['num_updates'] == 2 * first['num_updates']
    assert second['amp_scaler']['_growth_tracker'] > first['amp_scaler']['_growth_tracker']  # continued, not reset
    rows = _rows(tmp_path / 'amp')
    assert [r['epoch'] for r in rows] == ['0', '1'] and all(r['eval_ema_top1'] for r in rows)


# ---- Fashion-MNIST (the embedded default's data), when the Debian package is installed

@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION, 'train-images-idx3-ubyte.gz')),
                    reason='Fashion-MNIST Debian files absent (apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_subset_from_debian_files(tmp_path):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    status = train_vision.main([
        '--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2', 'num_experts=4', '--data-dir', str(data_dir),
        '--no-dataset-download', '--train-num-samples', '2048', '--val-num-samples', '512', '--epochs', '2',
        '--workers', '0', '--batch-size', '32', '--lr', '3e-3', '--warmup-epochs', '0', '--output',
        str(tmp_path / 'out'), '--experiment', 'fm', '--progress', 'log', '--no-plots'])
    assert status == 0
    assert os.path.isfile(data_dir / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte')
    final = _rows(tmp_path / 'out' / 'fm')[-1]
    assert float(final['eval_top1']) > 20.0  # ten classes: chance is 10% (128 updates of a tiny ViT from scratch)
    last = torch.load(tmp_path / 'out' / 'fm' / 'last.pth.tar', weights_only=True)
    assert last['class_names'][0] == 'T-shirt/top' and last['data_config']['input_size'] == (1, 28, 28)


# ---- bad input: a clear message, exit status 2, nothing written

def _rejects(argv, caplog, *fragments, out=None):
    before = _tree_digest(out) if out is not None and os.path.isdir(out) else None
    caplog.clear()
    assert train_vision.main(argv) == 2
    text = caplog.text
    for fragment in fragments:
        assert fragment in text, text
    if out is not None:
        if before is None:
            assert not os.path.exists(out), os.listdir(out)
        else:
            assert _tree_digest(out) == before
    return text


def test_bad_data_folders(tmp_path, caplog):
    out = str(tmp_path / 'out')
    _rejects(TINY + ['--data-dir', str(tmp_path / 'missing'), '--output', out], caplog, 'does not exist', out=out)
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    _rejects(TINY + ['--data-dir', str(tmp_path / 'empty'), '--output', out], caplog, 'no images', out=out)
    _rejects(TINY + ['--output', out], caplog, 'need --data-dir', out=out)


def test_unknown_model_and_dataset(tmp_path, caplog, data_root):
    out = str(tmp_path / 'out')
    _rejects(['--model', 'test_camex_vitt', '--dataset', '', '--data-dir', data_root, '--output', out], caplog,
             "unknown model 'test_camex_vitt'", 'test_camex_vit', out=out)
    _rejects(['--dataset', 'torch/imagenet42', '--output', out], caplog, 'unknown or unsupported dataset', out=out)
    _rejects(['--dataset', 'tfds/mnist', '--output', out], caplog, 'unknown or unsupported dataset', out=out)
    _rejects(TINY + ['--data-dir', data_root, '--model-kwargs', 'no_such_option=1', '--output', out], caplog,
             'does not accept', out=out)
    _rejects(TINY + ['--data-dir', data_root, '--model-kwargs', 'merge=bogus', '--output', out], caplog,
             'merge', out=out)


def test_torch_dataset_not_found_offline(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(SYSTEM_DATA_DIRS, 'fashion_mnist', ())
    (tmp_path / 'nodata').mkdir()
    out = str(tmp_path / 'out')
    _rejects(['--data-dir', str(tmp_path / 'nodata'), '--no-dataset-download', '--output', out], caplog,
             'torch/fashion_mnist not found', out=out)


def test_class_count_mismatch_with_checkpoints(tmp_path, caplog, data_root, trained_run):
    two = write_image_folder(str(tmp_path / 'two'), 2, {'train': 8, 'validation': 4}, size=16)
    out = str(tmp_path / 'out')
    _rejects(TINY + ['--data-dir', two, '--initial-checkpoint', os.path.join(trained_run, 'last.pth.tar'),
                     '--output', out], caplog, 'class-count mismatch', 'predicts 3 classes but the data has 2', out=out)
    _rejects(TINY + ['--data-dir', data_root, '--num-classes', '5', '--output', out], caplog,
             '--num-classes 5 does not match the 3 classes', out=out)
    # resuming into the run's own folder must not touch it either
    _rejects(['--resume', trained_run, '--data-dir', two], caplog, 'class-count mismatch', out=trained_run)


def test_corrupt_and_truncated_checkpoints(tmp_path, caplog, data_root, trained_run):
    good = os.path.join(trained_run, 'last.pth.tar')
    truncated = tmp_path / 'truncated' / 'last.pth.tar'
    truncated.parent.mkdir()
    with open(good, 'rb') as f:
        truncated.write_bytes(f.read()[:os.path.getsize(good) // 2])
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'not a checkpoint at all' * 10)
    out = str(tmp_path / 'out')
    before = _tree_digest(str(truncated.parent))
    _rejects(['--resume', str(truncated)], caplog, 'corrupt or truncated', out=str(truncated.parent))
    assert _tree_digest(str(truncated.parent)) == before
    _rejects(TINY + ['--data-dir', data_root, '--initial-checkpoint', str(garbage), '--output', out], caplog,
             'corrupt or truncated', out=out)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    _rejects(TINY + ['--data-dir', data_root, '--initial-checkpoint', str(empty), '--output', out], caplog,
             'is empty', out=out)
    _rejects(TINY + ['--data-dir', data_root, '--resume', str(tmp_path / 'nope.pth.tar'), '--output', out], caplog,
             'does not exist', out=out)


def test_unreadable_images(tmp_path, caplog):
    root = write_image_folder(str(tmp_path / 'data'), 2, {'train': 6, 'validation': 2}, size=16)
    out = str(tmp_path / 'out')
    bad = os.path.join(root, 'train', 'class_a', 'broken.png')
    with open(bad, 'wb') as f:
        f.write(b'\x00garbage, not an image')
    _rejects(TINY + ['--data-dir', root, '--output', out], caplog, 'cannot be read', 'broken.png', out=out)
    os.remove(bad)
    good = os.path.join(root, 'validation', 'class_b', '0.png')
    with open(good, 'rb') as f:
        data = f.read()
    with open(os.path.join(root, 'validation', 'class_b', 'cut.png'), 'wb') as f:
        f.write(data[:len(data) // 2])  # a valid header, truncated pixel data: only decoding finds it
    _rejects(TINY + ['--data-dir', root, '--output', out], caplog, 'cut.png', out=out)


def test_output_folder_holding_another_run(tmp_path, caplog, data_root, trained_run):
    parent, name = os.path.split(trained_run)
    _rejects(TINY + ['--data-dir', data_root, '--output', parent, '--experiment', name], caplog,
             'already holds another run', '--resume', out=trained_run)


def test_bad_config_and_arguments(tmp_path, caplog, data_root):
    out = str(tmp_path / 'out')
    config = tmp_path / 'cfg.yaml'
    config.write_text('lr: 0.1\nno_such_option: 3\n')
    _rejects(['-c', str(config), '--output', out], caplog, 'unknown option(s) no_such_option', out=out)
    config.write_text('lr: [unclosed\n')
    _rejects(['-c', str(config), '--output', out], caplog, 'not valid YAML', out=out)
    _rejects(['-c', str(tmp_path / 'missing.yaml'), '--output', out], caplog, 'does not exist', out=out)
    _rejects(TINY + ['--data-dir', data_root, '--sched', 'cosinus', '--output', out], caplog,
             "unknown learning-rate schedule --sched 'cosinus'", out=out)
    _rejects(TINY + ['--data-dir', data_root, '--batch-size', '1000', '--output', out], caplog,
             'make no full batch', out=out)


def test_config_file_sets_defaults_and_command_line_wins(tmp_path, data_root):
    config = tmp_path / 'cfg.yaml'
    config.write_text(yaml.safe_dump({'epochs': 1, 'lr': 0.004, 'batch-size': 32, 'model_kwargs': {'depth': 2}}))
    out = tmp_path / 'out'
    argv = ['-c', str(config), *TINY, '--data-dir', data_root, '--output', str(out), '--experiment', 'cfg',
            '--batch-size', '16', '--no-plots']
    assert train_vision.main(argv) == 0
    saved = yaml.safe_load((out / 'cfg' / 'args.yaml').read_text())
    assert saved['epochs'] == 1 and saved['lr'] == 0.01 and saved['batch_size'] == 16
    assert saved['model_kwargs']['depth'] == 2 and saved['model_kwargs']['embed_dim'] == 32


def test_configs_parse_and_the_fashion_mnist_config_is_the_embedded_default():
    parser = train_vision.build_parser()
    configs = sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml')))
    assert configs
    for path in configs:
        cfg = train_vision._load_config(path, parser)
        assert timm.is_model(cfg['model']), path
    defaults = vars(parser.parse_args([]))
    dataset_defaults = train_vision.DATASET_DEFAULTS['fashion_mnist']
    for key, value in train_vision._load_config(os.path.join(REPO, 'configs', 'fashion_mnist_camex_vit.yaml'),
                                                parser).items():
        expected = defaults[key] if defaults[key] is not None else dataset_defaults[key]
        if key == 'model_kwargs':
            expected = {**train_vision.DEFAULT_MODEL_KWARGS, **expected}
        assert list(expected) == list(value) if isinstance(value, list) else expected == value, key


def test_evaluation_frees_the_merge_cores_inference_buffers():
    from types import SimpleNamespace
    from camex_vision.core import merge as merge_module
    model = timm.create_model('test_camex_vit', num_classes=3)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
    args = SimpleNamespace(prefetcher=False, channels_last=False, progress='log', log_interval=50)
    with torch.no_grad():
        model.eval()(batches[0][0])
    assert merge_module._SCRATCH.buffers  # an inference pass on the CPU holds them
    metrics = train_vision.evaluate(model, batches, torch.nn.CrossEntropyLoss(), args, torch.device('cpu'), 3)
    assert not merge_module._SCRATCH.buffers and 0 <= metrics['top1'] <= 100
