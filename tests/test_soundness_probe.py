"""Soundness of the sample analysis: every sample is checked (no op that mixes only some samples
passes the probe), no region of the forward is opaque to the rules, and the crashes and false
refusals of separable code are fixed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bkfx
from bkfx.testing import assert_matches_reference
from passes.probe import sample_runs

from test_soundness import D, Chain  # the random separable chain the mixer is inserted into


class Mixer(nn.Module):
    """A linear layer, then one operation on the `[B, D]` activation, then a head (as test_soundness's,
    defined here so that the refusals name this file's line)."""

    def __init__(self, op):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.op = op

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(self.op(h))


def refusal(model, *inputs, cls=bkfx.SampleMixingError):
    with pytest.raises(cls) as info:
        bkfx.compile(model)(*inputs)
    message = str(info.value)
    for part in ("node:", "operation:", "source:", "what to do:"):
        assert part in message, message
    return message


def _middle_pairs(h):
    """Samples 1..B-2 paired (1, 2), (3, 4), ...; the first and the last sample alone."""
    p = torch.arange(h.shape[0])
    return torch.where((p > 0) & (p < h.shape[0] - 1), ((p - 1) ^ 1) + 1, p)


@torch.library.custom_op("bkfx_test::middle_mix", mutates_args=())
def middle_mix(h: torch.Tensor) -> torch.Tensor:
    """Adds sample 2's row to sample 3's: a custom kernel bkfx has no rule for."""
    out = h.clone()
    if h.shape[0] > 3:
        out[3] = h[3] + h[2]
    return out


@middle_mix.register_fake
def _(h):
    return torch.empty_like(h)


def _no_grad_flip(h):
    with torch.no_grad():
        f = h.flip(0)
    return h + f


def _no_grad_gather(h):
    with torch.no_grad():
        f = torch.gather(h, 0, _middle_pairs(h)[:, None].expand_as(h))
    return h * f


def _autocast_flip(h):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = h.flip(0)
    return h + f.to(h.dtype)


def _sampling_from_a_neighbour(h):
    probs = torch.softmax(h, -1)
    draw = torch.multinomial(probs[_middle_pairs(h)], 1)  # sample i draws from sample pair(i)'s distribution
    return h * draw.to(h.dtype)


# (mechanism, operation on h [B, D], words the refusal names)
PARTIAL_MIXERS = [
    ("index_add of middle pairs", lambda h: h.index_add(0, _middle_pairs(h), h), "index_add"),
    ("index_put of middle pairs", lambda h: h.index_put((_middle_pairs(h),), h, accumulate=True), "index_put"),
    ("scatter_add of middle pairs", lambda h: h.scatter_add(0, _middle_pairs(h)[:, None].expand_as(h), h), "scatter_add"),
    ("custom op mixing samples 2 and 3", lambda h: middle_mix(h), "middle_mix"),
    ("sampling from a neighbour's probabilities", _sampling_from_a_neighbour, "index"),
    ("flip under no_grad", _no_grad_flip, "flip"),
    ("gather along the batch under no_grad", _no_grad_gather, "gather"),
    ("flip under autocast", _autocast_flip, "flip"),
    ("renorm across the batch", lambda h: torch.renorm(h, 2, 1, 0.5), "renorm"),
    ("pad shifting samples", lambda h: F.pad(h, (0, 0, -1, 1)), "pad"),
    ("identity index through bfloat16", lambda h: h[torch.arange(h.shape[0]).to(torch.bfloat16).long()], "index"),
    ("unique over the batch", lambda h: h * torch.unique(h, return_inverse=True)[1].to(h.dtype), "unique"),
]


@pytest.mark.parametrize("mechanism,op,words", PARTIAL_MIXERS, ids=[m[0] for m in PARTIAL_MIXERS])
def test_an_op_mixing_only_some_samples_is_refused_naming_op_and_line(mechanism, op, words):
    message = refusal(Mixer(op), torch.randn(8, D))
    assert words in message, message
    assert "test_soundness_probe.py" in message, message  # the user's source line


def test_the_probe_runs_cover_every_ordered_pair_of_samples_in_few_runs():
    for batch in range(2, 70):
        runs = sample_runs(batch)
        for i in range(batch):
            for j in range(batch):
                assert i == j or any(i in r and j not in r for r in runs), (batch, i, j)
    assert len(sample_runs(16)) == 6 and len(sample_runs(256)) == 11


def test_an_op_the_probe_cannot_run_is_refused_not_skipped():
    # a Cholesky factor of a per-sample matrix: perturbed samples are no longer positive definite
    def cholesky(h):
        m = h[:, :, None] * h[:, None, :] + torch.eye(D)
        return torch.linalg.cholesky(m).sum(-1)

    message = refusal(Mixer(cholesky), torch.randn(4, D))
    assert "could not probe" in message and "cholesky" in message, message


def test_a_separable_no_grad_and_autocast_region_matches_the_reference():
    class Regions(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):
            h = self.fc(x)
            with torch.no_grad():
                scale = h.abs().amax(-1, keepdim=True) + 1 + torch.bucketize(h, torch.tensor([0.0], dtype=h.dtype))
            with torch.autocast("cpu", enabled=False):
                h = h.flip(-1)
            return self.head(h / scale)

    torch.manual_seed(0)
    x, y = torch.randn(5, D, dtype=torch.float64), torch.randint(0, 3, (5,))
    dp, _ = assert_matches_reference(Regions().double(), F.cross_entropy, x, y, max_grad_norm=0.5)
    assert dp.probed_operations == ["wrap_with_set_grad_enabled"]  # the region holding bucketize, probed whole


# (name, separable operation on h [B, D]) that were refused before
SEPARABLE = [
    ("torch.max(a, b)", lambda h: torch.max(h, 2 * h.flip(-1))),
    ("torch.min(a, b)", lambda h: torch.min(h, 2 * h.flip(-1))),
    ("mask.unsqueeze(-1).expand_as(h)", lambda h: h * (h.sum(-1) > 0).unsqueeze(-1).expand_as(h)),
    ("torch.linalg.cross", lambda h: torch.linalg.cross(h[:, :3], h[:, 3:]).repeat(1, 2)),
    ("reshape(-1) of a [B] tensor", lambda h: h * h.sum(-1).reshape(-1).unsqueeze(-1)),
    ("renorm(dim=0), per sample", lambda h: torch.renorm(h, 2, 0, 0.5)),
    ("pad of a non-sample dimension", lambda h: F.pad(h, (1, 1))[:, 1:-1] + F.pad(h, (-1, 1))),
    ("identity index through int64", lambda h: h[torch.arange(h.shape[0]).to(torch.int32).long()]),
]


@pytest.mark.parametrize("name,op", SEPARABLE, ids=[s[0] for s in SEPARABLE])
def test_separable_ops_once_refused_match_the_reference(name, op):
    torch.manual_seed(3)
    x, y = torch.randn(5, D, dtype=torch.float64), torch.randint(0, 3, (5,))
    dp, _ = assert_matches_reference(Mixer(op).double(), F.cross_entropy, x, y, max_grad_norm=0.3)
    assert dp.probed_operations == [], dp.probed_operations  # proven by rules, not probed


class Funnel(nn.Module):
    """HF Funnel's mask handling: `attention_mask.type_as(inputs_embeds)`, a mask of lower rank."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, mask):
        m = mask.type_as(x)
        h = self.fc(x) * m.unsqueeze(-1) + mask.unsqueeze(-1).expand_as(x)
        return self.head(h.sum(1))


def test_type_as_and_expand_as_of_a_mask_match_the_reference():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    dp, _ = assert_matches_reference(Funnel().double(), F.cross_entropy, (x, mask), torch.randint(0, 3, (3,)))
    assert dp.probed_operations == []


def test_a_fixed_batch_size_names_the_users_line():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.reshape(6, 4))  # fixes the batch to 3

    with pytest.raises(bkfx.CaptureError) as info:
        bkfx.compile(Fixed())(torch.randn(3, 2, 4))
    assert "test_soundness_probe.py" in str(info.value) and "x.reshape(6, 4)" in str(info.value), str(info.value)


# ---- a random separable model with an op mixing only some samples inserted -----------------

CHAIN_OPS = [
    lambda h: torch.relu(h), lambda h: torch.softmax(h, -1), lambda h: h - h.mean(-1, keepdim=True),
    lambda h: torch.cumsum(h, -1) / D, lambda h: torch.sort(h, -1).values, lambda h: F.layer_norm(h, (D,)),
    lambda h: h * torch.bucketize(h, torch.tensor([0.0], dtype=h.dtype)),  # probed, separable
]


def _partial_mixer(kind: int, a: int, b: int):
    """An op under which sample b reads sample a, every other sample left alone."""

    def redirect(h):
        p = torch.arange(h.shape[0])
        return torch.where(p == a, b, p)

    def op(h):
        if kind == 0:
            return h.index_add(0, redirect(h), h)
        if kind == 1:
            return h.index_put((redirect(h),), h, accumulate=True)
        if kind == 2:  # a swap: with a repeated index, index_copy's last write would win (row b keeps its own)
            p = torch.arange(h.shape[0])
            return h.index_copy(0, torch.where(p == a, b, torch.where(p == b, a, p)), h * 2)
        with torch.no_grad():
            return h + h.index_add(0, redirect(h), h)

    return op


@settings(max_examples=8, deadline=None)
@given(
    chain=st.lists(st.integers(0, len(CHAIN_OPS) - 1), min_size=1, max_size=3), kind=st.integers(0, 3),
    where=st.integers(0, 3), data=st.data(), batch=st.integers(3, 12),
)
def test_a_mixer_touching_some_samples_inserted_into_a_separable_model_is_refused(chain, kind, where, data, batch):
    a = data.draw(st.integers(0, batch - 1))
    b = data.draw(st.integers(0, batch - 1).filter(lambda k: k != a))
    ops = [CHAIN_OPS[k] for k in chain]
    ops.insert(min(where, len(ops)), _partial_mixer(kind, a, b))
    with pytest.raises(bkfx.SampleMixingError):
        bkfx.compile(Chain(ops).double())(torch.randn(batch, D, dtype=torch.float64))
