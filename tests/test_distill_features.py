"""Intermediate-feature distillation: feature_loss against its formula, and distill(features=...)."""
import pytest
import torch
from torch import nn

from rmtkd.distill import distill, embedding_loss, feature_loss
from rmtkd.distill.trainer import feature_modules


def test_feature_loss_is_the_mean_relative_squared_error():
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(4, 6, generator=g), torch.randn(3, 5, 2, generator=g)
    s1, s2 = t1 + 0.1 * torch.randn(4, 6, generator=g), 2 * t2
    want = ((s1 - t1) ** 2).sum() / (t1 ** 2).sum() / 2 + 1 / 2   # (2t - t)^2 / t^2 = 1
    torch.testing.assert_close(feature_loss([s1, s2], [t1, t2]), want)
    assert float(feature_loss([t1], [t1])) == 0.0
    # relative: scaling student and teacher together changes nothing
    torch.testing.assert_close(feature_loss([10 * s1], [10 * t1]), feature_loss([s1], [t1]))


def test_feature_loss_mask_ignores_padding_and_gradients_reach_only_the_student():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s = t.clone()
    s[0, 3:] += 100.0                       # garbage only at padded positions
    assert float(feature_loss([s], [t], mask)) == 0.0
    assert float(feature_loss([s], [t])) > 1.0   # unmasked, the garbage counts
    other = torch.randn(2, 7, generator=g)       # leading dims differ from the mask's
    torch.testing.assert_close(feature_loss([2 * other], [other], mask), torch.tensor(1.0))
    s = s.requires_grad_()
    tt = t.clone().requires_grad_()
    feature_loss([s], [tt], mask).backward()
    assert s.grad is not None and tt.grad is None


def test_feature_loss_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        feature_loss([torch.zeros(2, 3)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="same positive number"):
        feature_loss([], [])


class Net(nn.Module):
    """Linear -> block (a tuple-returning module, like a transformer layer) -> head."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return (torch.tanh(self.lin(x)), "extra")

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = Net.Block()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.inp(x))[0])


def test_feature_modules_resolves_globs_and_checks_the_teacher():
    torch.manual_seed(0)
    a, b = Net(), Net()
    assert feature_modules(a, b, ["block", "in*"]) == ["inp", "block"]   # module order
    wrapped = nn.Module()
    wrapped.module = a                     # a DDP-style wrapper is looked through
    assert feature_modules(wrapped, b, ["block"]) == ["block"]
    with pytest.raises(ValueError, match="no module"):
        feature_modules(a, b, ["nothing.*"])
    b.block = nn.Identity()
    with pytest.raises(ValueError, match="not in the teacher"):
        feature_modules(a, b, ["block.lin"])


def test_distill_adds_the_feature_term_and_removes_its_hooks():
    torch.manual_seed(0)
    teacher, student = Net().eval(), Net()
    x = torch.randn(16, 6)
    # lr 0: the returned loss is the first (only) batch's loss, untrained
    info = distill(student, teacher, [x], task="embedding", lr=0.0, warmup_steps=0,
                   epochs=1, progress=False, features=["block", "inp"], feature_weight=2.0)
    with torch.no_grad():
        want = embedding_loss(student(x), teacher(x)) + 2.0 * feature_loss(
            [student.inp(x), student.block(student.inp(x))[0]],
            [teacher.inp(x), teacher.block(teacher.inp(x))[0]])
    assert info["loss"] == pytest.approx(float(want), rel=1e-5)
    for m in list(student.modules()) + list(teacher.modules()):
        assert not m._forward_hooks
    with pytest.raises(ValueError, match="feature_weight"):
        distill(student, teacher, [x], task="embedding", features=["block"],
                feature_weight=-1.0, progress=False)


def test_feature_matching_pulls_the_hidden_states_together():
    """Only the head differs in what the two losses see: with the feature term the
    student's hidden states move towards the teacher's much further."""
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(32, 6, generator=g) for _ in range(8)]
    torch.manual_seed(3)
    teacher = Net().eval()
    errs = {}
    for feats in (None, ["block"]):
        torch.manual_seed(4)
        student = Net()
        distill(student, teacher, data, task="embedding", lr=1e-2, warmup_steps=0, epochs=20,
                progress=False, features=feats, feature_weight=1.0)
        with torch.no_grad():
            errs[feats is None] = float(feature_loss(
                [student.block(student.inp(torch.cat(data)))[0]],
                [teacher.block(teacher.inp(torch.cat(data)))[0]]))
    assert errs[False] < 0.5 * errs[True], errs
