"""Soundness: what bkfx accepts gets exactly the clipped per-sample gradient sum; what mixes
samples, changed after capture or is misconfigured is refused or recaptured, never silently wrong."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

import bkfx
from bkfx.testing import assert_matches_reference, clipped_sum_reference, per_sample_gradients

D = 6


def refusal(model, *inputs, cls=bkfx.SampleMixingError, **options):
    with pytest.raises(cls) as info:
        bkfx.compile(model, **options)(*inputs)
    message = str(info.value)
    for part in ("node:", "operation:", "source:", "what to do:"):
        assert part in message, message
    return message


class Mixer(nn.Module):
    """A linear layer, then one operation on the `[B, D]` activation, then a head."""

    def __init__(self, op):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.op = op

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(self.op(h))


def _attention_over_batch(h):
    q = h.unsqueeze(0)  # [1, B, D]: the batch as the sequence
    return F.scaled_dot_product_attention(q, q, q).squeeze(0)


def _avg_pool_batch_last(h):
    return F.avg_pool1d(h.T.unsqueeze(0), 3, stride=1, padding=1).squeeze(0).T


def _conv_over_batch(h):
    w = torch.ones(D, 1, 3) / 3
    return F.conv1d(h.T.unsqueeze(0), w, padding=1, groups=D).squeeze(0).T


def _strided_neighbours(h):
    return h.as_strided(h.shape, (1, 1))  # row i reads entries of row i + 1


# (mechanism, operation on h [B, D], words the refusal must contain)
MIXERS = [
    ("pooling", _avg_pool_batch_last, "avg_pool1d"),
    ("convolution", _conv_over_batch, "conv1d"),
    ("attention", _attention_over_batch, "scaled_dot_product_attention"),
    ("gather", lambda h: torch.gather(h, 0, torch.zeros_like(h, dtype=torch.long)), "gather"),
    ("index other samples", lambda h: h[torch.arange(h.shape[0]).flip(0)], "index"),
    ("embedding of activations", lambda h: F.embedding(torch.zeros(h.shape[0], dtype=torch.long), h), "embedding"),
    ("strided view", _strided_neighbours, "as_strided"),
    # torch >= 2.13's export fixes B (a CaptureError); 2.11's keeps it, and the sample rules refuse the op
    ("fft", lambda h: torch.fft.fft(h, dim=0).real, "batch dimension dynamic|fft_fft works along the sample dimension"),
    ("sort", lambda h: torch.sort(h, dim=0).values, "sort"),
    ("scan", lambda h: torch.cumsum(h, dim=0), "cumsum"),
    ("pairwise distances", lambda h: h * ((h[:, None] - h[None]) ** 2).sum(-1).mean(1, keepdim=True), "twice"),
    ("batch statistics", lambda h: h - h.mean(0), "reduces, contracts or selects along the sample dimension"),
    ("softmax over samples", lambda h: torch.softmax(h, dim=0), "softmax"),
    ("matmul over samples", lambda h: h @ (h.T @ h), "reduces, contracts or selects along the sample dimension"),
    ("einsum over samples", lambda h: torch.einsum("bi,ci->bi", h, h), "einsum"),
    ("roll", lambda h: torch.roll(h, 1, 0), "roll"),
    ("flip", lambda h: h.flip(0), "flip"),
    ("index_select", lambda h: h.index_select(0, torch.zeros(h.shape[0], dtype=torch.long)), "index_select"),
    ("unfold windows", lambda h: h.unfold(0, 1, 1).squeeze(-1), "unfold"),
    ("batch norm", lambda h: F.batch_norm(h, None, None, training=True), "batch normalisation"),
]


@pytest.mark.parametrize("mechanism,op,words", MIXERS, ids=[m[0] for m in MIXERS])
def test_each_mixing_mechanism_is_refused_at_the_first_call(mechanism, op, words):
    if mechanism == "fft":  # refused at capture either way (see MIXERS): by export, or by the sample rules
        with pytest.raises((bkfx.CaptureError, bkfx.SampleMixingError), match=words):
            bkfx.compile(Mixer(op))(torch.randn(5, D))
        return
    message = refusal(Mixer(op), torch.randn(5, D))
    assert words in message, message
    assert "test_soundness.py" in message  # the user's source line


class TransformerOnBatchFirst(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False, fed `[B, T, E]`."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(-2 if self.layer.self_attn.batch_first else 0))


def test_transformer_layer_with_batch_first_false_on_batch_first_input_is_refused():
    message = refusal(TransformerOnBatchFirst(), torch.randn(4, 5, 8))
    assert "batch_dim" in message


class SequenceFirstAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=False) on `[T, B, E]`, pooled over time."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(0))


def test_sequence_first_attention_is_refused_with_the_default_batch_dim_and_exact_with_batch_dim_1():
    torch.manual_seed(0)
    model = SequenceFirstAttention().double()
    x = torch.randn(5, 4, 8, dtype=torch.float64)  # [T, B, E]
    assert "batch_dim" in refusal(model, x)
    assert_matches_reference(model, F.cross_entropy, x, torch.randint(0, 3, (4,)), batch_dim=1, max_grad_norm=0.3)


def test_transformer_layer_sequence_first_matches_the_reference_with_batch_dim_1():
    torch.manual_seed(1)
    model = TransformerOnBatchFirst().double().eval()
    x = torch.randn(5, 3, 8, dtype=torch.float64)  # [T, B, E]
    assert_matches_reference(model, F.cross_entropy, x, torch.randint(0, 3, (3,)), batch_dim=1, max_grad_norm=0.5)


def test_a_batch_dim_past_the_inputs_rank_is_a_capture_error():
    with pytest.raises(bkfx.CaptureError, match="batch_dim=3"):
        bkfx.compile(Mixer(lambda h: h), batch_dim=3)(torch.randn(4, D))
    with pytest.raises(ValueError, match="batch_dim"):
        bkfx.compile(Mixer(lambda h: h), batch_dim="1")


# ---- a random separable model with one mixing op inserted --------------------------------

SEPARABLE = [
    lambda h: torch.relu(h), lambda h: h * torch.sigmoid(h), lambda h: torch.softmax(h, -1),
    lambda h: h - h.mean(-1, keepdim=True), lambda h: torch.cumsum(h, -1) / D, lambda h: h.flip(-1),
    lambda h: torch.sort(h, -1).values, lambda h: (h.unsqueeze(1) * h.unsqueeze(2)).sum(-1),
    lambda h: h.reshape(h.shape[0], 2, D // 2).transpose(1, 2).reshape(h.shape[0], D),
    lambda h: F.layer_norm(h, (D,)), lambda h: torch.cat([h[:, : D // 2], h[:, D // 2 :] * 2], -1),
    lambda h: torch.gather(h, 1, torch.arange(D).flip(0).expand(h.shape[0], D)),
]


class Chain(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(D, D) for _ in ops)
        self.head = nn.Linear(D, 3)
        self.ops = ops

    def forward(self, x):
        for fc, op in zip(self.fcs, self.ops):
            x = op(fc(x))
        return self.head(x)


@settings(max_examples=12, deadline=None)
@given(
    chain=st.lists(st.integers(0, len(SEPARABLE) - 1), min_size=1, max_size=3),
    mixer=st.integers(0, len(MIXERS) - 1), where=st.integers(0, 3), batch=st.integers(2, 5), seed=st.integers(0, 99),
)
def test_a_random_separable_model_matches_and_one_inserted_mixing_op_is_refused(chain, mixer, where, batch, seed):
    torch.manual_seed(seed)
    ops = [SEPARABLE[k] for k in chain]
    x, y = torch.randn(batch, D, dtype=torch.float64), torch.randint(0, 3, (batch,))
    assert_matches_reference(Chain(ops).double(), F.cross_entropy, x, y, max_grad_norm=0.2)
    ops.insert(min(where, len(ops)), MIXERS[mixer][1])
    with pytest.raises((bkfx.SampleMixingError, bkfx.CaptureError)):
        bkfx.compile(Chain(ops).double())(x)


# ---- ops without a sample rule go through the probe ----------------------------------------


def test_an_op_without_a_rule_is_probed_and_accepted_when_separable():
    torch.manual_seed(2)
    model = Mixer(lambda h: h * torch.bucketize(h, torch.tensor([0.0], dtype=h.dtype))).double()
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    dp, _ = assert_matches_reference(model, F.cross_entropy, x, y)
    assert dp.probed_operations == ["bucketize"]
    assert "bucketize" in dp.explain()


def test_an_op_without_a_rule_that_mixes_is_refused_by_the_probe():
    message = refusal(Mixer(_strided_neighbours), torch.randn(4, D))
    assert "probed it at capture" in message


# ---- changes after capture ----------------------------------------------------------------


def _fresh(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _check_step(dp, model, x, y, max_grad_norm):
    """One backward through `dp` against the reference for the parameters trainable now."""
    model.zero_grad(set_to_none=True)
    grads = per_sample_gradients(model, F.cross_entropy, (x,), y)
    expected, norms = clipped_sum_reference(grads, max_grad_norm=max_grad_norm)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(dp(x), y).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
        else:
            assert p.grad is None, name
    torch.testing.assert_close(dp.per_sample_norms, norms, rtol=1e-9, atol=1e-12)


def test_unfreezing_after_the_first_call_recaptures_and_clips_the_new_parameter():
    model = _fresh()
    model[0].weight.requires_grad_(False)
    dp = bkfx.compile(model, max_grad_norm=0.05)
    x, y = torch.randn(5, D, dtype=torch.float64), torch.randint(0, 3, (5,))
    _check_step(dp, model, x, y, 0.05)
    model[0].weight.requires_grad_(True)
    _check_step(dp, model, x, y, 0.05)  # clipped, not the plain sum
    model[2].weight.requires_grad_(False)
    _check_step(dp, model, x, y, 0.05)


def test_freeze_compile_unfreeze_before_the_first_call():
    model = _fresh(1)
    model[2].weight.requires_grad_(False)
    dp = bkfx.compile(model, max_grad_norm=0.05)
    model[2].weight.requires_grad_(True)
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    _check_step(dp, model, x, y, 0.05)


def test_a_replaced_submodule_or_parameter_is_used_after_the_change():
    model = _fresh(2)
    dp = bkfx.compile(model, max_grad_norm=0.05)
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    _check_step(dp, model, x, y, 0.05)
    model[2] = nn.Linear(8, 3).double()
    assert torch.equal(dp(x), model(x))
    _check_step(dp, model, x, y, 0.05)
    model[0].weight = nn.Parameter(torch.randn(8, D, dtype=torch.float64))
    assert torch.equal(dp(x), model(x))
    _check_step(dp, model, x, y, 0.05)


def test_a_dtype_change_recaptures():
    model = _fresh(3).float()
    dp = bkfx.compile(model, max_grad_norm=0.05)
    dp(torch.randn(3, D))
    model.double()
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    _check_step(dp, model, x, y, 0.05)


class _Attributes(nn.Module):
    """A forward that reads plain attributes: a slice length, a scale, a dropout rate."""

    def __init__(self):
        super().__init__()
        self.fc, self.keep, self.scale = nn.Linear(D, 4), 3, 2.0
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc(x))[:, :self.keep] * self.scale


def test_a_changed_attribute_recaptures():
    """The capture bakes in the attributes the forward reads; changing one afterwards (a slice
    length, a scale, a dropout rate, a Hugging Face config flag) captures again instead of
    running the old values."""
    torch.manual_seed(6)
    model = _Attributes().double()
    dp = bkfx.compile(model, max_grad_norm=0.05)
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 2, (4,))
    for change in (lambda: setattr(model, "keep", 2), lambda: setattr(model, "scale", 5.0)):
        change()
        assert torch.equal(dp(x), model(x))
        _check_step(dp, model, x, y, 0.05)
    model.drop.p = 1.0  # everything dropped: the output is zero
    assert torch.equal(dp(x), torch.zeros(4, 2, dtype=torch.float64))
    assert dp.capture_count == 1  # each change recaptured (the count is since the last change)
    out = dp(x)
    model.keep = 1
    with pytest.raises(bkfx.BkfxError, match="attribute keep was 2, now 1"):
        dp(x)  # between a forward and its backward
    del out


def test_a_changed_hugging_face_config_flag_recaptures():
    import transformers
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8, num_labels=3)
    torch.manual_seed(7)
    model = transformers.BertForSequenceClassification(config).double().eval()
    dp = bkfx.compile(model)
    ids = torch.randint(0, 30, (3, 6))
    with torch.no_grad():
        assert dp(input_ids=ids).hidden_states is None
        model.config.output_hidden_states = True
        assert len(dp(input_ids=ids).hidden_states) == 2


def test_a_change_between_forward_and_backward_is_refused():
    model = _fresh(4)
    dp = bkfx.compile(model)
    x = torch.randn(4, D, dtype=torch.float64)
    out = dp(x)
    model[0].bias.requires_grad_(False)
    with pytest.raises(bkfx.BkfxError, match="between a forward call and its backward"):
        dp(x)
    del out


def test_a_change_that_no_longer_fits_the_clipping_groups_is_a_clear_error():
    model = _fresh(5)
    model[0].bias.requires_grad_(False)
    groups = [["0.weight"], ["2.weight", "2.bias"]]
    dp = bkfx.compile(model, style=groups, max_grad_norm=[1.0, 1.0])
    dp(torch.randn(3, D, dtype=torch.float64))
    model[0].bias.requires_grad_(True)
    with pytest.raises(bkfx.BkfxError, match="0.bias"):
        dp(torch.randn(3, D, dtype=torch.float64))


# ---- several forward calls before one backward ---------------------------------------------


def test_two_views_before_one_backward_are_joined_as_one_sample():
    model = _fresh(6)
    dp = bkfx.compile(model, max_grad_norm=0.1)
    B = 5
    x1, x2 = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(ps, a, b, t):  # sample i's loss: both of its views
        out = functional_call(model, ps, (torch.stack([a, b]),))
        return F.cross_entropy(out, torch.stack([t, t]), reduction="sum") / 2

    grads = vmap(grad(loss_of), in_dims=(None, 0, 0, 0))(params, x1, x2, y)
    expected, norms = clipped_sum_reference(grads, max_grad_norm=0.1)
    loss = (F.cross_entropy(dp(x1), y) + F.cross_entropy(dp(x2), y)) / 2
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(dp.per_sample_norms, norms, rtol=1e-9, atol=1e-12)


def test_gradient_accumulation_still_clips_each_backward_on_its_own():
    model = _fresh(7)
    dp = bkfx.compile(model, max_grad_norm=0.1, loss_reduction="sum")
    xs = [torch.randn(4, D, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 3, (4,)) for _ in range(2)]
    total = {}
    for x, y in zip(xs, ys):
        grads = per_sample_gradients(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x,), y)
        expected, _ = clipped_sum_reference(grads, max_grad_norm=0.1, loss_reduction="sum")
        total = {n: total.get(n, 0) + g for n, g in expected.items()}
    for x, y in zip(xs, ys):
        F.cross_entropy(dp(x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, total[name], rtol=1e-9, atol=1e-12, msg=name)


def test_calls_of_different_batch_sizes_in_one_backward_are_refused():
    model = _fresh(8)
    dp = bkfx.compile(model)
    a, b = dp(torch.randn(4, D, dtype=torch.float64)), dp(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(bkfx.BkfxError, match="another batch size"):
        (a.sum() + b.sum()).backward()


def test_outputs_kept_without_backward_do_not_leak_into_the_next_step():
    model = _fresh(9)
    dp = bkfx.compile(model, max_grad_norm=0.05)
    kept = dp(torch.randn(7, D, dtype=torch.float64))  # e.g. logged, never trained on
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    _check_step(dp, model, x, y, 0.05)
    del kept


# ---- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, [1.0, 0.0], "1"])
def test_bad_thresholds_are_refused_at_compile(bad):
    style = "param-wise" if isinstance(bad, list) else "all-layer"
    model = nn.Linear(D, 2) if isinstance(bad, list) else _fresh()
    with pytest.raises(ValueError, match="max_grad_norm"):
        bkfx.compile(model, max_grad_norm=bad, style=style)


def test_norm_mode_values_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="norm_mode values"):
        bkfx.compile(_fresh(), norm_mode={"0.weight": "fast"})
    dp = bkfx.compile(_fresh(), norm_mode={"0.wieght": "ghost"})
    with pytest.raises(ValueError, match=r"0\.wieght.*0\.weight"):
        dp(torch.randn(3, D, dtype=torch.float64))


@pytest.mark.parametrize("gamma", [0, -0.1, math.nan])
def test_bad_gamma_is_refused(gamma):
    with pytest.raises(ValueError, match="gamma"):
        bkfx.compile(_fresh(), clipping="automatic", gamma=gamma)


def test_dp_optimizer_finds_the_compiled_model_so_a_mean_loss_is_not_divided_twice():
    model = _fresh(10)
    dp = bkfx.compile(model, max_grad_norm=0.1, loss_reduction="mean")
    opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, expected_batch_size=4)
    assert dp.sum_clipped_gradients
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    grads = per_sample_gradients(model, F.cross_entropy, (x,), y)
    expected, _ = clipped_sum_reference(grads, max_grad_norm=0.1, loss_reduction="mean")  # (1/B) Σ C_i G_i
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(dp(x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-9, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="clips to"):
        bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=2.0,
                         expected_batch_size=4)


# ---- identity indexing: Hugging Face causal LMs with a padding mask --------------------------


def _causal_lms():
    import transformers
    V = 40
    common = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return V, {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **common)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=1, **common)),
        "gpt-neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common)),
    }


class PaddedLM(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _token_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "gpt-neox"])
def test_hf_causal_lms_with_a_padding_mask_match_the_reference(name):
    """HF builds the mask as `mask[arange(B)[:, None, None, None], kv_idx]`: identity indexing along
    the batch. The reference is one backward per sample (HF's mask code cannot run under vmap).
    Rotary models compute their angles in float32 on purpose, so even their plain gradients agree
    with the per-sample sum only to ~1e-7; the default float64 tolerance (1e-6) covers that."""
    V, lms = _causal_lms()
    torch.manual_seed(0)
    model = PaddedLM(lms[name]()).double()
    B, T = 3, 6
    ids, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    dp, _ = assert_matches_reference(model, _token_loss, (ids, mask), y, method="loop", max_grad_norm=0.5)
    assert dp.probed_operations == []  # every op had a sample rule


def test_embedding_max_norm_is_refused_for_its_true_reason():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, max_norm=1.0)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    message = refusal(Emb(), torch.randint(0, 10, (3, 5)))
    assert "max_norm" in message and "in place" in message


def test_a_parameter_resized_in_place_recaptures():
    model = _fresh(11)
    dp = bkfx.compile(model, max_grad_norm=0.05)
    dp(torch.randn(3, D, dtype=torch.float64))
    with torch.no_grad():
        model[2].weight.data = torch.randn(5, 8, dtype=torch.float64)  # a wider head, same Parameter object
        model[2].bias.data = torch.randn(5, dtype=torch.float64)
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 5, (4,))
    assert dp(x).shape == (4, 5)
    _check_step(dp, model, x, y, 0.05)


def test_torch_compile_of_a_compiled_model_gives_the_same_gradients():
    model = _fresh(12)
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    dp = bkfx.compile(model, max_grad_norm=0.05)
    _check_step(dp, model, x, y, 0.05)
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    step = torch.compile(lambda a, b: F.cross_entropy(dp(a), b), dynamic=True, backend="aot_eager")
    step(x, y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-12, atol=1e-15, msg=name)
    compiled_model = torch.compile(dp, dynamic=True, backend="aot_eager")  # dynamo, not inductor: CI time
    model.zero_grad(set_to_none=True)
    F.cross_entropy(compiled_model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-12, atol=1e-15, msg=name)
