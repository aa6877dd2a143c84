"""`DPOptimizer` as a `torch.optim.Optimizer`: LR schedulers, hooks, zero_grad, param groups and
state shared with the wrapped optimizer, state_dict with the noise generators and the accountant."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkfx


def _plain(lr=1.0, momentum=0.0, **options):
    """A DPOptimizer over two bare parameters with σ = 0 and no division (expected_batch_size 1)."""
    params = [nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    opt = bkfx.DPOptimizer(torch.optim.SGD(params, lr=lr, momentum=momentum), noise_multiplier=0.0,
                           max_grad_norm=1.0, expected_batch_size=1, seed=0, **options)
    return params, opt


def test_lr_scheduler_takes_the_dp_optimizer():
    params, opt = _plain(lr=1.0)
    assert isinstance(opt, torch.optim.Optimizer)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for _ in range(5):
            before = params[0].detach().clone()
            params[0].grad = torch.ones(3, dtype=torch.float64)
            params[1].grad = torch.zeros(2, dtype=torch.float64)
            opt.step()
            used.append(float((before - params[0].detach())[0]))  # p -= lr * grad, grad = 1
            opt.zero_grad()
            schedule.step()
    assert used == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert opt.optimizer.param_groups[0]["lr"] == 0.25 == schedule.get_last_lr()[0]  # 5 epochs: 0.5 ** 2


def test_param_groups_state_and_defaults_are_the_wrapped_optimizers():
    params, opt = _plain(momentum=0.9)
    params[0].grad, params[1].grad = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    opt.step()
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state and "momentum_buffer" in opt.state[params[0]]
    assert opt.defaults is opt.optimizer.defaults
    opt.param_groups[0]["lr"] = 0.25
    assert opt.optimizer.param_groups[0]["lr"] == 0.25


def test_zero_grad_and_step_hooks():
    params, opt = _plain()
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.steps)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.steps)))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [("pre", 0), ("post", 1)]
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_closure_runs_before_the_noise():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))

    def run(with_closure):
        m = copy.deepcopy(model)
        dp = bkfx.compile(m, max_grad_norm=0.5)
        opt = bkfx.DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.3), noise_multiplier=0.8, expected_batch_size=5,
                               model=dp, seed=4)

        def closure():
            loss = F.cross_entropy(dp(x), y)
            loss.backward()
            return loss

        if with_closure:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        return [p.detach() for p in m.parameters()], loss

    (got, loss), (want, want_loss) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(loss, want_loss)


def test_state_dict_is_the_wrapped_optimizers_plus_noise_and_accountant():
    model = nn.Linear(3, 2).double()
    dp = bkfx.compile(model, max_grad_norm=1.0)
    accountant = bkfx.Accountant()
    opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), noise_multiplier=1.0,
                           expected_batch_size=4, model=dp, seed=2, accountant=accountant, sample_rate=0.25)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(2):
        dp(x).sum().backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors, numbers and strings only
    assert set(state) == {"state", "param_groups", "bkfx"}
    assert state["bkfx"]["steps"] == 2 and state["bkfx"]["accountant"]["history"] == [(1.0, 0.25, 2)]

    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(state)  # a plain optimizer takes its own part
    assert torch.equal(plain.state[model.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])

    other = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), noise_multiplier=1.0,
                             expected_batch_size=4, model=dp, seed=77, accountant=bkfx.Accountant(), sample_rate=0.25)
    other.load_state_dict(state)
    assert other.steps == 2 and other.accountant.history == accountant.history
    for o in (opt, other):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        o.add_noise()
        o.noise = [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(opt.noise, other.noise))  # the same noise stream goes on

    with pytest.raises(ValueError, match="no 'bkfx' entry"):
        other.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="secure_mode=False"):
        bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=4,
                         model=dp, secure_mode=True).load_state_dict(state)


def test_add_param_group_takes_the_models_parameters_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    dp = bkfx.compile(model, max_grad_norm=1.0)
    opt = bkfx.DPOptimizer(torch.optim.SGD(model[0].parameters(), lr=1.0), noise_multiplier=1.0,
                           expected_batch_size=2, model=dp, seed=0)
    opt.add_param_group({"params": model[1].parameters(), "lr": 0.5})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 2 and len(opt.param_groups[1]["params"]) == 2
    dp(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    before = model[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[1].weight)  # the new group is noised and stepped
    with pytest.raises(ValueError, match="not the compiled model's"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    params, plain = _plain()
    other = bkfx.compile(nn.Linear(2, 2), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="bkfx-compiled model"):
        plain.add_param_group({"params": list(other.parameters())})


def test_bad_optimizers_are_refused():
    params, opt = _plain()
    with pytest.raises(ValueError, match="already a DPOptimizer"):
        bkfx.DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        bkfx.DPOptimizer(params, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1)


def test_copies_keep_the_stream():
    params, opt = _plain()
    opt.noise_multiplier = 1.0
    twin = pickle.loads(pickle.dumps(opt))
    clone = copy.deepcopy(opt)
    draws = []
    for o in (opt, twin, clone):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        o.add_noise()
        draws.append(torch.cat([p.grad for p in o.param_groups[0]["params"]]))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
