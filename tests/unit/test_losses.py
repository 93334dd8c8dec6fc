"""KD losses against slow, obvious implementations and their known properties."""

import math

import pytest
import torch

from edgekit.distill import losses as L


def slow_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def softmax(xs, T=1.0):
    m = max(x / T for x in xs)
    e = [math.exp(x / T - m) for x in xs]
    return [v / sum(e) for v in e]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_forward_and_reverse_kl_match_slow_reference(logits, T):
    s, t = logits
    for i in range(s.shape[0]):
        ps, pt = softmax(s[i].tolist(), T), softmax(t[i].tolist(), T)
        assert L.forward_kl(s, t, T)[i].item() == pytest.approx(slow_kl(pt, ps) * T * T, rel=1e-4)
        assert L.reverse_kl(s, t, T)[i].item() == pytest.approx(slow_kl(ps, pt) * T * T, rel=1e-4)


def test_skew_and_jsd_match_slow_reference(logits):
    s, t = logits
    a, b = 0.3, 0.4
    for i in range(s.shape[0]):
        ps, pt = softmax(s[i].tolist()), softmax(t[i].tolist())
        mix_t = [a * x + (1 - a) * y for x, y in zip(pt, ps)]
        mix_s = [a * y + (1 - a) * x for x, y in zip(pt, ps)]
        m = [b * x + (1 - b) * y for x, y in zip(pt, ps)]
        assert L.skew_forward_kl(s, t, alpha=a)[i].item() == pytest.approx(slow_kl(pt, mix_t), rel=1e-4)
        assert L.skew_reverse_kl(s, t, alpha=a)[i].item() == pytest.approx(slow_kl(ps, mix_s), rel=1e-4)
        jsd = b * slow_kl(pt, m) + (1 - b) * slow_kl(ps, m)
        assert L.generalized_jsd(s, t, beta=b)[i].item() == pytest.approx(jsd, rel=1e-4)
        tvd = 0.5 * sum(abs(x - y) for x, y in zip(pt, ps))
        assert L.total_variation(s, t)[i].item() == pytest.approx(tvd, rel=1e-4)


@pytest.mark.parametrize("name", list(L.KD_LOSSES))
def test_zero_for_identical_distributions(logits, name):
    s, _ = logits
    assert L.kd_loss(name, s, s.clone(), 2.0).abs().max().item() < 1e-5


def test_jsd_limits_in_beta(logits):
    s, t = (x.double() / 3 for x in logits)  # softer distributions: the limit is reached sooner
    fkl, rkl = L.forward_kl(s, t), L.reverse_kl(s, t)
    eps = 1e-5
    assert torch.allclose(L.generalized_jsd(s, t, beta=eps) / eps, fkl, rtol=2e-2)
    assert torch.allclose(L.generalized_jsd(s, t, beta=1 - eps) / eps, rkl, rtol=2e-2)
    assert torch.allclose(L.generalized_jsd(s, t, beta=0.0), fkl)
    assert torch.allclose(L.generalized_jsd(s, t, beta=1.0), rkl)


def test_symmetries(logits):
    s, t = logits
    assert torch.allclose(L.generalized_jsd(s, t, beta=0.5), L.generalized_jsd(t, s, beta=0.5), atol=1e-6)
    assert torch.allclose(L.total_variation(s, t), L.total_variation(t, s), atol=1e-6)
    assert not torch.allclose(L.forward_kl(s, t), L.reverse_kl(s, t))  # KL is not symmetric
    assert torch.allclose(L.skew_forward_kl(s, t, alpha=0.0), L.forward_kl(s, t))


def test_temperature_squared_keeps_gradient_scale():
    """Hinton et al.: with the T^2 factor the gradient tends to (s - t, centered)/V as T grows,
    so it keeps its scale instead of shrinking like 1/T^2."""
    torch.manual_seed(0)
    t = torch.randn(3, 7)
    grads = []
    for T in (10.0, 20.0):
        s = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).requires_grad_()
        L.forward_kl(s, t, T).sum().backward()
        grads.append(s.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=1e-3)
    assert grads[0].abs().max() > 0.01  # and it did not vanish


def test_sparse_topk_equals_full_kl_when_k_is_vocab(logits):
    s, t = logits
    lt = torch.log_softmax(t, -1)
    vals, idx = lt.topk(t.shape[-1], -1)
    assert torch.allclose(L.forward_kl_topk(s, vals, idx), L.forward_kl(s, t), atol=1e-4)


def test_sparse_topk_is_a_kl_over_k_plus_one_events(logits):
    s, t = logits
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    vals, idx = lt.topk(3, -1)
    got = L.forward_kl_topk(s, vals, idx)
    for i in range(s.shape[0]):
        pt = vals[i].exp().tolist() + [1 - vals[i].exp().sum().item()]
        ps_k = ls[i, idx[i]].exp().tolist()
        ps = ps_k + [1 - sum(ps_k)]
        assert got[i].item() == pytest.approx(slow_kl(pt, ps), rel=1e-3)
    assert (got >= -1e-6).all()


def test_cross_entropy_ignores_masked_labels(logits):
    s, _ = logits
    labels = torch.tensor([1, -100, 3, -100, 0])
    ce = L.cross_entropy(s, labels)
    assert ce[1] == 0 and ce[3] == 0 and ce[0] > 0
