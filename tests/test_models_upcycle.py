"""Pretrained loading through timm's normal path: exact upcycling of dense checkpoints, CAMEx checkpoints.

Dense Hub weights cannot be downloaded here, so each test builds the dense timm model (random init), saves its
state dict and creates the CAMEx model with ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``: the same
``load_pretrained`` + ``checkpoint_filter_fn`` path a Hub download takes (test_hub.py covers the Hub itself).
"""
import pytest
import torch
from safetensors.torch import save_file

import camex_vision
import timm
from camex_vision.models import camex_swin, camex_vit
from timm.models.vision_transformer import VisionTransformer

TEST_MODELS = ['test_camex_vit', 'test_camex_swin']
FULL_MODELS = [name for name in timm.list_models('*camex*') if name not in TEST_MODELS]
FILTERS = {'test_camex_vit': camex_vit.checkpoint_filter_fn, 'test_camex_swin': camex_swin.checkpoint_filter_fn}

# every merge / mask option; upcycling must be exact for each, before and after reparameterize
OPTIONS = {
    'camex_ties': dict(),
    'camex_dare': dict(mask='dare'),
    'camex_no_mask': dict(mask=None),
    'camex_ties_trim': dict(density=0.5),
    'euclidean_ties': dict(merge='euclidean'),
    'euclidean_dare': dict(merge='euclidean', mask='dare'),
    'euclidean_no_mask': dict(merge='euclidean', mask=None),
    'smoe': dict(merge='smoe'),
    'router_per_linear_top2_rank2_alpha': dict(router_per='linear', top_k=2, kron_rank=2, alpha=0.8),
    'dynamic_alpha1': dict(dynamic=True),
}


def _options(model_name: str, option: str):
    kwargs = dict(OPTIONS[option])
    if option == 'dynamic_alpha1' and model_name == 'test_camex_swin':
        kwargs['moe_blocks'] = [[], [0], [0, 1], [0, 1]]  # chains of two in stages 3 and 4
    return kwargs


def _save(state_dict, path) -> str:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


def _dense_file(model_name: str, tmp_path, **size) -> tuple:
    """A dense timm model of the architecture (random init) and its weights saved as safetensors."""
    dense = timm.create_model(model_name, device='meta', **size).dense_counterpart(device='cpu').eval()
    return dense, _save(dense.state_dict(), tmp_path / 'dense.safetensors')


def _assert_same_logits(dense, model, inputs):
    """float32 logits of the upcycled model equal the dense model's, before and after reparameterize."""
    with torch.no_grad():
        expected = dense(inputs)
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=1e-4)
        camex_vision.reparameterize(model)
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize('option', OPTIONS)
@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_upcycling_is_exact(model_name, option, tmp_path):
    torch.manual_seed(0)
    dense, path = _dense_file(model_name, tmp_path)
    model = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **_options(model_name, option)).eval()
    _assert_same_logits(dense, model, torch.randn(2, *model.pretrained_cfg['input_size']))


@pytest.mark.parametrize('model_name', FULL_MODELS)
def test_upcycling_is_exact_full_size(model_name, tmp_path):
    """Every full-size architecture with the default options (CAMEx + TIES), one image at a reduced size.

    The cost is the curvature transform, once per forward and once in reparameterize (~30 GMACs each for the
    base models, whatever the batch), so the other options run on the test models only.
    """
    torch.manual_seed(0)
    size = dict(img_size=64 if 'vit' in model_name else 112)
    dense, path = _dense_file(model_name, tmp_path, **size)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **size).eval()
    _assert_same_logits(dense, model, torch.randn(1, 3, size['img_size'], size['img_size']))


def test_upcycling_resamples_like_the_dense_model(tmp_path):
    """timm's dense filter runs first: a 160px checkpoint loads into a 96px model as it does into dense ViT."""
    torch.manual_seed(0)
    dense160, path = _dense_file('test_camex_vit', tmp_path, dynamic_img_size=False)
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=path), img_size=96, dynamic_img_size=False)
    dense = timm.create_model('test_vit', **kwargs).eval()
    model = timm.create_model('test_camex_vit', **kwargs).eval()
    assert model.pos_embed.shape == dense.pos_embed.shape != dense160.pos_embed.shape
    _assert_same_logits(dense, model, torch.randn(2, 3, 96, 96))


def test_upcycled_model_trains_away_from_dense(tmp_path):
    """Upcycled experts are copies, routers and curvature fresh: one step moves the experts apart."""
    torch.manual_seed(0)
    _, path = _dense_file('test_camex_vit', tmp_path)
    model = timm.create_model('test_camex_vit', pretrained=True, pretrained_cfg_overlay=dict(file=path)).train()
    fc1 = model.blocks[1].mlp.fc1
    assert torch.equal(fc1.weight_experts[0], fc1.weight_base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 64, 64)).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(fc1.weight_experts[0], fc1.weight_experts[1])


def test_features_only_and_other_channels_load_dense_weights(tmp_path):
    """timm's test_model_load_pretrained / features_pretrained: in_chans=1 adapts the stem, features_only loads."""
    _, path = _dense_file('test_camex_swin', tmp_path)
    overlay = dict(file=path)
    model = timm.create_model('test_camex_swin', pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                              num_classes=5).eval()
    assert model(torch.randn(1, 1, 128, 128)).shape == (1, 5)
    features = timm.create_model('test_camex_swin', pretrained=True, pretrained_cfg_overlay=overlay,
                                 features_only=True).eval()
    assert len(features(torch.randn(1, 3, 128, 128))) == 4


def _camex_checkpoint(model_name: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(model_name, **kwargs).eval()
    with torch.no_grad():  # move away from the init so that a silent re-init would be caught
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    return model


@pytest.mark.parametrize('wrap', ['plain', 'training_state_dict', 'training_model_ddp'])
@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_loads_camex_checkpoints(model_name, wrap, tmp_path):
    source = _camex_checkpoint(model_name, dynamic=True, kron_rank=2)
    state = source.state_dict()
    if wrap == 'training_state_dict':
        checkpoint = {'epoch': 3, 'arch': model_name, 'state_dict': state, 'optimizer': {}}
    elif wrap == 'training_model_ddp':
        checkpoint = {'model': {'module.' + k: v for k, v in state.items()}, 'epoch': 3}
    else:
        checkpoint = state
    path = tmp_path / 'checkpoint.pth'
    torch.save(checkpoint, path)
    model = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), dynamic=True, kron_rank=2).eval()
    inputs = torch.randn(2, *model.pretrained_cfg['input_size'])
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), source(inputs), rtol=0, atol=0)
    # the filter itself unwraps too (for callers that pass a checkpoint dict directly)
    assert FILTERS[model_name](checkpoint, model).keys() == state.keys()


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_checkpoint_head_is_reset_for_other_num_classes(model_name, tmp_path):
    source = _camex_checkpoint(model_name)
    path = tmp_path / 'checkpoint.pth'
    torch.save(source.state_dict(), path)
    classifier = source.pretrained_cfg['classifier']
    for num_classes in (10, 0):
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=num_classes)
        state = model.state_dict()
        for key, value in source.state_dict().items():
            if not key.startswith(classifier + '.'):
                assert torch.equal(state[key], value), key
        assert model.num_classes == num_classes
    # a checkpoint fine-tuned for 10 classes loads into a 1000-class model with a fresh head
    ten = _camex_checkpoint(model_name, num_classes=10)
    torch.save(ten.state_dict(), path)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.get_classifier().weight.shape[0] == 1000


@pytest.mark.parametrize('saved, loaded, match', [
    (dict(num_experts=4), dict(), r'checkpoint num_experts=\[4\], model num_experts=\[8\]'),
    (dict(moe_blocks=[1, 3]), dict(), r"at \['blocks.1.mlp', 'blocks.3.mlp'\] but the model has them at "
                                      r"\['blocks.1.mlp', 'blocks.3.mlp', 'blocks.5.mlp'\]"),
    (dict(merge='smoe'), dict(), r'checkpoint has 8 token-choice \(smoe\) experts, model has 8 merged experts'),
    (dict(dynamic=True), dict(), r'checkpoint has 8 merged experts \(camex, base propagated \(dynamic\)\)'),
    (dict(), dict(merge='euclidean'), r'model has 8 merged experts \(euclidean/reparameterized\)'),
])
def test_mismatched_checkpoints_are_rejected_naming_both(saved, loaded, match, tmp_path):
    path = tmp_path / 'checkpoint.pth'
    torch.save(_camex_checkpoint('test_camex_vit', **saved).state_dict(), path)
    with pytest.raises(ValueError, match=match):
        timm.create_model('test_camex_vit', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **loaded)


def test_swin_placement_mismatch_names_both(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    torch.save(_camex_checkpoint('test_camex_swin', moe_blocks=[[], [], [0, 1], [1]]).state_dict(), path)
    with pytest.raises(ValueError, match=r"at \['layers.2.blocks.0.mlp', 'layers.2.blocks.1.mlp', "
                                         r"'layers.3.blocks.1.mlp'\] but the model has them at "
                                         r"\['layers.2.blocks.1.mlp', 'layers.3.blocks.1.mlp'\]"):
        timm.create_model('test_camex_swin', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_dense_checkpoint_of_another_architecture_is_rejected(tmp_path):
    dense = VisionTransformer(img_size=160, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=3)
    path = _save(dense.state_dict(), tmp_path / 'dense.safetensors')
    with pytest.raises(ValueError, match='no weights for blocks.3.mlp'):
        timm.create_model('test_camex_vit', pretrained=True, pretrained_cfg_overlay=dict(file=path))
