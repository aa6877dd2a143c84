"""Errors are part of the interface: what bkfx cannot do correctly raises a bkfx error that
names the graph node, the ATen operation, the user's source line and what to do instead."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import bkfx

from helpers import marked_lines

f64 = torch.float64
HERE = os.path.basename(__file__)


line_of = marked_lines(__file__)  # line_of("x"): the line ending with the comment `# x`


class Mixer(nn.Module):
    """A linear layer whose output one subclass's forward then mixes across samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)


class Centre(Mixer):
    def forward(self, x):
        y = self.fc(x)
        return y - y.mean(0)  # mix: mean over samples


class SoftmaxOverSamples(Mixer):
    def forward(self, x):
        return torch.softmax(self.fc(x), dim=0)  # mix: softmax over samples


class CumsumOverSamples(Mixer):
    def forward(self, x):
        return torch.cumsum(self.fc(x), 0)  # mix: cumsum over samples


class ReverseSamples(Mixer):
    def forward(self, x):
        y = self.fc(x)
        return y[torch.arange(y.shape[0]).flip(0)]  # mix: index samples


class ContractSamples(Mixer):
    def forward(self, x):
        y = self.fc(x)
        return y @ (y.T @ y)  # mix: contraction over samples


class ConcatenateSamples(Mixer):
    def forward(self, x):
        y = self.fc(x)
        return torch.cat([y, y], 0)  # mix: cat along samples


MIXERS = {
    "mean over samples": Centre,
    "softmax over samples": SoftmaxOverSamples,
    "cumsum over samples": CumsumOverSamples,
    "index samples": ReverseSamples,
    "contraction over samples": ContractSamples,
    "cat along samples": ConcatenateSamples,
}


def assert_names_node_op_source(message: str, marker: str):
    assert "node:" in message, message
    assert "operation:" in message, message
    assert "source: " in message and f"{HERE}:{line_of(marker)}" in message, message
    assert "what to do:" in message, message


@pytest.mark.parametrize("what", sorted(MIXERS))
def test_sample_mixing_is_refused_with_its_source_line(what):
    torch.manual_seed(0)
    dp = bkfx.compile(MIXERS[what]().double())
    with pytest.raises(bkfx.SampleMixingError) as info:
        dp(torch.randn(5, 4, dtype=f64))
    assert_names_node_op_source(str(info.value), f"mix: {what}")


def test_sample_mixing_error_names_the_aten_operation():
    torch.manual_seed(0)
    with pytest.raises(bkfx.SampleMixingError) as info:
        bkfx.compile(CumsumOverSamples().double())(torch.randn(5, 4, dtype=f64))
    assert "cumsum" in str(info.value).split("operation:")[1].splitlines()[0]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return self.fc(x)
        return -self.fc(x)


def test_data_dependent_control_flow_is_a_capture_error():
    dp = bkfx.compile(Branchy().double())
    with pytest.raises(bkfx.CaptureError) as info:
        dp(torch.randn(5, 4, dtype=f64))
    message = str(info.value)
    assert "source: " in message and f"{HERE}:{line_of('data-dependent branch')}" in message, message
    assert "what to do:" in message, message


def test_errors_are_bkfx_errors():
    assert issubclass(bkfx.SampleMixingError, bkfx.BkfxError)
    assert issubclass(bkfx.CaptureError, bkfx.BkfxError)
    assert issubclass(bkfx.UnsupportedOperationError, bkfx.BkfxError)
    assert issubclass(bkfx.NotCapturedError, bkfx.BkfxError)


@pytest.mark.parametrize(
    "options",
    [
        {"clipping": "foo"},
        {"loss_reduction": "x"},
        {"norm_mode": "fastest"},
    ],
)
def test_invalid_options_are_value_errors(options):
    with pytest.raises(ValueError) as info:
        bkfx.compile(nn.Linear(2, 2), **options)
    (value,) = options.values()
    assert repr(value) in str(info.value)


def test_inspection_before_the_first_call_is_not_captured_error():
    dp = bkfx.compile(nn.Linear(2, 2))
    with pytest.raises(bkfx.NotCapturedError):
        dp.code
    with pytest.raises(bkfx.NotCapturedError):
        dp.explain()
    with pytest.raises(bkfx.NotCapturedError):
        dp.plan()


def test_batch_norm_in_training_mixes_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(bkfx.SampleMixingError) as info:
        bkfx.compile(model)(torch.randn(5, 4, dtype=f64))
    message = str(info.value)
    assert "node:" in message and "source:" in message and "what to do:" in message, message
    assert "batch_norm" in message.split("operation:")[1].splitlines()[0], message
