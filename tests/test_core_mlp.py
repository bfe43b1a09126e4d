"""CAMExMlp / SMoEMlp promises: exact upcycling, exact reparameterisation, gradients everywhere, clear errors."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

import camex_vision
from camex_vision.core import CAMExGatedMlp, CAMExMlp, SMoEMlp, link_dynamic_chain, reparameterize

MERGES = ['euclidean', 'camex']
MASKS = [None, 'ties', 'dare']
ROUTER_PER = ['ffn', 'linear']
COMBOS = list(itertools.product(MERGES, MASKS, ROUTER_PER))


def _dense_mlp(seed=0, d=12, h=20, norm=False):
    from timm.layers import Mlp  # tests may use timm; the core itself does not
    torch.manual_seed(seed)
    return Mlp(d, h, act_layer=lambda: nn.GELU(approximate='tanh'), norm_layer=nn.LayerNorm if norm else None)


def _perturb(module, scale=0.1, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.mark.parametrize('merge,mask,router_per', COMBOS)
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_upcycling_reproduces_the_dense_mlp(merge, mask, router_per, mode):
    dense = _dense_mlp(norm=True)
    moe = CAMExMlp.from_dense(dense, merge=merge, mask=mask, router_per=router_per, kron_rank=2, alpha=0.8,
                              top_k=3, num_experts=5)
    getattr(moe, mode)()  # noisy routing and DARE in training cannot move an upcycled model: tau = 0
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-6)


def test_upcycled_state_dict_matches_from_dense():
    dense = _dense_mlp()
    a = CAMExMlp.from_dense(dense)
    b = CAMExMlp(12, 20, act_layer=lambda: nn.GELU(approximate='tanh'))
    sd = b.upcycled_state_dict(dense.state_dict())
    for key in ('fc1.weight_base', 'fc1.weight_experts', 'fc2.bias_experts', 'fc1.curvature.a'):
        assert torch.equal(sd[key], a.state_dict()[key]), key
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(b.eval()(x), dense(x), rtol=0, atol=1e-6)


def test_gated_upcycling_reproduces_a_t5_style_ffn():
    torch.manual_seed(0)
    wi0, wi1, wo = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)
    x = torch.randn(2, 5, 8)
    ref = wo(torch.relu(wi0(x)) * wi1(x))
    moe = CAMExGatedMlp.from_dense((wi0, wi1, wo), act_layer=nn.ReLU, num_experts=4, router_per='linear')
    torch.testing.assert_close(moe.eval()(x), ref, rtol=0, atol=1e-6)


def test_upcycling_rejects_other_shapes():
    moe = CAMExMlp(12, 20)
    with pytest.raises(ValueError, match=r'fc1.weight of shape \(24, 12\); expected \(20, 12\)'):
        moe.upcycled_state_dict({**_dense_mlp().state_dict(), 'fc1.weight': torch.zeros(24, 12)})
    with pytest.raises(ValueError, match=r'shape \(20, 10\)'):
        moe.fc1.load_dense(torch.zeros(20, 10), torch.zeros(20))
    with pytest.raises(ValueError, match='fc1 has 20 outputs but fc2 expects 30'):
        CAMExMlp.from_dense((nn.Linear(12, 20), nn.Linear(30, 12)))


def _dynamic_stack(merge, mask, router_per, n_layers=3, **options):
    torch.manual_seed(4)
    layers = [CAMExMlp(12, 20, num_experts=4, merge=merge, mask=mask, router_per=router_per, **options)
              for _ in range(n_layers)]
    link_dynamic_chain([m.fc1 for m in layers])
    link_dynamic_chain([m.fc2 for m in layers])
    return nn.Sequential(*layers)


@pytest.mark.parametrize('merge,mask,router_per', COMBOS)
@pytest.mark.parametrize('dynamic', [False, True])
def test_reparameterisation_reproduces_the_trained_model(merge, mask, router_per, dynamic):
    options = dict(kron_rank=2, alpha=0.7, density=0.6 if mask == 'ties' else 1.0)
    if dynamic:
        model = _dynamic_stack(merge, mask, router_per, **options)
    else:
        torch.manual_seed(4)
        model = nn.Sequential(*[CAMExMlp(12, 20, num_experts=4, merge=merge, mask=mask, router_per=router_per,
                                         **options) for _ in range(2)])
    _perturb(model, 0.2)  # a "trained" model: curvature far from identity, experts apart
    model.eval()
    x = torch.randn(4, 9, 12)
    with torch.no_grad():
        expected = model(x)
        folded = reparameterize(copy.deepcopy(model))
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for layer in folded.modules():
        if isinstance(layer, camex_vision.MergedLinear):
            assert layer.curvature is None and layer.mask is None and layer.alpha == 1. and layer.owns_base


def test_reparameterisation_after_a_truncated_pass_ignores_stale_bases():
    model = _perturb(_dynamic_stack('camex', 'ties', 'ffn'), 0.2).eval()
    x = torch.randn(2, 5, 12)
    model[0](x)  # a truncated pass leaves layer 0's propagated base cached ...
    _perturb(model[0], 0.1, seed=9)  # ... and then the weights change
    expected = copy.deepcopy(model)(x)  # a copy holds no cache
    torch.testing.assert_close(reparameterize(model)(x), expected, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_of_a_dynamic_chain_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint
    model = _perturb(_dynamic_stack('camex', 'ties', 'linear', router_noise=False), 0.2).train()
    x = torch.randn(2, 5, 12)
    grads = []
    for use_ckpt in (False, True):
        model.zero_grad()
        h = x
        for layer in model:
            h = checkpoint(layer, h, use_reentrant=False) if use_ckpt else layer(h)
        h.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize('merge,mask,router_per', COMBOS)
def test_every_parameter_receives_a_gradient(merge, mask, router_per):
    model = _dynamic_stack(merge, mask, router_per, top_k=2, balance_coef=0.01)
    model.train()
    y = model(torch.randn(3, 6, 12))
    (y.square().mean() + camex_vision.aux_loss(model)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_smoe_every_expert_gets_a_gradient_even_unused():
    moe = SMoEMlp(12, 20, num_experts=8, top_k=2).train()
    moe(torch.randn(1, 1, 12)).sum().backward()  # one token: 6 of 8 experts see no token
    assert all(p.grad is not None for p in moe.parameters())


def test_smoe_hand_value_and_upcycling():
    moe = SMoEMlp(1, 1, num_experts=3, top_k=2, bias=False, act_layer=nn.Identity, router_noise=False).eval()
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.tensor([[1.], [0.], [-5.]]))  # x = ln 3: logits [ln 3, 0, -5 ln 3]
        moe.fc1_weight.copy_(torch.tensor([[[1.]], [[2.]], [[3.]]]))
        moe.fc2_weight.copy_(torch.tensor([[[1.]], [[1.]], [[1.]]]))
    x = torch.tensor([[math.log(3.)]])
    # top-2 gates [3/4, 1/4, 0]: y = x * (3/4 * 1 + 1/4 * 2)
    torch.testing.assert_close(moe(x), x * 1.25)
    dense = _dense_mlp()
    up = SMoEMlp.from_dense(dense, num_experts=4, top_k=2).eval()
    z = torch.randn(2, 5, 12)
    torch.testing.assert_close(up(z), dense(z), rtol=0, atol=1e-5)


def test_aux_loss_and_usage():
    model = _dynamic_stack('camex', 'ties', 'ffn', balance_coef=0.5)
    assert camex_vision.aux_loss(model).item() == 0.  # nothing recorded before a forward pass
    model.train()
    model(torch.randn(4, 3, 12))
    parts = [m.last_aux_loss for m in model]
    torch.testing.assert_close(camex_vision.aux_loss(model), sum(parts))
    usage = camex_vision.expert_usage(model)
    assert sorted(usage) == ['0', '1', '2'] and all(u.shape == (3,) for u in usage.values())
    torch.testing.assert_close(usage['0'].sum(), torch.tensor(1.))
    off = CAMExMlp(12, 20)
    off(torch.randn(2, 3, 12))
    assert camex_vision.aux_loss(off).item() == 0.


def test_deepcopy_and_state_dict_round_trip_after_a_forward():
    model = _dynamic_stack('camex', 'ties', 'linear', balance_coef=0.1).train()
    model(torch.randn(2, 3, 12))
    twin = copy.deepcopy(model)  # model EMA deep-copies a model that has just run forward
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))


@pytest.mark.parametrize('options,pattern', [
    (dict(num_experts=1), 'num_experts=1'),
    (dict(top_k=0), 'top_k=0'),
    (dict(num_experts=4, top_k=4), r'top_k=4 .* 1\.\.3'),
    (dict(kron_rank=0), 'kron_rank=0'),
    (dict(alpha=float('nan')), 'alpha=nan'),
    (dict(alpha=float('inf')), 'alpha=inf'),
    (dict(dare_p=1.0), r'dare_p=1.0 .* \[0, 1\)'),
    (dict(dare_p=-0.1), 'dare_p=-0.1'),
    (dict(density=0.0), r'density=0.0 .* \(0, 1\]'),
    (dict(density=1.5), 'density=1.5'),
    (dict(merge='fisher'), "merge='fisher'.*'euclidean', 'camex'"),
    (dict(mask='trim'), "mask='trim'"),
    (dict(router_per='token'), "router_per='token'"),
    (dict(dare_mode='row'), "dare_mode='row'"),
    (dict(balance_coef=-1.), 'balance_coef=-1.0'),
    (dict(segment_length=0), 'segment_length=0'),
    (dict(num_experts=2.5), 'num_experts=2.5'),
])
def test_bad_options_raise_naming_the_option(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        CAMExMlp(12, 20, **options)


def test_smoe_bad_options():
    with pytest.raises(ValueError, match='top_k=9'):
        SMoEMlp(12, 20, num_experts=8, top_k=9)
    with pytest.raises(ValueError, match='num_experts=1'):
        SMoEMlp(12, 20, num_experts=1)


@pytest.mark.parametrize('cls', [CAMExMlp, SMoEMlp])
def test_wrong_input_features_name_both_sizes(cls):
    with pytest.raises(ValueError, match='expects 12 input features, got 10'):
        cls(12, 20)(torch.randn(2, 3, 10))


def test_accepts_any_token_layout():
    moe = CAMExMlp(12, 20).eval()
    x = torch.randn(2, 4, 5, 12)  # Swin's NHWC blocks: one routing unit per sample
    torch.testing.assert_close(moe(x), moe(x.reshape(2, 20, 12)).reshape(2, 4, 5, 12))


def test_runs_under_torch_compile():
    torch.manual_seed(0)
    moe = _perturb(CAMExMlp(12, 20, num_experts=4, kron_rank=2)).eval()
    x = torch.randn(3, 5, 12)
    compiled = torch.compile(moe)
    torch.testing.assert_close(compiled(x), moe(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the inference path (eager: scratch buffers; compiled: never)
        torch.testing.assert_close(compiled(x), moe(x), rtol=1e-4, atol=1e-5)
    moe.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


MIXED = [dict(merge='camex', mask='ties'), dict(merge='euclidean', mask='dare'),
         dict(merge='camex', mask=None, router_per='linear')]


@pytest.mark.parametrize('make', [lambda: SMoEMlp(12, 20)] + [
    (lambda o: lambda: _perturb(CAMExMlp.from_dense(_dense_mlp(), **o)))(o) for o in MIXED])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_bfloat16_autocast_matches_a_dense_mlp_dtype_and_trains(make, mode):
    moe, dense = make(), _dense_mlp()
    getattr(moe, mode)()
    x = torch.randn(3, 5, 12, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, y_dense = moe(x), dense(x)
    assert y.dtype == y_dense.dtype == torch.bfloat16
    if mode == 'eval':  # (training passes draw router noise and DARE drops: no two are alike)
        with torch.no_grad():
            ref = moe(x)  # float32 pass: autocast only rounds, it must not change what is computed
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    else:
        y.float().square().mean().backward()
        assert x.grad is not None and all(p.grad is not None for p in moe.parameters())


@pytest.mark.parametrize('make', [lambda: SMoEMlp(12, 20), lambda: CAMExMlp(12, 20)])
def test_bfloat16_weights_run_in_bfloat16(make):
    moe = make().to(torch.bfloat16).eval()
    with torch.no_grad():
        y = moe(torch.randn(3, 5, 12, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
