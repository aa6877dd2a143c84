"""The per-sample reference bkfx is checked against, for tests and for users' own models.

`per_sample_gradients` is `vmap(grad(loss of one sample))` over the batch with
`torch.func.functional_call`: a few lines that are obviously right. Models that vmap
cannot run (data-dependent Python in the forward) use `method="loop"`: one ordinary
backward per sample.
"""
from __future__ import annotations

import torch
from bkfx._torch import pytree
from torch.func import functional_call, grad, vmap

__all__ = ["per_sample_gradients", "clip_factors", "clipped_sum_reference", "assert_matches_reference"]


def per_sample_gradients(
    model, loss_fn, inputs, targets, *, method: str = "vmap", batch_dim: int = 0,
) -> dict[str, torch.Tensor]:
    """`{name: [B, *param.shape]}`: the gradient of each sample's loss, computed on that sample alone.

    `inputs` is a tensor or a tuple of tensors batched on dim `batch_dim` (targets on dim 0);
    `loss_fn(output, target)` reduces the way the compiled model declares (its value on a
    batch of one is sample i's loss).
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_of(params, xs, y):
        out = functional_call(model, (params, buffers), tuple(x.unsqueeze(batch_dim) for x in xs))
        return loss_fn(out, y.unsqueeze(0))

    if method == "vmap":
        try:
            return vmap(grad(loss_of), in_dims=(None, batch_dim, 0), randomness="same")(params, inputs, targets)
        except RuntimeError as e:  # modules vmap cannot batch (nn.LSTM/GRU/RNN, data-dependent Python)
            raise RuntimeError(
                f"the vmap reference cannot run this model ({str(e).splitlines()[0]}); "
                "use method='loop' (one ordinary backward per sample)"
            ) from e
    if method != "loop":
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")
    rows = []
    for i in range(targets.shape[0]):
        live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        loss = loss_of(live, tuple(x.select(batch_dim, i) for x in inputs), targets[i])
        rows.append(dict(zip(live, torch.autograd.grad(loss, list(live.values()), allow_unused=True))))
    return {n: torch.stack([r[n] if r[n] is not None else torch.zeros_like(params[n]) for r in rows]) for n in params}


def clip_factors(norms: torch.Tensor, max_grad_norm: float, clipping: str, gamma: float = 0.01) -> torch.Tensor:
    """Abadi `min(1, R/‖G_i‖)` or automatic `R/(‖G_i‖+γ)`, written out independently of bkfx._runtime.clipping."""
    if clipping == "abadi":
        return torch.where(norms > max_grad_norm, max_grad_norm / norms, torch.ones_like(norms))
    return max_grad_norm / (norms + gamma)


def clipped_sum_reference(
    grads: dict[str, torch.Tensor], *, max_grad_norm=1.0, clipping="abadi", loss_reduction="mean",
    groups: list[list[str]] | None = None, gamma: float = 0.01,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What `.grad` must hold after one backward, and the per-sample norms over all parameters.

    `Σ_i C_i G_i` (sum) or `(1/B) Σ_i C_i G_i` (mean), with `C_i` computed per group from
    the group's per-sample norm.
    """
    out, total, _ = _clipped(grads, max_grad_norm, clipping, loss_reduction, groups, gamma)
    return out, total


def _clipped(grads, max_grad_norm, clipping, loss_reduction, groups, gamma):
    """The clipped sums, the per-sample norms, and the largest entry of any one summand `C_i G_i`."""
    names = list(grads)
    groups = groups or [names]
    R = max_grad_norm if isinstance(max_grad_norm, (list, tuple)) else [max_grad_norm] * len(groups)
    first = next(iter(grads.values()))
    B = first.shape[0]
    out, total, term = {}, first.new_zeros(B), 0.0  # on the gradients' device and dtype
    for group, r in zip(groups, R):
        sq = sum((grads[n].reshape(B, -1).pow(2).sum(1) if B else total.new_zeros(0)
                  for n in group if n in grads), torch.zeros_like(total))
        total = total + sq
        c = clip_factors(sq.sqrt(), r, clipping, gamma)
        for n in group:
            if n in grads:
                s = torch.einsum("b,b...->...", c, grads[n])
                out[n] = s / B if loss_reduction == "mean" else s
                if B and grads[n].numel():
                    terms = (c.reshape(B, *[1] * (grads[n].dim() - 1)) * grads[n]).abs().max().item()
                    term = max(term, terms / B if loss_reduction == "mean" else terms)
    return out, total.sqrt(), term


def assert_matches_reference(
    model, loss_fn, inputs, targets, *, rtol: float | None = None, atol: float | None = None,
    method: str = "vmap", step: dict | None = None, torch_compile: dict | None = None, **compile_options,
):
    """Compile `model` with `compile_options`, run one backward, and compare `.grad` and the
    per-sample norms with the reference. Returns the compiled model and the worst relative
    error per parameter.

    A parameter's error is `max|grad - reference|` over the largest reference entry of that
    parameter. Rounding error scales with the summands `C_i G_i`, not with their sum: when
    clipped terms cancel (two samples with opposite gradients clipped to the same norm),
    the result is rounding noise. So the denominator is never below 1e-6 (float64) or 1e-3
    (float32) of the largest entry of any one summand. Tolerance: 1e-6 (float64) or 1e-4
    (float32) unless given. `step`: run the compiled BK step, `dp.compile(**step)` (e.g.
    `{"backend": "inductor"}`), rather than the eager one. `torch_compile`: run the forward and
    the loss as one function under `torch.compile(**torch_compile)` (e.g. `{"fullgraph": True,
    "dynamic": True}`), the DP model inside it as bkfx's operator (`bkfx._runtime.dynamo_op`).
    """
    import bkfx

    inputs_t = inputs if isinstance(inputs, tuple) else (inputs,)
    dtype = next(model.parameters()).dtype
    tol = rtol if rtol is not None else (1e-6 if dtype == torch.float64 else 1e-4)
    reduction = compile_options.get("loss_reduction", "mean")
    dp = bkfx.compile(model, **compile_options)
    if step is not None:
        dp.compile(**step)
    with torch.no_grad():
        dp(*inputs_t)  # capture first: a model bkfx refuses raises its bkfx error, not the reference's
    batch_dim = compile_options.get("batch_dim", 0)
    if not isinstance(batch_dim, int):
        raise ValueError("assert_matches_reference takes one batch_dim for every input (an int)")
    ref_grads = per_sample_gradients(model, loss_fn, inputs_t, targets, method=method, batch_dim=batch_dim)
    groups = dp.clip_groups
    expected, norms, term = _clipped(
        ref_grads, compile_options.get("max_grad_norm", 1.0), compile_options.get("clipping", "abadi"), reduction,
        groups, compile_options.get("gamma", 0.01),
    )
    for p in model.parameters():
        p.grad = None
    if torch_compile is None:
        loss = loss_fn(dp(*inputs_t), targets)
    else:
        loss = torch.compile(lambda xs, ys: loss_fn(dp(*xs), ys), **torch_compile)(inputs_t, targets)
    loss.backward()
    errors = {}
    floor = (1e-6 if dtype == torch.float64 else 1e-3) * term
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
            continue
        want = expected[name]
        got = p.grad if p.grad is not None else torch.zeros_like(want)
        diff = (got - want).abs().max().item() if want.numel() else 0.0
        errors[name] = err = diff / (max(want.abs().max().item() if want.numel() else 0.0, floor) or 1.0)
        assert err <= tol or (atol is not None and diff <= atol), f"{name}: relative error {err:.3g} > {tol:g}"
    got_norms = dp.per_sample_norms
    nerr = ((got_norms - norms).abs().max() / norms.abs().max().clamp_min(1e-30)).item() if norms.numel() else 0.0
    assert nerr <= tol, f"per-sample norms: relative error {nerr:.3g} > {tol:g}"
    return dp, errors
