"""Mixed precision: which dtype each part of the BK backward computes in, and autocast's state.

Under `torch.autocast` a site's op runs in the autocast dtype (bf16/fp16) while its
saved input may be float32 (a LayerNorm output feeding a linear layer), so the two
factors of one piece can differ in dtype. bkfx's rule:

- **Products of one output gradient with one activation** (the book-kept clipped sum
  `(C ⊙ L)ᵀ R`, explicit per-sample gradients `L_iᵀ R_i`) run in the lower of the
  factors' precisions — the dtype autocast ran the op in, so the clipped sum has the
  precision of autocast's own weight gradient (GEMMs accumulate in float32 and round once).
- **Norm computations** (Gram matrices `L Lᵀ`, `R Rᵀ`, `L_i G_i`) multiply two gradient-like
  factors. Where the device has a GEMM of bf16/fp16 inputs with a float32 output (CUDA:
  `torch.bmm(..., out_dtype=torch.float32)`, torch >= 2.8), a Gram runs at the factors'
  precision and is written in float32: nothing is rounded to 8 or 11 bits, fp16's range
  cannot overflow, and the inner product reads it without an upcast copy (`gram_matmul`).
  Elsewhere (the CPU) bf16 Grams stay bf16 (float32's range; one rounding per entry, errors
  independent across the `T²` entries), and fp16 Grams are computed in float32: with a
  `GradScaler` the output gradients carry the loss scale S, their Grams S², which
  overflows fp16's 65504.
- **Every per-sample inner product, norm and clip factor** is accumulated in at least
  float32 (`accumulation_dtype`); `.grad` is written in the parameter's dtype.

The rules re-run forward computations (a normalisation's `x̂`, the fallback's vjp) under
the autocast state the forward had (`AutocastState`), so they see the dtypes the forward
saw; the ledger's own arithmetic runs with autocast off and the dtypes chosen above.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["LOW_PRECISION", "AUTOCAST_DEVICES", "compute_dtype", "gram_dtype", "gram_matmul",
    "accumulation_dtype", "as_dtype", "AutocastState", "NO_AUTOCAST", "loss_scale"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
AUTOCAST_DEVICES = ("cpu", "cuda")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a product of factors of these dtypes runs in: the lowest precision among
    them (autocast's choice for the op), else their promotion."""
    for low in LOW_PRECISION:
        if low in dtypes:
            return low
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a Gram (product of two gradient-like factors): float32 for fp16 (range), else `dtype`."""
    return torch.float32 if dtype == torch.float16 else dtype


_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()  # torch >= 2.8
_NO_FLOAT32_OUTPUT = {"cpu"}  # device types without a float32-output bf16/fp16 bmm


def gram_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x @ y` (batched) for a norm computation, `x` and `y` of one dtype: a bf16/fp16 GEMM with
    a float32 output where the device has one (float32 accumulation, entries not rounded),
    else in `gram_dtype`."""
    if _BMM_OUT_DTYPE and x.dtype in LOW_PRECISION and x.device.type not in _NO_FLOAT32_OUTPUT:
        try:
            return torch.bmm(x, y, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # no such kernel on this device (NotImplementedError is a RuntimeError)
            _NO_FLOAT32_OUTPUT.add(x.device.type)
    dtype = gram_dtype(x.dtype)
    return torch.bmm(as_dtype(x, dtype), as_dtype(y, dtype))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and clip factors: at least float32 (float64 stays float64)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(frozen=True)
class AutocastState:
    """`(device type, dtype)` for every device type on which autocast was enabled."""

    enabled: tuple = ()

    @staticmethod
    def current() -> "AutocastState":
        return AutocastState(tuple(
            (d, torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d)
        ))

    def apply(self):
        """Run a block under exactly this state (autocast off on every other device type). A
        no-op context when that is already the state (the common case in a backward pass
        called outside autocast), since entering autocast costs tens of microseconds a site."""
        on = dict(self.enabled)
        for d in AUTOCAST_DEVICES:
            enabled = torch.is_autocast_enabled(d)
            if enabled != (d in on) or (enabled and torch.get_autocast_dtype(d) != on[d]):
                return self._entered(on)
        return contextlib.nullcontext()

    @staticmethod
    @contextlib.contextmanager
    def _entered(on: dict):
        with contextlib.ExitStack() as stack:
            for d in AUTOCAST_DEVICES:
                if d in on:
                    stack.enter_context(torch.autocast(d, dtype=on[d]))
                elif torch.is_autocast_enabled(d):
                    stack.enter_context(torch.autocast(d, enabled=False))
            yield


NO_AUTOCAST = AutocastState()


def loss_scale(scaler, device: torch.device) -> torch.Tensor | None:
    """The loss scale S a `torch.amp.GradScaler` multiplied the loss by (a tensor, read
    without a host sync), or None when there is no enabled scaler or it has not scaled yet."""
    if scaler is None or not scaler.is_enabled():
        return None
    get = getattr(scaler, "_get_scale_async", None)
    scale = get() if get is not None else getattr(scaler, "_scale", None)
    if scale is None:
        return None
    return scale.to(device=device, dtype=torch.float32)
