"""DP-safety analysis: what mixes samples is refused with node, op and source line; what does not, works."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfx
from bkfx.testing import assert_matches_reference

THIS_FILE = __file__


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _refusal(model, *inputs, cls=bkfx.SampleMixingError):
    with pytest.raises(cls) as info:
        bkfx.compile(model)(*inputs)
    message = str(info.value)
    for part in ("node:", "operation:", "source:", "what to do:"):
        assert part in message
    return message


def test_batch_norm_in_training_is_refused_with_the_groupnorm_advice():
    message = _refusal(WithBatchNorm(), torch.randn(2, 3, 5, 5))
    assert "batch_norm" in message and "GroupNorm" in message and "replace_batchnorm" in message


def test_replace_batchnorm_keeps_the_module_tree_and_then_matches_the_reference():
    torch.manual_seed(0)
    model = WithBatchNorm()
    names = [n for n, _ in model.named_modules()]
    bkfx.replace_batchnorm(model, num_groups=2)
    assert [n for n, _ in model.named_modules()] == names
    assert isinstance(model.bn, nn.GroupNorm) and model.bn.num_groups == 2
    model = model.double()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    assert_matches_reference(model, F.cross_entropy, x, torch.randint(0, 3, (3,)), max_grad_norm=0.5)


def test_batch_norm_in_eval_mode_works():
    torch.manual_seed(0)
    model = WithBatchNorm().double()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    assert_matches_reference(model, F.cross_entropy, x, torch.randint(0, 3, (3,)), max_grad_norm=0.5)


class Along(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if self.op == "sort":
            return torch.sort(h, dim=0).values  # line checked below
        if self.op == "layer_norm_over_batch":
            return F.layer_norm(h.T.contiguous().T, (4,))
        if self.op == "group_norm_batch_second":
            return F.group_norm(h.unsqueeze(2).transpose(0, 1), 1).transpose(0, 1).squeeze(2)
        if self.op == "gather":
            return torch.gather(h, 0, torch.zeros_like(h, dtype=torch.long))
        if self.op == "index_select":
            return h.index_select(0, torch.tensor([0, 0]))
        raise ValueError(self.op)


@pytest.mark.parametrize("op", ["sort", "group_norm_batch_second", "gather", "index_select"])
def test_operations_along_the_sample_dimension_are_refused(op):
    message = _refusal(Along(op), torch.randn(3, 4))
    assert THIS_FILE in message


def test_layer_norm_over_features_is_fine_even_after_transposes():
    torch.manual_seed(0)
    model = Along("layer_norm_over_batch").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_matches_reference(model, lambda o, y: (o * y).sum(), x, torch.randn(3, 4, dtype=torch.float64),
                             loss_reduction="sum", max_grad_norm=0.5)


class Buffered(nn.Module):
    """A fixed buffer (not updated across samples) and dropout."""

    def __init__(self, p=0.0):
        super().__init__()
        self.register_buffer("basis", torch.randn(4, 4))
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.fc(x @ self.basis))))


def test_buffers_and_eval_mode_dropout_match_the_reference():
    torch.manual_seed(0)
    model = Buffered(p=0.5).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_matches_reference(model, F.cross_entropy, x, torch.randint(0, 3, (5,)), max_grad_norm=0.5)


def test_dropout_in_training_gives_the_ordinary_gradient_without_clipping():
    """Dropout masks are random, so there is no per-sample reference; with the same masks and no
    clipping, the clipped sum must equal the ordinary summed gradient of the same forward pass."""
    torch.manual_seed(0)
    model = Buffered(p=0.5).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    dp = bkfx.compile(model, max_grad_norm=1e12, loss_reduction="sum")
    dp(x)  # capture first: the capture itself draws no masks at run time
    torch.manual_seed(1)
    F.cross_entropy(dp(x), y, reduction="sum").backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-10, atol=1e-12)


def test_in_place_activations_after_sites_work():
    """ReLU(inplace=True) right after a first-layer conv and after a linear (common in CNNs)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)
    ).double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    assert_matches_reference(model, F.cross_entropy, x, torch.randint(0, 3, (3,)), max_grad_norm=0.5)


class ModifiesSavedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pre = nn.Linear(4, 4)

    def forward(self, x):
        h = self.pre(x)
        y = self.fc(h)
        h.mul_(2)  # changes the activation the fc site saved for its per-sample gradient
        return y + h


def test_in_place_change_of_a_saved_activation_is_an_error_not_a_wrong_gradient():
    model = ModifiesSavedInput()
    out = bkfx.compile(model)(torch.randn(3, 4))
    with pytest.raises(bkfx.InPlaceModificationError) as info:
        out.sum().backward()
    message = str(info.value)
    assert "linear_1" in message and THIS_FILE in message and "what to do:" in message
