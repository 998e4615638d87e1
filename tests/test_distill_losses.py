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


def test_teacher_cache_gives_the_same_training_and_skips_teacher_forwards():
    """Distillation with the teacher's outputs and features cached is bitwise the same as
    recomputing them, and the teacher runs once per batch instead of once per epoch."""
    import copy

    from torch import nn

    from rmtkd.distill import TeacherCache, distill

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student0 = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(5)]
    calls = {"n": 0}
    teacher.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    runs = {}
    for name, cache in (("plain", None), ("cached", TeacherCache(2**20))):
        torch.manual_seed(1)
        student = copy.deepcopy(student0)
        calls["n"] = 0
        distill(student, teacher, batches, epochs=3, lr=1e-2, warmup_steps=2,
                progress=False, features=["1"], teacher_cache=cache)
        runs[name] = (student, calls["n"], cache)
    for a, b in zip(runs["plain"][0].parameters(), runs["cached"][0].parameters()):
        assert torch.equal(a, b)
    assert runs["plain"][1] == 15 and runs["cached"][1] == 5
    cache = runs["cached"][2]
    assert (cache.hits, cache.misses) == (10, 5)
    # a full cache stores nothing more (the teacher runs again) but stays exact
    small = TeacherCache(1)
    student = copy.deepcopy(student0)
    calls["n"] = 0
    torch.manual_seed(1)
    distill(student, teacher, batches, epochs=3, lr=1e-2, warmup_steps=2, progress=False,
            features=["1"], teacher_cache=small)
    assert calls["n"] == 15 and small.entries == {}
    for a, b in zip(runs["plain"][0].parameters(), student.parameters()):
        assert torch.equal(a, b)
    # another teacher empties it
    cache.bind(copy.deepcopy(teacher))
    assert cache.entries == {} and cache.bytes == 0


def test_max_steps_stops_training_and_ends_the_schedule_there():
    from torch import nn

    from rmtkd.distill import distill

    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).eval()
    student = nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(10)]
    seen = []
    student.register_forward_pre_hook(lambda m, a: seen.append(a[0].data_ptr()))
    info = distill(student, teacher, batches, epochs=3, lr=1e-2, warmup_steps=0,
                   progress=False, max_steps=13)
    assert info["steps"] == 13 and info["epochs"] == 2 and len(seen) == 13
    assert seen[:10] == [b[0].data_ptr() for b in batches] and \
        seen[10:] == [b[0].data_ptr() for b in batches[:3]]
    with pytest.raises(ValueError, match="max_steps"):
        distill(student, teacher, batches, epochs=1, progress=False, max_steps=0)
