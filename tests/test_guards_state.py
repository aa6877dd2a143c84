"""Guards on the Python state a forward reads: every kind of change after the first call
(hooks, tensor attributes, containers, callables, module-level globals, a patched forward, a
swapped submodule) recaptures, so `dp(x)` equals `model(x)` and the gradients are the
reference's, or is refused with a bkfx error that names the change."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfx
from bkfx.testing import clipped_sum_reference, per_sample_gradients

D, C, R = 5, 3, 0.05
SCALE = 2.0  # a module-level value the forwards below read
SHIFT = {"bias": 0.5}


def _shifted(h):
    """A helper function that reads a module-level value: the forward reads it through the call."""
    return h + SHIFT["bias"]


def _data(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, generator=g, dtype=torch.float64), torch.randint(0, C, (batch,), generator=g)


def _step(dp, model, x, y):
    """One call and backward through `dp`: its output is `model(x)` and its `.grad` and norms
    are the reference's, for the model as it is now."""
    model.zero_grad(set_to_none=True)
    grads = per_sample_gradients(model, F.cross_entropy, (x,), y)
    expected, norms = clipped_sum_reference(grads, max_grad_norm=R)
    with torch.no_grad():
        want = model(x)
    model.zero_grad(set_to_none=True)
    out = dp(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    F.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(dp.per_sample_norms, norms, rtol=1e-9, atol=1e-12)


class _Net(nn.Module):
    """A forward that reads a tensor attribute, nested containers, a stored function and a
    module-level value, directly and through a helper."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(D, 8), nn.Linear(8, C)
        self.scale = torch.tensor(1.5, dtype=torch.float64)
        self.keep = [0, 1, 2, 3, 4, 5]
        self.flags = {"shift": False, "clamp": {"on": False, "at": 0.5}}
        self.act = torch.tanh

    def forward(self, x):
        h = self.act(self.fc(x)) * self.scale * SCALE
        h = h[:, self.keep]
        h = F.pad(h, (0, 8 - len(self.keep)))
        if self.flags["shift"]:
            h = _shifted(h)
        if self.flags["clamp"]["on"]:
            h = h.clamp(max=self.flags["clamp"]["at"])
        return self.out(h)


def _net(seed=0):
    torch.manual_seed(seed)
    model = _Net().double()
    return model, bkfx.compile(model, max_grad_norm=R)


# ---- hooks ----------------------------------------------------------------------------------


def test_forward_hooks_and_pre_hooks_added_and_removed_after_the_first_call():
    model, dp = _net(1)
    x, y = _data(1)
    _step(dp, model, x, y)
    post = model.fc.register_forward_hook(lambda module, args, out: out * 3.0)
    _step(dp, model, x, y)
    pre = model.out.register_forward_pre_hook(lambda module, args: (args[0] - 1.0,))
    _step(dp, model, x, y)
    post.remove()
    _step(dp, model, x, y)
    pre.remove()
    _step(dp, model, x, y)
    assert dp.capture_count == 1  # each change started over


def test_global_forward_hooks_and_pre_hooks_added_and_removed():
    model, dp = _net(2)
    x, y = _data(2)
    _step(dp, model, x, y)
    post = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out + 1.0 if module is model.fc else None)
    try:
        _step(dp, model, x, y)
        pre = nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: (args[0] * 0.5,) if module is model.out else None)
        try:
            _step(dp, model, x, y)
        finally:
            pre.remove()
        _step(dp, model, x, y)
    finally:
        post.remove()
    _step(dp, model, x, y)


def test_a_hook_that_changes_a_value_it_closes_over_recaptures():
    model, dp = _net(3)
    x, y = _data(3)
    factor = [2.0]
    model.fc.register_forward_hook(lambda module, args, out: out * factor[0])
    _step(dp, model, x, y)
    factor[0] = -1.0  # the hook's closure reads a list the walk watches
    _step(dp, model, x, y)


# ---- tensor attributes ------------------------------------------------------------------------


def test_a_tensor_attribute_replaced_or_changed_in_place_recaptures():
    model, dp = _net(4)
    x, y = _data(4)
    _step(dp, model, x, y)
    model.scale = torch.tensor(3.0, dtype=torch.float64)
    _step(dp, model, x, y)
    with torch.no_grad():
        model.scale.mul_(-0.5)
    _step(dp, model, x, y)
    model.scale = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.0, 2.0], dtype=torch.float64)  # a new shape
    _step(dp, model, x, y)


# ---- containers ---------------------------------------------------------------------------------


def test_containers_changed_in_place_at_any_depth_recapture():
    model, dp = _net(5)
    x, y = _data(5)
    _step(dp, model, x, y)
    model.keep.pop()  # a list of ints, in place
    _step(dp, model, x, y)
    model.keep[0] = 5
    _step(dp, model, x, y)
    model.flags["shift"] = True  # a dict of flags
    _step(dp, model, x, y)
    model.flags["clamp"]["on"] = True  # nested
    _step(dp, model, x, y)
    model.flags["clamp"]["at"] = 0.1
    _step(dp, model, x, y)
    model.flags["clamp"] = {"on": False, "at": 0.1}  # replaced by another dict, then changed in place
    _step(dp, model, x, y)
    model.flags["clamp"]["on"] = True
    _step(dp, model, x, y)


def test_an_equal_value_in_a_new_object_keeps_the_capture():
    model, dp = _net(6)
    x, y = _data(6)
    _step(dp, model, x, y)
    model.keep = list(range(6))  # equal, new objects: nothing the trace read differs
    model.flags = {"shift": False, "clamp": {"on": False, "at": 0.5}}
    _step(dp, model, x, y)
    model.train(False)
    model.train(True)
    _step(dp, model, x, y)
    assert dp.capture_count == 1
    model.flags["clamp"]["on"] = True  # the new dict is the one watched now
    _step(dp, model, x, y)


# ---- callables ------------------------------------------------------------------------------


def test_a_stored_function_replaced_or_its_closure_changed_recaptures():
    model, dp = _net(7)
    x, y = _data(7)
    _step(dp, model, x, y)
    model.act = torch.relu
    _step(dp, model, x, y)
    slope = 0.1

    def leaky(h):
        return torch.where(h > 0, h, slope * h)

    model.act = leaky
    _step(dp, model, x, y)
    slope = 0.7  # the same function, its closure cell changed
    _step(dp, model, x, y)
    model.act = functools.partial(F.leaky_relu, negative_slope=0.2)
    _step(dp, model, x, y)
    model.act = functools.partial(F.leaky_relu, negative_slope=0.3)
    _step(dp, model, x, y)


# ---- module-level values ----------------------------------------------------------------------


def test_module_level_values_read_directly_and_through_a_helper_recapture():
    global SCALE
    model, dp = _net(8)
    x, y = _data(8)
    model.flags["shift"] = True
    _step(dp, model, x, y)
    try:
        SCALE = -3.0  # read by the forward itself
        _step(dp, model, x, y)
        SHIFT["bias"] = 2.0  # read by a helper the forward calls, changed in place
        _step(dp, model, x, y)
    finally:
        SCALE, SHIFT["bias"] = 2.0, 0.5
    _step(dp, model, x, y)


# ---- patched forwards and swapped submodules -------------------------------------------------


def test_a_forward_patched_on_the_instance_or_on_the_class_recaptures():
    model, dp = _net(9)
    x, y = _data(9)
    _step(dp, model, x, y)
    model.forward = lambda x: model.out(torch.sin(model.fc(x)))
    _step(dp, model, x, y)
    del model.forward
    _step(dp, model, x, y)
    original = _Net.forward
    _Net.forward = lambda self, x: self.out(torch.cos(self.fc(x)) * 2.0)
    try:
        _step(dp, model, x, y)
    finally:
        _Net.forward = original
    _step(dp, model, x, y)
    original = nn.Linear.forward  # a library class's method: every Linear in the model
    nn.Linear.forward = lambda self, x: F.linear(x, self.weight, self.bias) * 0.5
    try:
        _step(dp, model, x, y)
    finally:
        nn.Linear.forward = original
    _step(dp, model, x, y)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_a_swapped_submodule_recaptures():
    torch.manual_seed(10)
    model = _Blocks().double()
    dp = bkfx.compile(model, max_grad_norm=R)
    x, y = _data(10)
    _step(dp, model, x, y)
    model.act = nn.ReLU()  # no parameters: only the module tree differs
    _step(dp, model, x, y)
    model.act = nn.Sequential(nn.Linear(8, 8), nn.GELU()).double()  # new parameters, clipped too
    _step(dp, model, x, y)
    model.act[1].approximate = "tanh"  # a plain attribute of the new submodule
    _step(dp, model, x, y)


# ---- what cannot be captured, and what a refusal says -----------------------------------------


class _Counter(nn.Module):
    """A forward that changes a value it reads on every call: no capture replays it."""

    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(D, C), 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


def test_a_forward_that_changes_what_it_reads_on_every_call_is_refused():
    torch.manual_seed(11)
    model = _Counter().double()
    dp = bkfx.compile(model)
    with pytest.raises(bkfx.BkfxError, match="attribute calls was 0, now 1"):
        dp(_data(11)[0])


class _Cached(nn.Module):
    """A forward that fills a cache on its first call and reads it afterwards."""

    def __init__(self):
        super().__init__()
        self.fc, self.cache = nn.Linear(D, C), None

    def forward(self, x):
        if self.cache is None:
            self.cache = [0.5, 1.0, 1.5]
        return self.fc(x) * self.cache[x.shape[1] % 3]


def test_a_cache_the_forward_fills_is_refused_and_accepted_once_filled_before_compile():
    torch.manual_seed(12)
    model = _Cached().double()
    x, y = _data(12)
    with pytest.raises(bkfx.BkfxError, match=r"attribute cache was None, now \[0\.5, 1\.0, 1\.5\]"):
        bkfx.compile(model)(x)
    assert model.cache is None  # torch.export restored it after its trace
    model(x)  # filled before compile: the forward reads it and assigns nothing
    _step(bkfx.compile(model, max_grad_norm=R), model, x, y)


def test_a_change_between_forward_and_backward_is_refused_naming_it():
    model, dp = _net(13)
    x, _ = _data(13)
    out = dp(x)
    model.flags["clamp"]["at"] = 0.25
    with pytest.raises(bkfx.BkfxError, match=r"attribute flags was .*'at': 0\.5.*now .*'at': 0\.25"):
        dp(x)
    del out
