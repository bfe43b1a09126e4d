"""Merged linears: masks, Euclidean and CAMEx merging, dynamic chains, with hand-computed numbers."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from camex_vision.core import MergedLinear, dare_keep, link_dynamic_chain, ties_mask


def test_ties_sign_election_hand_values():
    tau = torch.tensor([[3., -1., 2., .5], [-1., 2., -4., 1.5], [2., .5, 1., -3.]])  # sum [4, 1.5, -1, -1]
    expected = torch.tensor([[1., 0., 0., 0.], [0., 1., 1., 0.], [1., 1., 0., 1.]])
    assert torch.equal(ties_mask(tau), expected)


def test_ties_trim_then_elect_hand_values():
    tau = torch.tensor([[3., -1., 2., .5], [-1., 2., -4., 1.5], [2., .5, 1., -3.]])
    # density 0.5 keeps the two largest |tau| per expert: [3,0,2,0], [0,2,-4,0], [2,0,0,-3]; sum signs [+,+,-,-]
    expected = torch.tensor([[1., 0., 0., 0.], [0., 1., 1., 0.], [1., 0., 0., 1.]])
    assert torch.equal(ties_mask(tau, density=0.5), expected)


def test_dare_keep_is_unbiased_rescaled_bernoulli():
    torch.manual_seed(0)
    keep = dare_keep((200_000,), 0.25, torch.zeros((), dtype=torch.float64))
    assert set(keep.unique().tolist()) == {0., 4. / 3.}
    assert abs(keep.mean().item() - 1.) < 0.01


def _hand_layer(merge):
    layer = MergedLinear(2, 1, num_experts=3, bias=True, merge=merge, mask=None, alpha=0.5)
    with torch.no_grad():
        layer.weight_base.copy_(torch.tensor([[1., 1.]]))
        layer.weight_experts.copy_(torch.tensor([[[3., 1.]], [[1., 5.]]]))  # tau_0 = [2, 0], tau_1 = [0, 4]
        layer.bias_base.fill_(1.)
        layer.bias_experts.copy_(torch.tensor([[3.], [-1.]]))  # bias deltas 2, -2
    return layer


def test_euclidean_merge_hand_value():
    layer = _hand_layer('euclidean')
    gates = torch.tensor([[0.25, 0.75]])
    # W = [1, 1] + 0.5 * (0.25 [2, 0] + 0.75 [0, 4]) = [1.25, 2.5]; b = 1 + 0.5 * (0.5 - 1.5) = 0.5
    weight, bias = layer.merged_weights(gates)
    torch.testing.assert_close(weight, torch.tensor([[[1.25, 2.5]]]))
    torch.testing.assert_close(bias, torch.tensor([[0.5]]))
    y = layer(torch.tensor([[[1., 2.]]]), gates)
    torch.testing.assert_close(y, torch.tensor([[[1.25 + 5. + 0.5]]]))


def test_camex_merge_hand_value():
    layer = _hand_layer('camex')
    with torch.no_grad():  # in = 2 = 1 x 2: M_0 swaps the two input columns, M_1 stays identity
        layer.curvature.d[0, 0] = torch.tensor([[0., 1.], [1., 0.]])
    gates = torch.tensor([[0.25, 0.75]])
    # M_0(tau_0) = [0, 2]: W = [1, 1] + 0.5 * (0.25 [0, 2] + 0.75 [0, 4]) = [1, 2.75]
    weight, _ = layer.merged_weights(gates)
    torch.testing.assert_close(weight, torch.tensor([[[1., 2.75]]]))


def test_ties_mask_applies_to_curvature_output():
    layer = _hand_layer('camex')
    layer.mask = 'ties'
    with torch.no_grad():
        layer.weight_experts[1, 0, 0] = -1.  # tau_1 = [-2, 4]; sum [0, 4]: entry 0 of both experts is masked out
    weight, _ = layer.merged_weights(torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(weight, torch.tensor([[[1., 1. + 0.5 * 0.5 * 4.]]]))


def test_dare_expert_mode_drops_whole_experts_per_unit_in_training_only():
    torch.manual_seed(0)
    layer = MergedLinear(4, 3, num_experts=5, mask='dare', dare_p=0.5)
    gates = torch.full((64, 4), 0.25)
    layer.train()
    dropped = layer.merge_gates(gates)
    assert set(dropped.unique().tolist()) <= {0., 0.5}
    assert (dropped == 0).any() and (dropped == 0.5).any()
    layer.eval()
    assert torch.equal(layer.merge_gates(gates), gates)


def test_gradcheck_merge_float64():
    torch.manual_seed(1)
    layer = MergedLinear(4, 6, num_experts=3, merge='camex', mask=None, kron_rank=2, alpha=0.7).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    gates = torch.softmax(torch.randn(2, 2, dtype=torch.float64), -1).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, gates, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x, gates))

    assert torch.autograd.gradcheck(fn, (x, gates, *layer.parameters()))


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


@pytest.mark.parametrize('merge', ['euclidean', 'camex'])
def test_never_materialises_units_times_experts_weights(merge):
    units, n, d_in, d_out = 16, 8, 24, 40
    layer = MergedLinear(d_in, d_out, num_experts=n, merge=merge, mask='ties')
    x = torch.randn(units, 5, d_in, requires_grad=True)
    gates = torch.softmax(torch.randn(units, n - 1), -1).requires_grad_()
    with _ShapeRecorder() as rec:
        layer(x, gates).sum().backward()
    assert max(rec.numels) < units * (n - 1) * d_out * d_in
    assert max(rec.numels) >= units * d_out * d_in  # the per-unit merged weights themselves


def test_curvature_runs_once_per_forward_whatever_the_batch():
    layer = MergedLinear(6, 8, num_experts=4, merge='camex')
    calls = []
    layer.curvature.register_forward_hook(lambda *_: calls.append(1))
    for units in (1, 7, 32):
        layer(torch.randn(units, 3, 6), torch.full((units, 3), 1. / 3.))
    assert len(calls) == 3


def _lift(y):
    """2 -> 3 features, to feed one chain layer's output to the next."""
    return torch.cat([y, y[..., :1]], -1)


def _chain(n_layers=3, num_experts=3, alpha=0.5, merge='euclidean'):
    torch.manual_seed(2)
    layers = [MergedLinear(3, 2, num_experts=num_experts, merge=merge, mask=None, alpha=alpha)
              for _ in range(n_layers)]
    link_dynamic_chain(layers)
    return layers


def test_dynamic_base_propagation_hand_formula():
    l0, l1, l2 = _chain()
    # E_m^1 = E_m^0 + alpha / (N-1) * sum_i tau_i^0 with alpha = 0.5, N - 1 = 2
    tau0 = l0.weight_experts - l0.weight_base
    expected_w1 = l0.weight_base + 0.25 * tau0.sum(0)
    w1, b1 = l1.base()
    torch.testing.assert_close(w1, expected_w1)
    torch.testing.assert_close(b1, l0.bias_base + 0.25 * (l0.bias_experts - l0.bias_base).sum(0))
    w2, _ = l2.base()
    torch.testing.assert_close(w2, expected_w1 + 0.25 * (l1.weight_experts - expected_w1).sum(0))


def test_dynamic_followers_own_no_base_and_gradients_flow_through_the_chain():
    l0, l1, l2 = _chain(merge='camex')
    assert l0.owns_base and not l1.owns_base and not l2.owns_base
    keys = set(torch.nn.ModuleList([l0, l1, l2]).state_dict())
    assert '0.weight_base' in keys and '1.weight_base' not in keys and '2.bias_base' not in keys
    x, gates = torch.randn(2, 4, 3), torch.full((2, 2), 0.5)
    l2(_lift(l1(_lift(l0(x, gates)), gates)), gates).sum().backward()
    for layer in (l0, l1, l2):
        for name, p in layer.named_parameters():
            assert p.grad is not None, name
    assert l0.weight_base.grad.abs().sum() > 0


def test_dynamic_layers_reuse_the_propagated_base_within_a_pass():
    l0, l1, _ = _chain(merge='camex')
    calls = []
    l0.curvature.register_forward_hook(lambda *_: calls.append(1))
    x, gates = torch.randn(2, 4, 3), torch.full((2, 2), 0.5)
    l1(_lift(l0(x, gates)), gates)
    assert len(calls) == 1  # l1 took l0's outgoing base instead of recomputing l0's curvature


def test_chain_restarts_on_shape_change():
    layers = [MergedLinear(3, 2), MergedLinear(3, 2), MergedLinear(4, 2), MergedLinear(4, 2)]
    chains = link_dynamic_chain(layers)
    assert [len(c) for c in chains] == [2, 2]
    assert [layer.owns_base for layer in layers] == [True, False, True, False]


def test_layers_without_a_follower_do_not_propagate_a_base():
    layer = MergedLinear(3, 2, num_experts=3, mask=None)
    layer(torch.randn(2, 4, 3), torch.full((2, 2), 0.5))
    assert layer._outgoing is None


@pytest.mark.parametrize('no_grad', [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize('merge,mask', [('euclidean', None), ('camex', 'ties')])
def test_inference_passes_reuse_scratch_buffers_and_match_the_autograd_path(no_grad, merge, mask):
    from camex_vision.core import merge as merge_module
    merge_module.release_merge_scratch()
    torch.manual_seed(0)
    big, small = MergedLinear(6, 8, num_experts=4, merge=merge, mask=mask), MergedLinear(8, 6, num_experts=4)
    gates = torch.softmax(torch.randn(5, 3), -1)
    x = torch.randn(5, 7, 6)
    expected = big(x, gates)  # autograd on: fresh tensors
    with no_grad():
        y1 = big(x, gates)
        buffers = dict(merge_module._SCRATCH.buffers)
        assert buffers['weights'].numel() == 5 * 8 * 6 and buffers['deltas'].numel() == 3 * 8 * 6
        y2 = small(y1, gates)  # same size requests: the same buffers; y1 must not alias them
        y3 = big(x[:2], gates[:2])  # smaller requests are served from the same buffers
        assert all(merge_module._SCRATCH.buffers[k] is v for k, v in buffers.items())
    torch.testing.assert_close(y1, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y3, expected[:2].detach())  # another batch size may round differently
    torch.testing.assert_close(y2, small(expected, gates).detach())
    merge_module.release_merge_scratch()
    assert not merge_module._SCRATCH.buffers


def test_public_merge_helpers_never_return_scratch_memory():
    from camex_vision.core import merge as merge_module
    layer = MergedLinear(6, 8, num_experts=4, mask=None)
    gates = torch.full((2, 3), 1 / 3)
    with torch.no_grad():
        weight, _ = layer.merged_weights(gates)
        deltas = layer.expert_deltas()[2]
        layer(torch.randn(2, 3, 6), gates)  # fills the scratch buffers
    for buf in merge_module._SCRATCH.buffers.values():
        for t in (weight, deltas):
            assert t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()


def test_training_passes_never_use_the_scratch_buffers():
    from camex_vision.core import merge as merge_module
    merge_module.release_merge_scratch()
    layer = MergedLinear(6, 8, num_experts=4)
    y = layer(torch.randn(2, 3, 6), torch.full((2, 3), 1 / 3))
    y.sum().backward()
    assert not merge_module._SCRATCH.buffers and layer.weight_experts.grad is not None


def test_vmap_over_units_matches_a_loop_in_inference_mode():
    layer = MergedLinear(6, 8, num_experts=4)
    x, gates = torch.randn(5, 2, 3, 6), torch.softmax(torch.randn(5, 2, 3), -1)
    with torch.no_grad():
        y = torch.func.vmap(layer)(x, gates)
        expected = torch.stack([layer(x[i], gates[i]) for i in range(5)])
    torch.testing.assert_close(y, expected)
