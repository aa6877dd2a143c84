"""User-level privacy: users sampled with probability q, at most k examples each, each user's
examples clipped as one unit, against a per-user vmap reference; the report's unit is the user."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import bkfx
from bkfx.training.data import UserSampler, current_padding, padded


class Tagger(nn.Module):
    """Embedding (factored, one-hot), a linear layer over positions (factored, T > 1), a layer
    norm (explicit) and a head: every kind of piece the per-user sums must combine."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.norm(torch.tanh(self.mix(self.embed(ids))))
        return self.head(h.mean(1))


def model(seed=0):
    torch.manual_seed(seed)
    return Tagger().double()


def per_user_reference(module, ids, y, mask, k, R):
    """`Σ_u min(1, R/‖g_u‖) g_u` with g_u the gradient of the sum of user u's real examples' losses."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    U = ids.shape[0] // k

    def user_loss(p, ids_u, y_u, mask_u):
        losses = F.cross_entropy(functional_call(module, p, (ids_u,)), y_u, reduction="none")
        return (losses * mask_u).sum()

    grads = vmap(grad(user_loss), in_dims=(None, 0, 0, 0))(
        params, ids.view(U, k, -1), y.view(U, k), mask.view(U, k).double())
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    c = (R / norms.clamp(min=R))
    return {n: torch.tensordot(c, g, dims=1) for n, g in grads.items()}, norms


@pytest.mark.parametrize("norm_mode", ["ghost", "explicit"])
def test_per_user_clipping_matches_the_per_user_reference(norm_mode):
    """4 users of k = 3 rows (two padded), clipped as users: .grad equals the reference in float64,
    and dp.per_sample_norms are the users' norms."""
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 11, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    module = model()
    dp = bkfx.compile(module, max_grad_norm=0.5, loss_reduction="sum", norm_mode=norm_mode)
    with padded(mask, rows_per_unit=3):
        F.cross_entropy(dp(ids), y, reduction="sum").backward()
    expected, norms = per_user_reference(module, ids, y, mask, 3, 0.5)
    for n, p in module.named_parameters():
        assert torch.allclose(p.grad, expected[n], rtol=1e-10, atol=1e-12), n
    assert torch.allclose(dp.per_sample_norms, norms, rtol=1e-10)
    assert dp.privacy_unit == ("user", 3)


def test_user_sampler_samples_users_and_caps_their_examples():
    """Users join with probability q; a user with more than k examples gives a uniformly random k;
    each user's rows are contiguous and padded to k."""
    user_ids = torch.tensor([0] * 7 + [1] * 2 + [2] * 1 + [3] * 4)
    sampler = UserSampler(user_ids, 0.5, examples_per_user=3, steps=300, seed=0)
    assert sampler.expected_batch_size == 2.0
    joined, picks = torch.zeros(4), torch.zeros(14)
    for batch in sampler:
        assert len(batch) % 3 == 0
        for u in range(len(batch) // 3):
            rows = batch[3 * u:3 * u + 3]
            real = [i for i in rows if i >= 0]
            users = {int(user_ids[i]) for i in real}
            assert len(users) == 1 and rows == real + [-1] * (3 - len(real)) and real == sorted(real)
            user = users.pop()
            assert len(real) == min(3, int((user_ids == user).sum()))
            joined[user] += 1
            picks[real] += 1
    assert ((joined / 300) - 0.5).abs().max() < 0.1
    first = picks[:7] / joined[0]  # user 0's 7 examples, 3 of them each time: 3/7 each
    assert (first - 3 / 7).abs().max() < 0.12


def test_user_level_training_loop_and_report():
    g = torch.Generator().manual_seed(1)
    N = 30
    data = TensorDataset(torch.randint(0, 11, (N, 5), generator=g), torch.randint(0, 3, (N,), generator=g))
    user_ids = torch.arange(N) % 8
    loader = bkfx.poisson_loader(data, 0.5, user_ids=user_ids, examples_per_user=2, seed=0, steps=3)
    module = model(1)
    dp = bkfx.compile(module, max_grad_norm=1.0)
    accountant = bkfx.Accountant()
    optimizer = bkfx.DPOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), noise_multiplier=1.0, model=dp,
                                 expected_batch_size=loader.batch_sampler.expected_batch_size, seed=0,
                                 accountant=accountant, sample_rate=0.5)
    for ids, y in loader:
        padding = current_padding()
        assert padding.rows_per_unit == 2 and ids.shape[0] == padding.mask.shape[0]
        F.cross_entropy(dp(ids), y).backward()
        assert dp.per_sample_norms.shape[0] == ids.shape[0] // 2  # one norm per user
        optimizer.step()
        optimizer.zero_grad()
    report = str(bkfx.privacy_report(accountant, delta=1e-5))
    assert "add/remove one user" in report and "at most 2 examples" in report


@pytest.mark.parametrize("norm_mode", ["ghost", "explicit"])
def test_a_step_with_no_user_sampled_writes_zero_sums(norm_mode):
    """No user drawn: the batch has 0 rows (0 units of k); every .grad is an exact zero sum."""
    module = model()
    dp = bkfx.compile(module, max_grad_norm=0.5, loss_reduction="sum", norm_mode=norm_mode)
    with torch.no_grad():
        dp(torch.zeros(3, 5, dtype=torch.long))  # the capture needs a sample; then a step with none
    ids, y = torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    with padded(torch.zeros(0, dtype=torch.bool), rows_per_unit=3):
        F.cross_entropy(dp(ids), y, reduction="sum").backward()
    for n, p in module.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n
    assert dp.per_sample_norms.shape == (0,)
