"""DP-SGD end to end: DPOptimizer's noise and steps, clipping styles, batches of 0 and 1,
gradient accumulation, and make_private — checked against bkfx.testing's vmap reference."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import chi2, norm
from torch.utils.data import DataLoader, TensorDataset

import bkfx
from bkfx.training.accounting import epsilon
from bkfx.training.data import split_physical_batches
from bkfx.testing import clipped_sum_reference, per_sample_gradients

# Two-sided statistical tests at level 1e-6 (the generators are seeded, so they are also deterministic).
LEVEL = 1e-6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def clipped_sum(model, x, y, dp: bkfx.DPModel) -> dict[str, torch.Tensor]:
    """Σ_i C_i G_i from the vmap reference, with the compiled model's groups and thresholds."""
    grads = per_sample_gradients(model, F.cross_entropy, x, y)
    expected, norms = clipped_sum_reference(
        grads, max_grad_norm=dp.max_grad_norms, loss_reduction="sum", groups=dp.clip_groups
    )
    return expected, norms


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params(model, expected: dict[str, torch.Tensor], tol: float = 1e-12):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=tol, msg=n)


# -- noise ------------------------------------------------------------------------------


def documented_noise(shapes, generator, dtype) -> list[torch.Tensor]:
    """The noise stream as `bkfx.training.optimizer.add_gaussian_noise_` documents it (one dtype): the
    tensors' entries one after another cut into chunks of NOISE_CHUNK, per-chunk seeds from one
    randint draw, each chunk from its own generator."""
    from bkfx.training.optimizer import NOISE_CHUNK

    total = sum(math.prod(s) for s in shapes)
    sizes = [min(NOISE_CHUNK, total - start) for start in range(0, total, NOISE_CHUNK)]
    seeds = torch.randint(0, 2**63 - 1, (len(sizes),), generator=generator).tolist()
    stream = torch.cat([torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
                        for size, seed in zip(sizes, seeds)])
    return [part.reshape(s) for part, s in zip(stream.split([math.prod(s) for s in shapes]), shapes)]


def test_noise_does_not_depend_on_threads_and_covers_chunked_parameters():
    """A parameter larger than one chunk draws several independently seeded chunks; drawing
    them on a thread pool gives the same noise as drawing them in turn."""
    from concurrent.futures import ThreadPoolExecutor

    from bkfx.training.optimizer import NOISE_CHUNK, add_gaussian_noise_

    shapes = [(NOISE_CHUNK * 2 + 5,), (7, 3), (NOISE_CHUNK - 30,), (4,)]  # chunks spanning tensors, one ending on one
    serial = [torch.zeros(s) for s in shapes]
    add_gaussian_noise_(serial, 1.0, torch.Generator().manual_seed(5))
    with ThreadPoolExecutor(2) as pool:
        threaded = [torch.zeros(s) for s in shapes]
        add_gaussian_noise_(threaded, 1.0, torch.Generator().manual_seed(5), pool)
    expected = documented_noise(shapes, torch.Generator().manual_seed(5), torch.float32)
    for a, b, e in zip(serial, threaded, expected):
        assert torch.equal(a, b) and torch.equal(a, e)
    first, last = serial[0][:NOISE_CHUNK], serial[0][NOISE_CHUNK:2 * NOISE_CHUNK]
    assert not torch.equal(first, last)  # chunks are not copies of one stream


def test_noise_has_std_sigma_times_total_norm_over_batch_size():
    n, sigma, norms, batch = 200_000, 1.3, [0.5, 1.2], 8
    std = sigma * math.sqrt(0.5**2 + 1.2**2) / batch  # R = sqrt(Σ_g R_g²) = 1.3
    p = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = bkfx.DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=sigma, max_grad_norm=norms,
                           expected_batch_size=batch, seed=0)
    assert opt.max_grad_norm == pytest.approx(1.3) and opt.noise_std == pytest.approx(1.69)
    draws = []
    for _ in range(2):
        p.grad = torch.zeros_like(p)
        opt.step()
        draws.append(p.grad.clone())
    z = norm.isf(LEVEL / 2)
    for noise in draws:
        # n·(mean square)/std² ~ χ²_n when the noise is N(0, std²)
        stat = (noise.pow(2).sum() / std**2).item()
        assert chi2.ppf(LEVEL / 2, n) <= stat <= chi2.isf(LEVEL / 2, n)
        assert abs(noise.mean().item()) <= z * std / math.sqrt(n)
    # a fresh draw each step: the sample correlation of independent normals is ≈ N(0, 1/n)
    corr = (draws[0] * draws[1]).sum() / (draws[0].norm() * draws[1].norm())
    assert abs(corr.item()) <= z / math.sqrt(n)


def test_noise_goes_to_every_trainable_parameter_and_is_reproducible():
    def run(seed):
        a, b, frozen = (nn.Parameter(torch.zeros(3)) for _ in range(3))
        frozen.requires_grad_(False)
        opt = bkfx.DPOptimizer(torch.optim.SGD([a, b, frozen], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=1, seed=seed)
        a.grad = torch.zeros(3)  # b has no gradient at all: it still gets noise
        opt.step()
        return a.detach().clone(), b.detach().clone(), frozen.detach().clone()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert (first[0] != 0).all() and (first[1] != 0).all() and (first[2] == 0).all()

    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(first[0], -documented_noise([(3,), (3,)], g, torch.float32)[0], rtol=0, atol=0)


# -- noise 0: the step is the reference clipped mean ------------------------------------


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
])
def test_noiseless_step_is_the_reference_clipped_mean(make_optimizer):
    model = net()
    twin = copy.deepcopy(model)
    x, y = data(9)
    dp = bkfx.compile(model, max_grad_norm=0.4)  # loss_reduction "mean"; the optimizer asks for sums
    opt = bkfx.DPOptimizer(make_optimizer(list(model.parameters())), noise_multiplier=0.0,
                           expected_batch_size=9, model=dp)
    twin_opt = make_optimizer(list(twin.parameters()))
    for _ in range(3):
        expected, norms = clipped_sum(twin, x, y, dp)
        assert (norms > 0.4).any()  # clipping is active
        F.cross_entropy(dp(x), y).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12)
        opt.step()
        opt.zero_grad()
        for n, p in twin.named_parameters():
            p.grad = expected[n] / 9
        twin_opt.step()
        assert_params(model, params_of(twin))


GROUPS = [["fc1.weight", "norm.weight", "norm.bias"], ["fc1.bias", "fc2.weight", "fc2.bias"]]


@pytest.mark.parametrize("style, max_grad_norm, n_groups", [
    ("layer-wise", 0.3, 3), ("param-wise", 0.2, 6), (GROUPS, [0.25, 1.5], 2),
])
def test_group_styles_match_the_reference_per_group(style, max_grad_norm, n_groups):
    model = net()
    twin = copy.deepcopy(model)
    x, y = data(7)
    dp = bkfx.compile(model, max_grad_norm=max_grad_norm, style=style)
    assert len(dp.clip_groups) == n_groups
    opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0,
                           expected_batch_size=7, model=dp)
    thresholds = max_grad_norm if isinstance(max_grad_norm, list) else [max_grad_norm] * n_groups
    assert dp.max_grad_norms == thresholds
    assert opt.max_grad_norm == pytest.approx(math.sqrt(sum(r * r for r in thresholds)))

    expected, _ = clipped_sum(twin, x, y, dp)
    grads = per_sample_gradients(twin, F.cross_entropy, x, y)
    F.cross_entropy(dp(x), y).backward()
    for g, (group, r) in enumerate(zip(dp.clip_groups, thresholds)):
        group_norms = torch.sqrt(sum(grads[n].flatten(1).pow(2).sum(1) for n in group))
        torch.testing.assert_close(dp.per_group_norms[g], group_norms, rtol=1e-9, atol=0)
        assert (group_norms > r).any()  # this group's threshold matters
        for n in group:
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, expected[n], rtol=1e-9, atol=1e-12)
    before = params_of(model)
    opt.step()
    assert_params(model, {n: before[n] - 0.5 * expected[n] / 7 for n in before})


# -- batches of 0 and 1 -----------------------------------------------------------------


def test_empty_and_single_batches_through_model_and_optimizer():
    model = net()
    twin = copy.deepcopy(model)
    x, y = data(4)
    dp = bkfx.compile(model, max_grad_norm=0.5)
    opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), noise_multiplier=0.7,
                           expected_batch_size=4, model=dp, seed=3)
    F.cross_entropy(dp(x), y).backward()  # the capture, on an ordinary batch
    opt.zero_grad()

    # B = 0: the clipped sum is zero, the step is noise only
    F.cross_entropy(dp(x[:0]), y[:0]).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.abs().max().item() == 0.0
    replay = torch.Generator()
    replay.set_state(opt.generator.get_state())
    before = params_of(model)
    opt.step()
    opt.zero_grad()
    std = 0.7 * 0.5
    named = list(model.named_parameters())
    for (n, p), noise in zip(named, documented_noise([p.shape for _, p in named], replay, torch.float64)):
        torch.testing.assert_close(p.detach(), before[n] - 0.2 * std * noise / 4, rtol=0, atol=1e-15)

    # B = 1, noiseless: the reference
    opt.noise_multiplier = 0.0
    twin.load_state_dict(model.state_dict())
    expected, _ = clipped_sum(twin, x[:1], y[:1], dp)
    before = params_of(model)
    F.cross_entropy(dp(x[:1]), y[:1]).backward()
    opt.step()
    assert_params(model, {n: before[n] - 0.2 * expected[n] / 4 for n in before})
    assert dp.capture_count == 1


# -- gradient accumulation --------------------------------------------------------------


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_accumulating_physical_batches_is_one_large_batch(loss_reduction):
    x, y = data(13)
    results = []
    for physical in (13, 5, 1):
        model = net()
        dp = bkfx.compile(model, max_grad_norm=0.6, loss_reduction=loss_reduction)
        opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.4), noise_multiplier=1.1,
                               expected_batch_size=13, model=dp, seed=5)
        for _ in range(2):  # two logical steps
            for xb, yb in split_physical_batches((x, y), physical):
                F.cross_entropy(dp(xb), yb, reduction=loss_reduction).backward()
            opt.step()
            opt.zero_grad()
        results.append(params_of(model))
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=0, atol=1e-12)


# -- make_private -----------------------------------------------------------------------


def train(result, epochs: int):
    model, optimizer, loader, _ = result
    for _ in range(epochs):
        for xb, yb in loader:
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_make_private_physical_batches_train_like_logical_ones():
    x, y = data(30)
    finals = []
    for physical in (None, 4):
        model = net()
        result = bkfx.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.3), TensorDataset(x, y), noise_multiplier=0.9,
            max_grad_norm=0.5, batch_size=12, max_physical_batch_size=physical, seed=11,
        )
        train(result, epochs=2)
        assert result.optimizer.steps == 2 * round(30 / 12) == result.accountant.steps
        finals.append(params_of(model))
    for n in finals[0]:
        torch.testing.assert_close(finals[1][n], finals[0][n], rtol=0, atol=1e-12)


def test_make_private_reaches_its_target_epsilon():
    torch.manual_seed(0)
    x = torch.randn(80, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(bkfx.errors.PoissonSamplingWarning, match="SequentialSampler"):  # its batches are replaced
        result = bkfx.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=16),
            target_epsilon=2.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0, seed=0,
        )
    dp, optimizer, loader, accountant = result
    assert dp.sum_clipped_gradients and isinstance(dp, bkfx.DPModel)
    assert optimizer.expected_batch_size == pytest.approx(16) and loader.batch_sampler.sample_rate == 0.2
    sigma = optimizer.noise_multiplier
    train(result, epochs=3)
    steps = 3 * 5
    assert [(r.noise_multiplier, r.sample_rate, r.count) for r in accountant.history] == [(sigma, 0.2, steps)]
    spent = accountant.epsilon(1e-5)
    assert spent <= 2.0
    assert epsilon(sigma - 1e-3, 0.2, steps, 1e-5) > 2.0  # no less noise would have done
    assert spent == pytest.approx(2.0, abs=0.02)


def test_make_private_is_reproducible_with_a_seed():
    x, y = data(24)
    finals = []
    for seed in (4, 4, 5):
        model = net()
        train(bkfx.make_private(model, torch.optim.SGD(model.parameters(), lr=0.3), TensorDataset(x, y),
                                noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, seed=seed), epochs=1)
        finals.append(params_of(model))
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
    assert not torch.equal(finals[0]["fc1.weight"], finals[2]["fc1.weight"])


def test_make_private_rejects_inconsistent_arguments():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = TensorDataset(*data(10))
    base = dict(max_grad_norm=1.0, batch_size=5)
    cases = [
        (dict(base), "exactly one of target_epsilon"),
        (dict(base, target_epsilon=1.0, noise_multiplier=1.0, target_delta=1e-5, epochs=1), "exactly one of target_epsilon"),
        (dict(base, target_epsilon=1.0, epochs=1), "target_delta"),
        (dict(base, target_epsilon=1.0, target_delta=1e-5), "epochs"),
        (dict(base, noise_multiplier=1.0, target_delta=2.0), "target_delta"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0), "exactly one of batch_size"),
        (dict(base, noise_multiplier=1.0, sample_rate=0.5), "exactly one of batch_size"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, batch_size=11), "batch_size must be"),
        (dict(base, noise_multiplier=-1.0), "noise_multiplier"),
        (dict(base, noise_multiplier=1.0, accountant="moments"), "accountant"),
        (dict(base, noise_multiplier=1.0, max_physical_batch_size=0), "max_physical_batch_size"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            bkfx.make_private(model, opt, ds, **kwargs)
    with pytest.raises(ValueError, match="not the model's"):
        bkfx.make_private(model, torch.optim.SGD(net(1).parameters(), lr=0.1), ds, noise_multiplier=1.0, **base)
    with pytest.raises(ValueError, match="DPModel"):
        bkfx.make_private(bkfx.compile(model), opt, ds, noise_multiplier=1.0, **base)


def test_dp_optimizer_rejects_noise_scaled_to_other_clipping():
    model = net()
    dp = bkfx.compile(model, max_grad_norm=[1.0, 2.0], style=GROUPS)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clips to"):
        bkfx.DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, model=dp)
    opt = bkfx.DPOptimizer(sgd, noise_multiplier=1.0, expected_batch_size=4, model=dp)
    assert opt.max_grad_norm == pytest.approx(math.sqrt(5))
    with pytest.raises(ValueError, match="sample_rate"):
        bkfx.DPOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                         accountant=bkfx.Accountant())


def test_dp_optimizer_state_dict_resumes_the_same_run():
    def fresh():
        model = net()
        dp = bkfx.compile(model, max_grad_norm=0.5)
        opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5), noise_multiplier=1.0,
                               expected_batch_size=6, model=dp, seed=9, accountant=bkfx.Accountant(), sample_rate=0.5)
        return model, dp, opt

    x, y = data(6)

    def step(dp, opt):
        F.cross_entropy(dp(x), y).backward()
        opt.step()
        opt.zero_grad()

    model, dp, opt = fresh()
    step(dp, opt)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    step(dp, opt)
    resumed, rdp, ropt = fresh()
    ropt.generator.manual_seed(123)  # a different stream, replaced by the saved one
    resumed.load_state_dict(saved[0])
    ropt.load_state_dict(saved[1])
    step(rdp, ropt)
    assert_params(resumed, params_of(model), tol=0)
    assert ropt.steps == opt.steps == 2 and ropt.accountant.history == opt.accountant.history
