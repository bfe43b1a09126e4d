"""Routers, pooling, balance loss and causal segment routing, checked against hand-computed numbers."""
import math

import pytest
import torch

from camex_vision.core import CAMExMlp, Router, SegmentCache, SegmentRouting, balance_loss, cv_squared, pool_units


def _sigmoid(v):
    return 1. / (1. + math.exp(-v))


def test_cv_squared_hand_value():
    # mean 2, unbiased variance 1 -> 1 / 4
    torch.testing.assert_close(cv_squared(torch.tensor([1., 2., 3.])), torch.tensor(0.25))
    assert cv_squared(torch.tensor([5.])).item() == 0.


def test_balance_loss_hand_value():
    gates = torch.tensor([[0.5, 0.5, 0.], [1., 0., 0.]])
    load = torch.tensor([2., 1., 0.])
    # importance [1.5, 0.5, 0]: mean 2/3, var 7/12 -> cv2 21/16; load: mean 1, var 1 -> 1
    torch.testing.assert_close(balance_loss(gates, load), torch.tensor(21. / 16. + 1.))


def test_pool_units_respects_mask():
    x = torch.tensor([[[1.], [3.], [100.]], [[2.], [4.], [6.]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool_units(x, mask), torch.tensor([[2.], [4.]]))
    torch.testing.assert_close(pool_units(x), torch.tensor([[104. / 3.], [4.]]))
    with pytest.raises(ValueError, match='mask shape'):
        pool_units(x, mask[:, :2])


def _fixed_router(top_k, noisy=False):
    router = Router(2, 3, top_k=top_k, noisy=noisy)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1., 0.], [0., 1.], [0., 0.]]))
    return router


def test_router_softmax_and_top_k_hand_values():
    x = torch.tensor([[math.log(4.), math.log(2.)]])  # logits [ln 4, ln 2, 0]
    gates, _ = _fixed_router(top_k=None).eval()(x)
    torch.testing.assert_close(gates, torch.tensor([[4. / 7., 2. / 7., 1. / 7.]]))
    gates, loss = _fixed_router(top_k=2).eval()(x)
    torch.testing.assert_close(gates, torch.tensor([[2. / 3., 1. / 3., 0.]]))
    assert gates[0, 2].item() == 0.  # exact zero, static shape
    # one unit: importance [2/3, 1/3, 0] (mean 1/3, var 1/9 -> cv2 1); load [1, 1, 0] (mean 2/3, var 1/3 -> 3/4)
    torch.testing.assert_close(loss, torch.tensor(1.75))


def test_router_noise_only_in_training_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    router = _fixed_router(top_k=2, noisy=True)
    x = torch.randn(16, 2)
    router.eval()
    g1, _ = router(x)
    g2, _ = router(x)
    assert torch.equal(g1, g2)
    router.train()
    g3, loss = router(x)
    assert not torch.allclose(g1, g3)
    (g3.pow(2).sum() + loss).backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert router.noise.weight.grad.abs().sum() > 0  # the smooth load estimate reaches the noise weights


def test_router_rejects_bad_top_k():
    with pytest.raises(ValueError, match='top_k=4'):
        Router(2, 3, top_k=4)


def _segment_router(first_segment):
    router = Router(1, 2, noisy=False)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.], [0.]]))  # gate_0 = sigmoid(mean)
    return SegmentRouting(router, segment_length=2, first_segment=first_segment).eval()


@pytest.mark.parametrize('first_segment', ['prior', 'uniform', 'own'])
def test_segment_routing_hand_values(first_segment):
    x = torch.tensor([1., 3., 5., 9., 0., 0.]).reshape(1, 6, 1)  # segment means 2, 7, 0
    gates, _, state = _segment_router(first_segment)(x)
    first = {'prior': 0.5, 'uniform': 0.5, 'own': _sigmoid(2.)}[first_segment]
    torch.testing.assert_close(gates[0, :, 0], torch.tensor([first, _sigmoid(2.), _sigmoid(7.)]))
    assert state.segment == 2 and state.sum.item() == 0. and state.prev_sum.item() == 14.


def test_segment_routing_ignores_padding():
    x = torch.tensor([1., 3., 5., 9., 100.]).reshape(1, 5, 1)
    mask = torch.tensor([[1, 0, 1, 1, 1]])
    gates, _, _ = _segment_router('prior')(x, mask)
    torch.testing.assert_close(gates[0, 1, 0], torch.tensor(_sigmoid(1.)))  # segment 0 mean over valid tokens


def test_segment_routing_needs_state_for_offsets():
    routing = _segment_router('prior')
    with pytest.raises(ValueError, match='offset=3'):
        routing(torch.zeros(1, 2, 1), offset=3)
    _, _, state = routing(torch.zeros(1, 3, 1))
    with pytest.raises(ValueError, match='segment'):
        routing(torch.zeros(1, 1, 1), offset=9, state=state)
    with pytest.raises(ValueError, match='segment_length'):
        SegmentRouting(Router(1, 2), segment_length=0)
    with pytest.raises(ValueError, match='first_segment'):
        SegmentRouting(Router(1, 2), segment_length=2, first_segment='last')


def _randomised_mlp(**options):
    torch.manual_seed(3)
    mlp = CAMExMlp(8, 16, num_experts=4, segment_length=3, **options)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mlp.eval()


@pytest.mark.parametrize('first_segment', ['prior', 'uniform'])
@pytest.mark.parametrize('router_per', ['ffn', 'linear'])
def test_strictly_causal_routing_never_looks_ahead(first_segment, router_per):
    mlp = _randomised_mlp(first_segment=first_segment, router_per=router_per)
    x = torch.randn(2, 11, 8)
    y = mlp(x)
    for t in range(11):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        torch.testing.assert_close(mlp(x2)[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)


def test_own_first_segment_leaks_inside_the_first_segment():
    mlp = _randomised_mlp(first_segment='own')
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[:, 2] += 1.  # a later token of segment 0 changes token 0's merged weights: the documented leak
    assert not torch.allclose(mlp(x)[:, 0], mlp(x2)[:, 0])


@pytest.mark.parametrize('chunks', [[1] * 10, [4, 5, 1], [3, 3, 3, 1], [10]])
def test_incremental_decoding_matches_full_forward(chunks):
    mlp = _randomised_mlp(router_per='linear')
    x = torch.randn(2, 10, 8)
    full = mlp(x)
    cache, outs, start = SegmentCache(), [], 0
    for n in chunks:
        outs.append(mlp(x[:, start:start + n], cache=cache))
        start += n
    assert cache.offset == 10
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
