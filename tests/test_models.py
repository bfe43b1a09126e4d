"""The timm model contract for every registered CAMEx model, after timm's own tests/test_models.py.

Full-size architectures (up to ~290M parameters) run the shape and gradient-connectivity checks on the ``meta``
device: shapes propagate and autograd builds the graph, but nothing is allocated or computed. The tiny
``test_camex_*`` models run every check with real numbers (NaNs, equalities, FX, torch.compile). Real-number
forwards of the full-size models are in test_models_upcycle.py.
"""
import math

import pytest
import torch

import camex_vision
import timm
import timm.optim
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureInfo
from timm.models._manipulate import group_with_matcher

ALL_MODELS = timm.list_models('*camex*')
TEST_MODELS = ['test_camex_vit', 'test_camex_swin']
FULL_MODELS = [name for name in ALL_MODELS if name not in TEST_MODELS]

# the same size targets as timm's tests
TARGET_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
TARGET_FFEAT_SIZE = 96
TARGET_FX_SIZE = 128

# non-default MoE configurations every test model must also honour
VARIANTS = {
    'euclidean': dict(merge='euclidean'),
    'no_mask': dict(mask=None),
    'dare_element': dict(mask='dare', dare_mode='element'),
    'smoe': dict(merge='smoe'),
    'dynamic': dict(dynamic=True),
    'router_per_linear_top2_rank2': dict(router_per='linear', top_k=2, kron_rank=2, alpha=0.8),
}


def _device(model_name: str) -> str:
    return 'cpu' if model_name in TEST_MODELS else 'meta'


def _create(model_name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(model_name, pretrained=False, device=_device(model_name), **kwargs)


def _input_size(model: torch.nn.Module, target: int):
    """timm's _get_input_size: the cfg size for fixed-size models, else capped at ``target``."""
    cfg = model.pretrained_cfg
    size = cfg['input_size']
    if cfg.get('fixed_input_size'):
        return size
    return tuple(min(s, target) for s in size)


def _randn(model_name: str, batch_size: int, input_size) -> torch.Tensor:
    return torch.randn((batch_size, *input_size), device=_device(model_name))


def _variant_kwargs(model_name: str, variant: str):
    kwargs = dict(VARIANTS[variant])
    if variant == 'dynamic' and model_name == 'test_camex_swin':
        kwargs['moe_blocks'] = [[], [0], [0, 1], [0, 1]]  # chains of two in stages 3 and 4
    return kwargs


def test_registry_lists_the_eight_models():
    assert set(ALL_MODELS) == {
        'camex_vit_tiny_patch16_224', 'camex_vit_small_patch16_224', 'camex_vit_base_patch16_224',
        'camex_swin_tiny_patch4_window7_224', 'camex_swin_small_patch4_window7_224',
        'camex_swin_base_patch4_window7_224', 'test_camex_vit', 'test_camex_swin'}


@pytest.mark.parametrize('model_name', FULL_MODELS + ['test_camex_vit'])
def test_pretrained_tags_point_at_dense_timm_weights(model_name):
    tags = timm.list_pretrained(f'{model_name}.*')
    assert tags
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        dense_name = cfg.hf_hub_id.removeprefix('timm/')
        assert cfg.hf_hub_id.startswith('timm/') and not cfg.custom_load and not cfg.url
        assert timm.is_model(dense_name.split('.')[0]) and dense_name.split('.')[1] == tag.split('.')[1]
        assert cfg.input_size == timm.models.get_pretrained_cfg(dense_name).input_size


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_model_forward(model_name):
    model = _create(model_name).eval()
    inputs = _randn(model_name, 1, _input_size(model, TARGET_FWD_SIZE))
    outputs = model(inputs)
    assert outputs.shape == (1, model.num_classes)
    if _device(model_name) == 'cpu':
        assert not torch.isnan(outputs).any()
        model.set_grad_checkpointing()
        assert torch.allclose(outputs, model(inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_model_backward(model_name):
    model = _create(model_name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    outputs = model(_randn(model_name, 2, _input_size(model, TARGET_BWD_SIZE)))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'No gradient for {n}'
    assert num_params == sum(p.grad.numel() for p in model.parameters())
    assert outputs.shape[-1] == 42
    if _device(model_name) == 'cpu':
        assert not torch.isnan(outputs).any()


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_model_backward_variants(model_name, variant):
    model = _create(model_name, num_classes=42, **_variant_kwargs(model_name, variant)).train()
    outputs = model(_randn(model_name, 2, _input_size(model, TARGET_BWD_SIZE)))
    outputs.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize('variant', ['default', 'smoe', 'dynamic'])
@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_model_trains_and_infers_under_bfloat16_autocast(model_name, variant):
    kwargs = {} if variant == 'default' else _variant_kwargs(model_name, variant)
    model = _create(model_name, num_classes=42, **kwargs).train()
    x = _randn(model_name, 2, _input_size(model, TARGET_BWD_SIZE))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = model(x)
    outputs.float().mean().backward()
    assert outputs.dtype == torch.bfloat16 and torch.isfinite(outputs.float()).all()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(model(x).float()).all()


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_model_default_cfgs(model_name):
    """timm's test_model_default_cfgs (Swin, spatial output) and test_model_default_cfgs_non_std (ViT)."""
    model = _create(model_name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    inputs = _randn(model_name, 1, cfg['input_size'])
    features = model.forward_features(inputs)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape[1] == model.head_hidden_size
    spatial = getattr(model, 'output_fmt', None) == 'NHWC'
    if spatial:  # Swin: unpooled features match pool_size
        spatial_axis, feat_axis = get_spatial_dim('NHWC'), get_channel_dim('NHWC')
        assert tuple(features.shape[a] for a in spatial_axis) == tuple(cfg['pool_size'])
        assert features.shape[feat_axis] == model.num_features
    else:  # ViT: [b, tokens, c]
        assert features.shape[-1] == model.num_features
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(inputs)
    assert outputs.shape == pre_logits.shape == (1, model.head_hidden_size)
    if spatial:
        model.reset_classifier(0, '')
        assert model(inputs).shape[1:3] == tuple(cfg['pool_size'])
        model = _create(model_name, num_classes=0, global_pool='').eval()
        assert model(inputs).shape[1:3] == tuple(cfg['pool_size'])
    else:
        model = _create(model_name, num_classes=0).eval()
        assert model(inputs).shape[-1] == model.num_features
    for c in (cfg['classifier'],) if isinstance(cfg['classifier'], str) else cfg['classifier']:
        assert c + '.weight' in state_dict
    for c in (cfg['first_conv'],) if isinstance(cfg['first_conv'], str) else cfg['first_conv']:
        assert c + '.weight' in state_dict


def _check_feature_outputs(feature_info, outputs, input_size, batch_size, output_fmt):
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) >= 3 and len(outputs) == len(channels)
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[feat_axis] == c and o.shape[0] == batch_size
        assert o.shape[spatial_axis[0]] <= math.ceil(input_size[-2] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(input_size[-1] / r) + 1
        if o.device.type == 'cpu':
            assert not torch.isnan(o).any()


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_model_forward_features(model_name, feature_cls):
    kwargs = dict(feature_cls=feature_cls) if feature_cls else {}
    model = _create(model_name, features_only=True, **kwargs).eval()
    input_size = _input_size(model, TARGET_FFEAT_SIZE)
    outputs = model(_randn(model_name, 1, input_size))
    output_fmt = getattr(model, 'output_fmt', 'NCHW') if feature_cls is None else 'NCHW'
    _check_feature_outputs(model.feature_info, outputs, input_size, 1, output_fmt)


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_model_forward_intermediates(model_name):
    model = _create(model_name).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    input_size = _input_size(model, TARGET_FFEAT_SIZE)
    inputs = _randn(model_name, 1, input_size)
    output, intermediates = model.forward_intermediates(inputs, output_fmt='NCHW')
    _check_feature_outputs(feature_info, intermediates, input_size, 1, 'NCHW')
    if _device(model_name) == 'cpu':
        assert torch.allclose(output, model.forward_features(inputs))
        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(inputs, output_fmt='NCHW')
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)


def _create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's tests' FX feature extractor (torchvision), with timm's leaf modules and autowrapped functions."""
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-graph_node_names.index(n)] for n in output_node_names]
    return create_feature_extractor(
        model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_model_forward_fx(model_name):
    pytest.importorskip('torchvision')
    model = _create(model_name).eval()
    inputs = _randn(model_name, 1, _input_size(model, TARGET_FX_SIZE))
    with torch.inference_mode():
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(inputs).values()))
    assert torch.all(fx_outputs == outputs)


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_model_backward_fx(model_name):
    pytest.importorskip('torchvision')
    model = _create(model_name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(_randn(model_name, 2, _input_size(model, TARGET_FX_SIZE))).values()))
    outputs.mean().backward()
    assert [n for n, p in fx_model.named_parameters() if p.grad is None] == []
    assert num_params == sum(p.grad.numel() for p in fx_model.parameters())
    assert outputs.shape[-1] == 42


def test_torchscript_is_unsupported():
    """Documented in docs/models.md: TorchScript is deprecated and the merge core keeps untypable Python state."""
    model = _create('test_camex_vit').eval()
    with pytest.raises(Exception):
        torch.jit.script(model)


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_torch_compile_fullgraph(model_name):
    torch._dynamo.reset()
    model = _create(model_name).eval()
    inputs = _randn(model_name, 2, _input_size(model, TARGET_FWD_SIZE))
    with torch.no_grad():
        expected = model(inputs)
        compiled = torch.compile(model, backend='eager', fullgraph=True)
        assert torch.allclose(compiled(inputs), expected, atol=1e-6)


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_group_matcher_and_no_weight_decay(model_name):
    model = _create(model_name)
    names = {n for n, _ in model.named_parameters()}
    groups = group_with_matcher(model.named_parameters(), model.group_matcher(), return_values=False)
    assert {n for group in groups.values() for n in group} == names
    no_decay = model.no_weight_decay()
    curvature = {n for n in names if '.curvature.' in n}
    assert curvature and curvature <= no_decay
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert not any(id(p) in decayed for n, p in model.named_parameters() if n in curvature)


def test_grad_checkpointing_same_gradients_with_dynamic_chain():
    """Training-mode gradients are unchanged by checkpointing, also through propagated dynamic bases."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _create('test_camex_vit', dynamic=True, router_noise=False, num_classes=5).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        model(torch.randn(2, 3, 64, 64)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_aux_loss_and_expert_usage():
    model = _create('test_camex_vit', balance_coef=1e-2, top_k=2).train()
    model(torch.randn(4, 3, 64, 64))
    assert camex_vision.aux_loss(model).item() > 0
    usage = camex_vision.expert_usage(model)
    assert sorted(usage) == ['blocks.1.mlp', 'blocks.3.mlp', 'blocks.5.mlp']
    assert all(u.shape == (7,) for u in usage.values())


def test_parameter_count_by_hand():
    """test_camex_vit: dense test_vit plus, per MoE block (3 of them), 7 extra experts, curvature and router."""
    dense = 371_240  # timm's test_vit
    experts = 7 * (64 * 192 + 192 + 192 * 64 + 64)  # fc1 + fc2 of each domain expert
    curvature = 7 * 2 * (8 * 8 + 8 * 8 + 12 * 12 + 16 * 16)  # 64 = 8 x 8, 192 = 12 x 16; both linears
    router = 2 * 64 * 7  # gate and noise linears, 7 domain experts
    model = _create('test_camex_vit')
    assert sum(p.numel() for p in model.dense_counterpart().parameters()) == dense
    assert sum(p.numel() for p in model.parameters()) == dense + 3 * (experts + curvature + router) == 917_576
    # dynamic: blocks 3 and 5 inherit their bases, dropping one fc1 and one fc2 base each
    dynamic = _create('test_camex_vit', dynamic=True)
    assert sum(p.numel() for p in dynamic.parameters()) == 917_576 - 2 * (64 * 192 + 192 + 192 * 64 + 64)


def test_swin_small_matches_the_paper_parameter_count():
    """The paper's Swin-S: 157M parameters with 8 experts (50M dense), Kronecker rank 1."""
    model = timm.create_model('camex_swin_small_patch4_window7_224', device='meta', kron_rank=1)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 157e6) / 157e6 < 0.02
    assert model.moe_blocks == ((), (), tuple(range(1, 18, 2)), (1,))


def test_placement_defaults_and_overrides():
    assert _create('camex_vit_base_patch16_224').moe_blocks == (1, 3, 5, 7, 9, 11)
    assert _create('camex_vit_base_patch16_224', moe_blocks=[-1, -3]).moe_blocks == (9, 11)
    assert _create('camex_swin_tiny_patch4_window7_224').moe_blocks == ((), (), (1, 3, 5), (1,))
    model = _create('test_camex_vit', moe_blocks=[0, 2])
    assert [n for n, _ in camex_vision.models.moe_modules(model)] == ['blocks.0.mlp', 'blocks.2.mlp']


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_wrong_channel_count_names_expected_and_actual(model_name):
    model = _create(model_name).eval()
    size = model.pretrained_cfg['input_size']
    with pytest.raises(AssertionError, match=r'Input channels \(1\) don\'t match model \(3\)'):
        model(torch.randn(1, 1, *size[1:]))


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_wrong_image_size_names_expected_and_actual(model_name):
    model = _create(model_name, dynamic_img_size=False).eval()  # the full-size architectures' setting
    expected = model.pretrained_cfg['input_size'][1]
    with pytest.raises(AssertionError, match=rf'Input height \(96\) doesn\'t match model \({expected}\)'):
        model(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize('model_name', TEST_MODELS)
def test_unknown_kwargs_are_rejected(model_name):
    with pytest.raises(TypeError, match='not_an_option'):
        _create(model_name, not_an_option=1)


@pytest.mark.parametrize('kwargs, match', [
    (dict(block_fn=torch.nn.Identity), 'block_fn'),
    (dict(merge='smoe', mask='dare'), "mask='dare' does not apply to merge='smoe'"),
    (dict(merge='smoe', dynamic=True), 'dynamic=True does not apply'),
    (dict(merge='ties'), "merge='ties' is not supported"),
    (dict(moe_blocks=[6]), 'out of range'),
    (dict(moe_blocks=[1, -5]), 'twice'),
    (dict(num_experts=1), 'num_experts=1'),
])
def test_bad_moe_options_are_rejected(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _create('test_camex_vit', **kwargs)


def test_swin_moe_blocks_must_be_given_per_stage():
    with pytest.raises(ValueError, match='each of the 4 stages'):
        _create('test_camex_swin', moe_blocks=[1, 3])
