"""Mixed precision: `torch.autocast` (bf16; fp16 with a `torch.amp.GradScaler`) against the
float64 reference of the same float32 model, and the GradScaler's loss scale divided out
of the norms.

Tolerance. bf16 keeps 8 significant bits (unit roundoff 2⁻⁹ ≈ 2e-3), fp16 11 (2⁻¹² ≈ 2e-4);
how far a model's gradients under autocast are from its exact ones depends on the model
(depth, conditioning: a GroupNorm net loses far more than an MLP). So each test measures a
yardstick on the same model and batch: the error of ordinary, non-private autocast — the
mean loss's gradient for `.grad`, and the norms of per-sample gradients computed one sample
at a time under autocast for `per_sample_norms`, each sample's loss weighted 1/B as the
batch's mean loss weighs it (the bf16 output gradients carry that factor and round with it;
an unweighted loss rounds them differently, an independent draw of the same error that
alone differs from the batch's by up to 3.7x over seeds). bkfx computes the same products
(plus the clip factors, accumulated in float32), so its errors must be of the same order:
at most `FACTOR` times the yardstick. Errors are relative to each parameter's largest reference
entry (the worst parameter counts), and to the largest norm.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import bkfx
from bkfx.errors import BkfxError
from bkfx.testing import clipped_sum_reference, per_sample_gradients

transformers.logging.set_verbosity_error()

FACTOR = 3.0
VOCAB = 50


def _fp16_autocast_on(device: str) -> bool:
    try:
        with torch.autocast(device, dtype=torch.float16):
            return torch.mm(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device)).dtype == torch.float16
    except RuntimeError:
        return False


# -- models ------------------------------------------------------------------------------------
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g), _ce


def convnet():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    )
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g), _ce


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, use_cache=False)
    g = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, VOCAB, (4, 12), generator=g), torch.randint(0, VOCAB, (4, 12), generator=g)
    return GPT2LMHeadModel(config), ids, targets, _lm


def _ce(out, y):
    return F.cross_entropy(out, y)


def _lm(out, y):
    return F.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1))


MODELS = {"mlp": mlp, "convnet-groupnorm": convnet, "gpt2": gpt2}


# -- measuring -----------------------------------------------------------------------------------
def _relative(got: dict, want: dict) -> float:
    return max(((got[n].double() - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


def _backward(loss, scaler):
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _grads(model, scaler) -> dict:
    S = scaler.get_scale() if scaler is not None else 1.0
    return {n: p.grad / S for n, p in model.named_parameters() if p.requires_grad}


def errors_under_autocast(build, device, dtype, *, max_grad_norm, scaler=None, **options):
    """bkfx's errors and the yardsticks' (see the module docstring), all against float64."""
    model, x, y, loss_fn = build()
    model, x, y = model.to(device), x.to(device), y.to(device)
    exact = copy.deepcopy(model).double()
    grads = per_sample_gradients(exact, loss_fn, x.double() if x.is_floating_point() else x, y)
    expected, norms = clipped_sum_reference(grads, max_grad_norm=max_grad_norm)
    assert (norms > max_grad_norm).any(), "the batch must be clipped for the test to test clipping"

    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype):
        loss = loss_fn(model(x), y)
    _backward(loss, scaler)
    plain_error = _relative(_grads(model, scaler), {n: g.mean(0) for n, g in grads.items()})

    one_at_a_time, weight = [], 1.0 / x.shape[0]  # sample i's weight in the batch's mean loss
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]) * weight
        _backward(loss, scaler)
        one_at_a_time.append(torch.cat([g.double().flatten() for g in _grads(model, scaler).values()]).norm() / weight)
    plain_norm_error = ((torch.stack(one_at_a_time) - norms).abs().max() / norms.max()).item()

    model.zero_grad(set_to_none=True)
    dp = bkfx.compile(model, max_grad_norm=max_grad_norm, grad_scaler=scaler, **options)
    with torch.autocast(device, dtype=dtype):
        loss = loss_fn(dp(x), y)
    _backward(loss, scaler)
    for n, p in model.named_parameters():
        assert not p.requires_grad or p.grad.dtype == p.dtype, f"{n}: .grad in {p.grad.dtype}, the parameter in {p.dtype}"
    assert dp.per_sample_norms.dtype == torch.float32
    error = _relative(_grads(model, scaler), expected)
    norm_error = ((dp.per_sample_norms.double() - norms).abs().max() / norms.max()).item()
    return error, plain_error, norm_error, plain_norm_error


def assert_same_order(error, plain_error, norm_error, plain_norm_error):
    assert error <= FACTOR * plain_error, f".grad: bkfx's error {error:.3g} vs autocast's own {plain_error:.3g}"
    assert norm_error <= FACTOR * plain_norm_error, (
        f"per-sample norms: bkfx's error {norm_error:.3g} vs per-sample autocast's {plain_norm_error:.3g}"
    )


# -- bf16 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ghost", "explicit"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_matches_the_fp32_model(name, mode, device):
    errors = errors_under_autocast(MODELS[name], device, torch.bfloat16, max_grad_norm=0.5, norm_mode=mode)
    assert_same_order(*errors)


class LongSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x))).mean(1)


def long_sequence():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return LongSequence(), torch.randn(3, 200, 8, generator=g), torch.randint(0, 3, (3,), generator=g), _ce


def test_bf16_ghost_norms_over_long_sequences(device):
    """T = 200: blocked Grams on the CPU, one bmm on a GPU; bf16 Grams, float32 inner products."""
    errors = errors_under_autocast(long_sequence, device, torch.bfloat16, max_grad_norm=0.05, norm_mode="ghost")
    assert_same_order(*errors)


@pytest.mark.parametrize("op", ["conv_transpose", "pow", "atan2", "div", "einsum", "cls"])
def test_bf16_fallback_and_explicit_rules(op, device):
    """The generic fallback (vmap of vjp) re-runs its op under the forward's autocast state."""
    from test_rules import Unknown

    def build():
        torch.manual_seed(0)
        model, x = Unknown(op), torch.randn(6, 2, 4)
        model(x)  # materialise the lazy head
        used = {"conv_transpose": "up", "einsum": "e", "cls": "cls"}.get(op, "p")
        for n, p in model.named_parameters():
            p.requires_grad_(n.split(".")[0] in (used, "head"))
        return model, x, torch.randint(0, 3, (6,)), _ce

    errors = errors_under_autocast(build, device, torch.bfloat16, max_grad_norm=0.05, norm_mode="explicit")
    assert_same_order(*errors)


def test_bf16_parameters_get_bf16_grad_and_float32_norms(device):
    """A model held in bf16 (no autocast): `.grad` in bf16, norms and clip factors in float32."""
    model, x, y, loss_fn = mlp()
    model, x, y = model.to(device).bfloat16(), x.to(device).bfloat16(), y.to(device)
    exact = copy.deepcopy(model).double()  # the bf16 weights and inputs, exactly
    grads = per_sample_gradients(exact, loss_fn, x.double(), y)
    expected, norms = clipped_sum_reference(grads, max_grad_norm=0.5)
    loss_fn(model(x), y).backward()
    plain_error = _relative({n: p.grad for n, p in model.named_parameters()}, {n: g.mean(0) for n, g in grads.items()})
    model.zero_grad(set_to_none=True)
    dp = bkfx.compile(model, max_grad_norm=0.5)
    loss_fn(dp(x), y).backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert dp.per_sample_norms.dtype == torch.float32
    error = _relative({n: p.grad for n, p in model.named_parameters()}, expected)
    assert error <= FACTOR * plain_error, f"bkfx's error {error:.3g} vs bf16 training's own {plain_error:.3g}"
    # the inputs of the norms are bf16 values; their sums are exact to float32 (2⁻²⁴), not bf16
    norm_error = ((dp.per_sample_norms.double() - norms).abs().max() / norms.max()).item()
    assert norm_error <= FACTOR * plain_error


def test_inner_products_of_bf16_pieces_accumulate_in_float32():
    """`‖G_i‖²` of bf16 entries: the float32 sum of their exact squares, not a bf16 sum (which
    loses every term below 2⁻⁹ of the running total)."""
    from bkfx.rules.factors import Dense, Explicit, Factored, inner

    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 4096, generator=g).bfloat16()
    got = inner(Explicit(G), Explicit(G), (4096,))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), G.double().pow(2).sum(1), rtol=1e-6, atol=0)
    L, R = torch.randn(3, 40, 6, generator=g).bfloat16(), torch.randn(3, 40, 7, generator=g)  # mixed dtypes
    piece = Factored(Dense(L), Dense(R))
    want = torch.bmm(L.double().transpose(1, 2), R.bfloat16().double()).flatten(1).pow(2).sum(1)
    got = inner(piece, piece, (6, 7))
    assert got.dtype == torch.float32
    # bf16 Grams: one rounding (2⁻⁹) per entry, independent across entries
    torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=0)


def test_bf16_grams_are_written_in_float32_where_the_gemm_can(device):
    """On CUDA a Gram of bf16 factors is one bf16 GEMM with a float32 output (`bmm`'s
    `out_dtype`): no entry is rounded, so the ghost norm is the bf16 factors' exact norm to
    float32 accuracy. On the CPU (no such kernel) the Gram stays bf16, one rounding per entry."""
    from bkfx.rules.factors import Dense, Factored, gram, inner

    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 300, 6, generator=g).bfloat16().to(device)
    R = torch.randn(3, 300, 7, generator=g).bfloat16().to(device)
    piece = Factored(Dense(L), Dense(R))
    want = torch.bmm(L.double().transpose(1, 2), R.double()).flatten(1).pow(2).sum(1)
    got = inner(piece, piece, (6, 7))
    assert got.dtype == torch.float32
    unrounded = device == "cuda"
    assert gram(Dense(L), Dense(L)).dtype == (torch.float32 if unrounded else torch.bfloat16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if unrounded else 4e-3, atol=0)


def test_fp16_grams_do_not_overflow(device):
    """Loss-scaled fp16 output gradients: their Gram entries exceed fp16's 65504, so Grams of
    fp16 factors are written in float32 (a float32-output fp16 GEMM on CUDA, float32 factors
    on the CPU)."""
    from bkfx.rules.factors import Dense, Factored, inner

    g = torch.Generator().manual_seed(0)
    L = (300 * torch.randn(2, 5, 16, generator=g)).half().to(device)  # S·g with S = 2¹⁰ or so
    R = torch.randn(2, 5, 16, generator=g).half().to(device)
    piece = Factored(Dense(L), Dense(R))
    want = torch.bmm(L.double().transpose(1, 2), R.double()).flatten(1).pow(2).sum(1)
    got = inner(piece, piece, (16, 16))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


# -- fp16 with a GradScaler --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_fp16_with_grad_scaler_matches_the_fp32_model(name, device):
    if not _fp16_autocast_on(device):
        pytest.skip(f"no fp16 autocast on {device} in this torch")
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    errors = errors_under_autocast(MODELS[name], device, torch.float16, max_grad_norm=0.5, scaler=scaler,
                                   norm_mode="ghost" if name == "gpt2" else "auto")
    assert_same_order(*errors)


def _mlp64(device):
    model, x, y, loss_fn = mlp()
    return model.double().to(device), x.double().to(device), y.to(device), loss_fn


def test_grad_scaler_scale_is_divided_out_of_the_norms(device):
    """With loss scale S = 2¹⁰ (a power of two: scaling is exact) the norms and clip factors are
    those of the unscaled loss, and `.grad` is S times the clipped sum, for the scaler to unscale."""
    model, x, y, loss_fn = _mlp64(device)
    expected, norms = clipped_sum_reference(per_sample_gradients(model, loss_fn, x, y), max_grad_norm=0.5)
    S = 2.0**10
    scaler = torch.amp.GradScaler(device, init_scale=S)
    dp = bkfx.compile(model, max_grad_norm=0.5, grad_scaler=scaler)
    scaler.scale(loss_fn(dp(x), y)).backward()
    torch.testing.assert_close(dp.per_sample_norms, norms, rtol=1e-12, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, S * expected[n], rtol=1e-12, atol=1e-15, msg=n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(opt)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-12, atol=1e-15, msg=n)

    # without the scaler, bkfx would see S times the norms and clip every sample S times harder
    model.zero_grad(set_to_none=True)
    unaware = bkfx.compile(model, max_grad_norm=0.5)
    scaler.scale(loss_fn(unaware(x), y)).backward()
    torch.testing.assert_close(unaware.per_sample_norms, S * norms, rtol=1e-12, atol=0)


def test_dp_optimizer_adds_noise_to_the_unscaled_sum(device):
    """`scaler.step(dp_optimizer)`: unscale, then noise — the same update as without a scaler,
    with the same noise."""
    results = []
    for S in (None, 2.0**8):
        model, x, y, loss_fn = _mlp64(device)
        scaler = torch.amp.GradScaler(device, init_scale=S) if S is not None else None
        dp = bkfx.compile(model, max_grad_norm=0.5, grad_scaler=scaler)
        opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.3,
                               expected_batch_size=8, model=dp, seed=7)
        for _ in range(2):
            loss = loss_fn(dp(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-12, atol=1e-14, msg=n)


def test_dp_optimizer_refuses_scaled_gradients(device):
    model, x, y, loss_fn = _mlp64(device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    dp = bkfx.compile(model, max_grad_norm=0.5, grad_scaler=scaler)
    opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                           expected_batch_size=8, model=dp, seed=0)
    scaler.scale(loss_fn(dp(x), y)).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(BkfxError, match="scaler.step"):
        opt.step()  # .grad still carries S: the noise would be S times too small
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # unscaled in the middle of a logical batch: the next physical batch would mix scales
    opt.logical_batch_complete = False
    with pytest.raises(BkfxError, match="logical_batch_complete"):
        scaler.step(opt)


def test_grad_scaler_option_is_checked():
    with pytest.raises(TypeError, match="GradScaler"):
        bkfx.compile(nn.Linear(2, 2), grad_scaler=2.0**8)
