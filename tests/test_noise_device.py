"""DPOptimizer's noise on the parameters' device: one generator per device, reproducible from
a seed, with each device's documented stream, and saved and restored with the optimizer."""
from __future__ import annotations

import torch

import bkfx


def _optimizer(device, seed, shapes=((5, 3), (7,), (2, 2, 2))):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64, device=device)) for s in shapes]
    opt = bkfx.DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5,
                           expected_batch_size=1, seed=seed)
    return params, opt


def _noise(params, opt):
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.add_noise()
    return [p.grad.clone() for p in params]


def test_noise_is_drawn_on_the_device_reproducibly(device):
    params, opt = _optimizer(device, seed=11)
    first = _noise(params, opt)
    assert all(n.device.type == device for n in first)
    assert opt.generator_for(torch.device(device)).device.type == device
    again = _noise(*_optimizer(device, seed=11))
    other = _noise(*_optimizer(device, seed=12))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    second = _noise(params, opt)  # the stream goes on
    assert not any(torch.equal(a, b) for a, b in zip(first, second))


def test_gpu_stream_is_one_randn_per_dtype_split_among_the_tensors(device):
    """On a GPU: per dtype, `randn(n, generator=Generator(device).manual_seed(seed))` for all n
    entries, split among the tensors in order (the CPU's chunked stream is checked in test_privacy)."""
    if device == "cpu":
        return
    params, opt = _optimizer(device, seed=5)
    got = _noise(params, opt)
    g = torch.Generator(device=device).manual_seed(5)
    by_dtype = {}
    for k, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(k)
    for dtype, ks in by_dtype.items():
        flat = torch.randn(sum(params[k].numel() for k in ks), generator=g, dtype=dtype, device=device)
        for k, part in zip(ks, flat.split([params[k].numel() for k in ks])):
            torch.testing.assert_close(got[k], 2.0 * 0.5 * part.view(params[k].shape), rtol=0, atol=0)


def test_state_dict_restores_every_device_stream(device):
    params, opt = _optimizer(device, seed=3)
    _noise(params, opt)
    saved = opt.state_dict()
    expected = _noise(params, opt)
    params2, resumed = _optimizer(device, seed=99)
    resumed.load_state_dict(saved)
    got = _noise(params2, resumed)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_given_generator_serves_its_device_untouched():
    """`generator=` draws its own device's noise; it is not advanced to seed other devices."""
    g = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))]
    opt = bkfx.DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=1, generator=g)
    assert opt.generator_for(torch.device("cpu")) is g
    state = torch.Generator().manual_seed(8).get_state()
    assert torch.equal(g.get_state(), state)
