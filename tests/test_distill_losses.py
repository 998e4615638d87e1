"""KD and embedding losses against hand-written formulas."""
import pytest
import torch

from rmtkd.distill import embedding_loss, kd_loss


def manual_kd(s, t, y, alpha, temp):
    ps = torch.softmax(s.double() / temp, -1)
    pt = torch.softmax(t.double() / temp, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -torch.log_softmax(s.double(), -1).gather(1, y[:, None]).mean()
    return alpha * ce + (1 - alpha) * temp ** 2 * kl


@pytest.mark.parametrize("alpha,temp", [(0.7, 1.0), (0.3, 1.5), (1.0, 0.5), (0.0, 2.0)])
def test_kd_loss_matches_the_formula(alpha, temp):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    got = kd_loss(s, t, y, alpha=alpha, temperature=temp)
    assert float(got) == pytest.approx(float(manual_kd(s, t, y, alpha, temp)), rel=1e-5)


def test_kd_loss_gradients_reach_only_the_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, torch.tensor([0, 1, 2, 0])).backward()
    assert s.grad is not None and t.grad is None
    # Identical logits and alpha = 0: zero loss.
    assert float(kd_loss(t.detach(), t.detach(), None, alpha=0.0)) == pytest.approx(0, abs=1e-7)


def test_kd_loss_bad_inputs():
    s = torch.randn(4, 3)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s, None, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, None, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, torch.randn(4, 5), None, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, s, None)


def test_embedding_loss():
    t = torch.randn(8, 5)
    assert float(embedding_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s = 2 * t                                    # same direction: only the MSE term
    assert float(embedding_loss(s, t)) == pytest.approx(float((t ** 2).mean()), rel=1e-5)
    assert float(embedding_loss(-t, t, cosine_weight=0.5)) == pytest.approx(
        float((4 * t ** 2).mean()) + 1.0, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        embedding_loss(t, torch.randn(8, 4))
