"""validate.py: self-describing checkpoints, label subsets, results files, reparameterisation and bad input."""
import csv
import json
import os
import sys

import pytest
import torch

import camex_vision  # noqa: F401 (registers the models)
import timm
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import validate  # noqa: E402
from camex_vision.train.synthetic import write_image_folder  # noqa: E402

KWARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp('val')), 3, {'validation': 6}, size=16)


def make_checkpoint(path, num_classes=3, data_dir='', **extra):
    """A checkpoint as train_vision.py writes it (the fields validate.py reads), for a fresh tiny CAMEx ViT."""
    torch.manual_seed(0)
    model = timm.create_model('test_camex_vit', num_classes=num_classes, **KWARGS)
    state = dict(arch='test_camex_vit', model_kwargs=dict(KWARGS), num_classes=num_classes, in_chans=3,
                 class_names=[f'class_{c}' for c in 'abcde'[:num_classes]],
                 data_config=dict(input_size=(3, 16, 16), interpolation='bilinear', mean=(0.5, 0.5, 0.5),
                                  std=(0.25, 0.25, 0.25), crop_pct=1.0, crop_mode='center'),
                 args=dict(dataset='', data_dir=data_dir), state_dict=model.state_dict(), epoch=0, **extra)
    torch.save(state, path)
    return model


def _result(capsys):
    out = capsys.readouterr().out
    return json.loads(next(line for line in out.splitlines() if line.startswith('--result '))[len('--result '):])


def test_checkpoint_describes_everything_and_results_files(tmp_path, data_root, capsys):
    make_checkpoint(tmp_path / 'last.pth.tar', data_dir=data_root)
    results = tmp_path / 'results.csv'
    for _ in range(2):
        assert validate.main(['--checkpoint', str(tmp_path), '--workers', '0', '--results-file', str(results)]) == 0
        result = _result(capsys)
    assert result['model'] == 'test_camex_vit' and result['images'] == 18 and result['reparameterized'] is True
    assert 0 <= result['top1'] <= result['top5'] <= 100 and result['param_count'] > 0 and result['loss'] > 0
    with open(results, newline='') as f:
        assert len(list(csv.DictReader(f))) == 2  # csv appends a row per run
    assert validate.main(['--checkpoint', str(tmp_path), '--workers', '0', '--results-file',
                          str(tmp_path / 'r.json')]) == 0
    assert json.loads((tmp_path / 'r.json').read_text())['top1'] == _result(capsys)['top1']


def test_reparameterized_and_plain_agree(tmp_path, data_root, capsys):
    make_checkpoint(tmp_path / 'c.pth.tar')
    base = ['--checkpoint', str(tmp_path / 'c.pth.tar'), '--data-dir', data_root, '--workers', '0']
    assert validate.main(base) == 0
    folded = _result(capsys)
    assert validate.main(base + ['--no-reparameterize']) == 0
    plain = _result(capsys)
    assert folded['reparameterized'] and not plain['reparameterized']
    assert folded['loss'] == pytest.approx(plain['loss'], abs=1e-4)


def test_plain_state_dict_and_safetensors_need_model_name(tmp_path, data_root, capsys, caplog):
    model = timm.create_model('test_camex_vit', num_classes=3, **KWARGS)
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    save_file(model.state_dict(), str(tmp_path / 'weights.safetensors'))
    kwargs = [f'{k}={v}' for k, v in KWARGS.items() if k != 'img_size']
    for name in ('weights.pth', 'weights.safetensors'):
        assert validate.main(['--checkpoint', str(tmp_path / name), '--model', 'test_camex_vit', '--img-size', '16',
                              '--model-kwargs', *kwargs, '--data-dir', data_root, '--dataset', '',
                              '--workers', '0']) == 0
        assert _result(capsys)['images'] == 18
    assert validate.main(['--checkpoint', str(tmp_path / 'weights.pth'), '--data-dir', data_root, '--dataset', '']) == 2
    assert '--model is required' in caplog.text


def test_valid_labels_evaluate_a_subset_of_logits(tmp_path, data_root, capsys, caplog):
    model = make_checkpoint(tmp_path / 'five.pth.tar', num_classes=5)
    labels = tmp_path / 'labels.txt'
    labels.write_text('0\n2\n4\n')
    argv = ['--checkpoint', str(tmp_path / 'five.pth.tar'), '--data-dir', data_root, '--workers', '0',
            '--no-reparameterize', '--valid-labels', str(labels)]
    assert validate.main(argv) == 0
    result = _result(capsys)
    assert result['top5'] == 100.0  # three candidate labels: top-5 is every one of them

    # the same numbers by hand: logits 0, 2, 4 of each image, argmax against the folder label
    from timm.data import create_transform
    from PIL import Image
    transform = create_transform((3, 16, 16), interpolation='bilinear', mean=(0.5,) * 3, std=(0.25,) * 3,
                                 crop_pct=1.0)
    correct, total = 0, 0
    model.eval()
    for target, name in enumerate(('class_a', 'class_b', 'class_c')):
        folder = os.path.join(data_root, 'validation', name)
        for file in sorted(os.listdir(folder)):
            x = transform(Image.open(os.path.join(folder, file)).convert('RGB')).unsqueeze(0)
            with torch.no_grad():
                logits = model(x)[0, [0, 2, 4]]
            correct += int(logits.argmax() == target)
            total += 1
    assert result['top1'] == pytest.approx(100. * correct / total, abs=1e-3)

    labels.write_text('0\n2\n')
    assert validate.main(argv) == 2 and 'lists 2 labels but the data has 3 classes' in caplog.text
    labels.write_text('0\n2\n9\n')
    assert validate.main(argv) == 2 and 'out of range for 5 classes' in caplog.text


def _rejects(argv, caplog, *fragments):
    caplog.clear()
    assert validate.main(argv) == 2
    for fragment in fragments:
        assert fragment in caplog.text, caplog.text


def test_bad_input(tmp_path, data_root, caplog):
    make_checkpoint(tmp_path / 'ok.pth.tar')
    ok = str(tmp_path / 'ok.pth.tar')
    results = tmp_path / 'results.json'
    common = ['--workers', '0', '--results-file', str(results)]
    _rejects(['--checkpoint', ok, '--data-dir', str(tmp_path / 'missing'), *common], caplog, 'does not exist')
    (tmp_path / 'empty' / 'validation').mkdir(parents=True)
    _rejects(['--checkpoint', ok, '--data-dir', str(tmp_path / 'empty'), *common], caplog, 'no images')
    _rejects(['--model', 'no_such_model', '--data-dir', data_root, '--dataset', '', *common], caplog,
             "unknown model 'no_such_model'")
    _rejects(['--checkpoint', ok, '--dataset', 'torch/nope', *common], caplog, 'unknown or unsupported dataset')
    two = write_image_folder(str(tmp_path / 'two'), 2, {'validation': 2}, size=16)
    _rejects(['--checkpoint', ok, '--data-dir', two, *common], caplog,
             'class-count mismatch', 'predicts 3 classes but the data has 2', '--valid-labels')
    with open(ok, 'rb') as f:
        (tmp_path / 'cut.pth.tar').write_bytes(f.read()[:1000])
    _rejects(['--checkpoint', str(tmp_path / 'cut.pth.tar'), '--data-dir', data_root, *common], caplog,
             'corrupt or truncated')
    (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    _rejects(['--checkpoint', str(tmp_path / 'cut.safetensors'), '--model', 'test_camex_vit', '--data-dir',
              data_root, '--dataset', '', *common], caplog, 'corrupt or truncated')
    (tmp_path / 'nothing').mkdir()
    _rejects(['--checkpoint', str(tmp_path / 'nothing'), *common], caplog, 'no checkpoint in folder')
    _rejects(['--checkpoint', ok, '--data-dir', data_root, '--use-ema', *common], caplog, 'holds no EMA weights')
    broken = write_image_folder(str(tmp_path / 'broken'), 3, {'validation': 2}, size=16)
    with open(os.path.join(broken, 'validation', 'class_a', 'bad.jpg'), 'wb') as f:
        f.write(b'\xff\xd8 this is no jpeg')
    _rejects(['--checkpoint', ok, '--data-dir', broken, *common], caplog, 'cannot be read', 'bad.jpg')
    assert not results.exists()  # no failed command wrote a results file
