"""Hugging Face Hub round trips, offline: a Hub cache laid out in a temp dir, ``HF_HUB_OFFLINE=1``, no network.

``push_to_hf_hub`` runs for real with its upload (``HfApi``) replaced by a stand-in that files the uploaded folder
into that cache, exactly where ``hf_hub_download`` looks for a downloaded snapshot.
"""
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import camex_vision
import timm
import timm.models._hub

ROUND_TRIPS = {
    'vit_dynamic_rank2_4experts': ('test_camex_vit', dict(
        num_experts=4, kron_rank=2, dynamic=True, router_per='linear', moe_blocks=[1, 2, 5], num_classes=10)),
    'swin_euclidean_dare': ('test_camex_swin', dict(merge='euclidean', mask='dare', top_k=3, balance_coef=1e-3)),
    'swin_smoe': ('test_camex_swin', dict(merge='smoe', top_k=1, num_classes=3)),
}


@pytest.fixture
def hub_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hub cache in ``tmp_path`` with offline mode on (the constants are read at import, so set both)."""
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def _put_in_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as the downloaded ``main`` snapshot of model repo ``repo_id`` (the Hub cache layout)."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(folder, repo / 'snapshots' / commit, dirs_exist_ok=True)
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)


class _OfflineHfApi:
    """Stands in for ``huggingface_hub.HfApi`` in ``push_to_hf_hub``: uploads land in the local Hub cache."""
    cache: Path = Path()

    def __init__(self, **kwargs):
        pass

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False):
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def file_exists(self, repo_id: str, filename: str, revision=None) -> bool:
        return False

    def upload_folder(self, repo_id: str, folder_path: str, **kwargs) -> str:
        _put_in_cache(self.cache, repo_id, Path(folder_path))
        return f'https://huggingface.co/{repo_id}'


def _outputs(model, inputs):
    with torch.no_grad():
        return model.eval()(inputs)


def _source(model_name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(model_name, **kwargs).eval()
    with torch.no_grad():  # away from the init, so that a silent re-init cannot pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    return model, torch.randn(2, *model.pretrained_cfg['input_size'])


@pytest.mark.parametrize('case', ROUND_TRIPS)
def test_save_for_hf_and_local_dir(case, tmp_path):
    model_name, kwargs = ROUND_TRIPS[case]
    model, inputs = _source(model_name, kwargs)
    timm.models.save_for_hf(model, tmp_path / 'export', safe_serialization='both')
    config = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert config['architecture'] == model_name
    moe_keys = {'num_experts', 'merge', 'top_k', 'router_noise', 'balance_coef', 'moe_blocks'}
    assert moe_keys <= set(config['model_args'])
    for key, value in kwargs.items():
        assert config['model_args'][key] == (list(value) if isinstance(value, tuple) else value), key
    loaded = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True)
    assert type(loaded) is type(model) and loaded.moe_config == model.moe_config
    torch.testing.assert_close(_outputs(loaded, inputs), _outputs(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize('case', ROUND_TRIPS)
def test_push_to_hf_hub_and_hf_hub_offline(case, hub_cache, monkeypatch):
    model_name, kwargs = ROUND_TRIPS[case]
    model, inputs = _source(model_name, kwargs)
    monkeypatch.setattr(_OfflineHfApi, 'cache', hub_cache)
    monkeypatch.setattr(timm.models._hub, 'HfApi', _OfflineHfApi)
    timm.models.push_to_hf_hub(model, f'someone/{case}')
    snapshot = next((hub_cache / f'models--someone--{case}' / 'snapshots').iterdir())
    assert {'config.json', 'model.safetensors', 'README.md'} <= {p.name for p in snapshot.iterdir()}
    loaded = timm.create_model(f'hf-hub:someone/{case}', pretrained=True)
    torch.testing.assert_close(_outputs(loaded, inputs), _outputs(model, inputs), rtol=0, atol=0)


def test_reparameterized_model_round_trips_as_what_it_is(tmp_path):
    model, inputs = _source('test_camex_vit', dict(dynamic=True, kron_rank=2, alpha=0.9))
    expected = _outputs(model, inputs)
    camex_vision.reparameterize(model)
    timm.models.save_for_hf(model, tmp_path / 'folded')
    args = json.loads((tmp_path / 'folded' / 'config.json').read_text())['model_args']
    assert (args['merge'], args['mask'], args['alpha'], args['dynamic']) == ('euclidean', None, 1.0, False)
    loaded = timm.create_model(f'local-dir:{tmp_path / "folded"}', pretrained=True)
    torch.testing.assert_close(_outputs(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_pretrained_tag_downloads_dense_weights_and_upcycles(hub_cache, tmp_path):
    """``create_model('test_camex_vit.r160_in1k', pretrained=True)`` fetches timm/test_vit.r160_in1k (from the
    offline cache here) and upcycles it: the logits equal those of timm's dense model loaded the same way."""
    torch.manual_seed(0)
    dense_weights = timm.create_model('test_vit').state_dict()
    folder = tmp_path / 'dense'
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in dense_weights.items()}, str(folder / 'model.safetensors'))
    _put_in_cache(hub_cache, 'timm/test_vit.r160_in1k', folder)
    dense = timm.create_model('test_vit.r160_in1k', pretrained=True)
    model = timm.create_model('test_camex_vit.r160_in1k', pretrained=True)
    inputs = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(_outputs(model, inputs), _outputs(dense, inputs), rtol=0, atol=1e-4)
