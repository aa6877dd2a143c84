"""Buffers never carry un-noised statistics of the samples out of a step: a write into a buffer
(or parameter) of a value computed from the samples' values or sizes is refused at capture,
naming the module tensor, the node and the user's line; writes that do not read the samples
(counters) and eval-mode normalisation stay, and match the reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfx
from bkfx.errors import StateWriteError
from bkfx.testing import assert_matches_reference, clipped_sum_reference

from helpers import marked_lines

f64 = torch.float64


line_of = marked_lines(__file__)  # line_of("x"): the line ending with the comment `# x`


class InstanceNormed(nn.Module):
    def __init__(self, track=True):
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.norm = nn.InstanceNorm1d(4, track_running_stats=track, affine=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.norm(self.fc(x).view(-1, 4, 3))  # instance norm
        return self.head(h.flatten(1))


class RunningMean(nn.Module):
    """Keeps a running mean of its hidden values in a buffer, in one of several spellings."""

    def __init__(self, spelling):
        super().__init__()
        self.fc, self.head, self.spelling = nn.Linear(4, 5), nn.Linear(5, 3), spelling
        self.register_buffer("mean", torch.zeros(5))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.spelling == "copy_":
            self.mean.copy_(0.9 * self.mean + 0.1 * h.detach().mean(0))  # copy_
        elif self.spelling == "add_":
            self.mean.mul_(0.9).add_(0.1 * h.detach().mean(0))  # add_
        elif self.spelling == "no_grad":
            with torch.no_grad():
                self.mean.copy_(h.mean(0))  # no_grad
        elif self.spelling == "slice":
            self.mean[:2] = h[0, :2].detach()  # slice
        elif self.spelling == "sample count":
            self.steps.add_(x.shape[0])  # sample count
        elif self.spelling == "counter":
            self.steps.add_(1)
            with torch.no_grad():
                self.mean.mul_(0.5)  # decays without reading the samples
        return self.head(h)


def _refusal(model, x) -> str:
    with pytest.raises(StateWriteError) as info:
        bkfx.compile(model)(x)
    message = str(info.value)
    for part in ("node:", "operation:", "source:", "what to do:"):
        assert part in message, message
    return message


def test_instance_norm_with_tracked_statistics_in_training_is_refused():
    model = InstanceNormed().double()
    before = model.norm.running_mean.clone()
    message = _refusal(model, torch.randn(4, 4, dtype=f64))
    assert "'norm.running_mean'" in message and "operation: instance_norm" in message, message
    assert f"test_buffer_writes.py:{line_of('instance norm')}" in message, message
    assert "track_running_stats=False" in message
    assert torch.equal(model.norm.running_mean, before)  # the refused call wrote nothing


@pytest.mark.parametrize("spelling", ["copy_", "add_", "no_grad", "slice", "sample count"])
def test_a_running_mean_of_the_samples_in_a_buffer_is_refused(spelling):
    message = _refusal(RunningMean(spelling).double(), torch.randn(4, 4, dtype=f64))
    name = "'steps'" if spelling == "sample count" else "'mean'"
    assert name in message, message
    assert f"test_buffer_writes.py:{line_of(spelling)}" in message, message


def test_a_write_in_eval_mode_is_refused_too():
    """The mode does not make a running mean of private data public."""
    _refusal(RunningMean("copy_").double().eval(), torch.randn(3, 4, dtype=f64))


def test_writes_that_do_not_read_the_samples_stay_and_match_the_reference():
    torch.manual_seed(0)
    model = RunningMean("counter").double()
    model.mean.fill_(1.0)
    x, y = torch.randn(5, 4, dtype=f64), torch.randint(0, 3, (5,))
    dp, _ = assert_matches_reference(model, F.cross_entropy, x, y, method="loop", max_grad_norm=0.3)
    steps, mean = int(model.steps), model.mean.clone()
    dp(x)
    assert int(model.steps) == steps + 1 and torch.equal(model.mean, mean * 0.5)


def test_instance_norm_in_eval_mode_and_without_tracking_matches_the_reference():
    torch.manual_seed(1)
    x, y = torch.randn(5, 4, dtype=f64), torch.randint(0, 3, (5,))
    tracked = InstanceNormed().double().eval()
    tracked.norm.running_mean.normal_()
    tracked.norm.running_var.uniform_(0.5, 2)
    assert_matches_reference(tracked, F.cross_entropy, x, y, max_grad_norm=0.3)
    assert_matches_reference(InstanceNormed(track=False).double(), F.cross_entropy, x, y, max_grad_norm=0.3)


def test_batch_norm_in_training_keeps_its_mixing_refusal():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(bkfx.SampleMixingError, match="replace_batchnorm"):
        bkfx.compile(model)(torch.randn(3, 4, dtype=f64))



def _loop_clipped_mean(model, state, x, y, max_grad_norm):
    """(1/B) Σ_i C_i G_i with each G_i from a copy of `model` at `state` run on sample i alone
    (a per-sample loop: each sample's forward updates the copy's buffers as the batch's does)."""
    grads = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(y)):
        one = copy.deepcopy(model)
        one.load_state_dict(state)
        one.zero_grad(set_to_none=True)
        F.cross_entropy(one(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in one.named_parameters():
            grads[n].append(p.grad)
    expected, _ = clipped_sum_reference({n: torch.stack(g) for n, g in grads.items()}, max_grad_norm=max_grad_norm)
    return expected


@pytest.mark.parametrize("backend", [None, pytest.param("aot_eager", marks=pytest.mark.compiled)])
def test_spectral_norm_in_training_updates_its_vectors_once_a_step_and_matches_the_reference(backend):
    """Spectral norm's power iteration writes u and v from the weight alone, under no_grad: allowed.
    The probe runs from the buffers the capture saw (so the iteration reads as no mixing) and
    leaves them so; the weight's chain to its site takes the region's outputs as constants, so
    the backward neither updates u and v again nor pulls back through updated ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 3)).to(f64)
    plain = copy.deepcopy(model)
    dp = bkfx.compile(model, max_grad_norm=0.5)
    dp.compile(backend=backend)  # None: the eager BK step; aot_eager: the compiled step traces the same graph
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(6, 4, generator=g, dtype=f64), torch.randint(0, 3, (6,), generator=g)
        state = copy.deepcopy(model.state_dict())
        expected = _loop_clipped_mean(model, state, x, y, 0.5)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(dp(x), y).backward()
        plain(x)  # the original module, one forward: the same u and v after it
        for n, b in model.named_buffers():
            torch.testing.assert_close(b, dict(plain.named_buffers())[n], rtol=1e-12, atol=1e-14)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-13)
        assert (dp._last_program is not None) == (backend is not None)


class DetachedPath(nn.Module):
    """The weight reaches the output twice, once detached (no gradient flows there)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + torch.tanh(F.linear(x, self.fc.weight.detach()))


def test_a_detached_use_of_a_weight_gets_no_gradient_like_the_reference():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=f64), torch.randint(0, 3, (5,))
    assert_matches_reference(DetachedPath().to(f64), F.cross_entropy, (x,), y, max_grad_norm=0.3)
