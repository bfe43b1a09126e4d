"""Kronecker-factored curvature: split rule, exact identity init, hand values, torch.kron cross-check, gradcheck."""
import pytest
import torch

from camex_vision.core import CurvatureKron, kron_split


@pytest.mark.parametrize('dim,split', [
    (768, (24, 32)), (3072, (48, 64)), (384, (16, 24)), (1536, (32, 48)), (192, (12, 16)),
    (10, (2, 5)), (7, (1, 7)), (1, (1, 1)), (36, (6, 6)),
])
def test_kron_split_rule(dim, split):
    assert kron_split(dim) == split


@pytest.mark.parametrize('bad', [0, -4, 2.0, True])
def test_kron_split_rejects_bad_dims(bad):
    with pytest.raises(ValueError, match='dim'):
        kron_split(bad)


@pytest.mark.parametrize('rank', [1, 2, 3])
def test_identity_at_init_for_every_rank(rank):
    torch.manual_seed(0)
    curv = CurvatureKron(3, 12, 20, rank=rank)
    tau = torch.randn(3, 12, 20)
    torch.testing.assert_close(curv(tau), tau, rtol=0, atol=1e-6)
    left, right = curv.dense_matrices()
    total = sum(torch.einsum('pi,qj->piqj', left[0, r], right[0, r]) for r in range(rank))
    # the summed Kronecker operator is the identity on [12*20] entries, not rank * identity
    torch.testing.assert_close(total.reshape(12, 12, 20, 20).diagonal(0, 0, 1).diagonal(0, 0, 1).sum(),
                               torch.tensor(12. * 20.), rtol=0, atol=1e-4)


def test_hand_computed_value():
    # out = 4 = 2 x 2, in = 4 = 2 x 2; A = [[1, 2], [0, 1]], D = swap, B = C = I.
    curv = CurvatureKron(1, 4, 4, rank=1)
    with torch.no_grad():
        curv.a[0, 0] = torch.tensor([[1., 2.], [0., 1.]])
        curv.d[0, 0] = torch.tensor([[0., 1.], [1., 0.]])
    tau = torch.arange(16.).reshape(1, 4, 4)
    # (A kron I) adds 2 * row (i + 2) to row i for i < 2; (I kron D)^T swaps columns 0<->1 and 2<->3.
    expected = torch.tensor([[19., 16., 25., 22.],
                             [31., 28., 37., 34.],
                             [9., 8., 11., 10.],
                             [13., 12., 15., 14.]])
    torch.testing.assert_close(curv(tau)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize('out_f,in_f,rank', [(6, 8, 1), (12, 10, 2), (9, 7, 3)])
def test_matches_explicit_kron(out_f, in_f, rank):
    torch.manual_seed(1)
    curv = CurvatureKron(2, out_f, in_f, rank=rank).double()
    with torch.no_grad():
        for p in curv.parameters():
            p.copy_(torch.randn_like(p))
    tau = torch.randn(2, out_f, in_f, dtype=torch.float64)
    expected = torch.stack([
        sum(torch.kron(curv.a[i, r], curv.b[i, r]) @ tau[i] @ torch.kron(curv.c[i, r], curv.d[i, r]).T
            for r in range(rank))
        for i in range(2)])
    torch.testing.assert_close(curv(tau), expected)


def test_gradcheck_float64():
    torch.manual_seed(2)
    curv = CurvatureKron(2, 6, 4, rank=2).double()
    with torch.no_grad():
        for p in curv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tau = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(curv.parameters())

    def fn(t, a, b, c, d):
        return torch.func.functional_call(curv, {'a': a, 'b': b, 'c': c, 'd': d}, (t,))

    assert torch.autograd.gradcheck(fn, (tau, *params))


def test_parameter_count_formula():
    n, r = 8, 2
    curv = CurvatureKron(n - 1, 1536, 384, rank=r)
    (a1, a2), (b1, b2) = kron_split(384), kron_split(1536)
    assert sum(p.numel() for p in curv.parameters()) == (n - 1) * r * (a1 ** 2 + a2 ** 2 + b1 ** 2 + b2 ** 2)


def test_rejects_wrong_tau_shape():
    curv = CurvatureKron(2, 6, 4)
    with pytest.raises(ValueError, match=r'\(2, 6, 4\)'):
        curv(torch.zeros(2, 4, 6))
