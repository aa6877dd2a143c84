"""Per-sample gradients in factored and explicit form, and everything computed from them.

A *piece* is one site's contribution to one parameter's per-sample gradient:

- `Factored(L, R)`: `G_i = L_iᵀ R_i`, reshaped to the parameter, with `L_i: [T, m]`,
  `R_i: [T, n]` and `(m, n)` the parameter's canonical matrix shape
  (`(shape[0], prod(shape[1:]))`, or `(numel, 1)` for a vector).
- `Explicit(G)`: `G` of shape `[B, *param.shape]`.

Norms, cross terms of tied parameters and the clipped sum are written here once, for
every rule:

- `⟨L1ᵀR1, L2ᵀR2⟩_i = Σ_{t,s} (L1 L2ᵀ)_{ts} (R1 R2ᵀ)_{ts}`  (ghost norm, cross terms)
- `⟨L1ᵀR1, G_i⟩ = Σ_t (L1 G_i)_t · R1_t`
- `Σ_i C_i L_iᵀ R_i = (C ⊙ L)ᵀ R`  (book-kept clipped sum: one matmul)

Under autocast the two factors of a piece may differ in dtype (a float32 activation, a
bf16 output gradient); each product casts them as `bkfx.rules.precision` says (clipped sums in
the op's low precision, Grams written in float32 where the device's GEMM can (else bf16
or float32), every per-sample inner product accumulated in at least float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bkfx._torch import is_fake
from bkfx.rules.precision import accumulation_dtype, as_dtype, compute_dtype, gram_dtype, gram_matmul

__all__ = ["Dense", "OneHot", "Factor", "canonical_matrix", "gram", "per_sample", "clipped_sum",
    "tensor_key", "ScaledCache", "left_apply", "Factored", "Explicit", "Piece", "GramCache", "gram_blocks",
    "gram_block_count", "self_inner", "inner", "rowdot", "weighted_sum"]


@dataclass
class Dense:
    """A factor held as a tensor `[B, T, k]`."""

    t: torch.Tensor

    @property
    def width(self) -> int:
        return self.t.shape[2]


@dataclass
class OneHot:
    """The factor `onehot(idx)`: `[B, T, size]`, never materialised; `mask` zeroes positions."""

    idx: torch.Tensor  # [B, T] long
    size: int
    mask: torch.Tensor | None = None  # [B, T] bool, False where the row gets no gradient

    @property
    def width(self) -> int:
        return self.size


Factor = Dense | OneHot


def canonical_matrix(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    n = 1
    for s in shape[1:]:
        n *= s
    return shape[0], n


def gram(a: Factor, b: Factor) -> torch.Tensor:
    """`A_i B_iᵀ` for every sample: `[B, T_a, T_b]`, by `gram_matmul` in the factors' `compute_dtype`."""
    if isinstance(a, Dense) and isinstance(b, Dense):
        dtype = compute_dtype(a.t.dtype, b.t.dtype)
        left = as_dtype(a.t, dtype)
        right = left if b is a else as_dtype(b.t, dtype)
        return gram_matmul(left, right.transpose(1, 2))
    if isinstance(a, OneHot) and isinstance(b, OneHot):
        return _apply_masks(a.idx[:, :, None] == b.idx[:, None, :], a, b)  # bool; promotes when multiplied
    if isinstance(a, Dense):
        return gram(b, a).transpose(1, 2)
    # OneHot · Denseᵀ: row t of onehot picks column idx_t of b
    picked = torch.gather(b.t, 2, a.idx[:, None, :].expand(-1, b.t.shape[1], -1))  # [B, T_b, T_a]
    return _apply_masks(as_dtype(picked, gram_dtype(picked.dtype)).transpose(1, 2), a, None)


def _apply_masks(g: torch.Tensor, a, b) -> torch.Tensor:
    if isinstance(a, OneHot) and a.mask is not None:
        g = g * a.mask[:, :, None]
    if isinstance(b, OneHot) and b.mask is not None:
        g = g * b.mask[:, None, :]
    return g


def per_sample(L: Factor, R: Dense) -> torch.Tensor:
    """`L_iᵀ R_i` for every sample: `[B, m, n]` (in the factors' `compute_dtype`)."""
    if isinstance(L, Dense):
        dtype = compute_dtype(L.t.dtype, R.t.dtype)
        return torch.bmm(as_dtype(L.t, dtype).transpose(1, 2), as_dtype(R.t, dtype))
    B, _, n = R.t.shape
    rows = R.t if L.mask is None else R.t * L.mask[:, :, None]
    out = R.t.new_zeros(B, L.size, n)
    return out.scatter_add_(1, L.idx[:, :, None].expand(-1, -1, n), rows)


def clipped_sum(L: Factor, R: Dense, c: torch.Tensor, scaled=None) -> torch.Tensor:
    """`Σ_i c_i L_iᵀ R_i = (c ⊙ L)ᵀ R`: `[m, n]`, one matmul (or one index_add).

    The clip factors scale whichever dense factor is narrower (fewer entries to touch), or
    at equal widths the one `scaled` (a `ScaledCache`) already holds, so the q, k and v
    projections of one input scale it once. The matmul runs in the factors' `compute_dtype`
    (under autocast the op's dtype: the precision of autocast's own weight gradient); `c`
    is applied in the dtype of the factor it scales."""
    scale = scaled if scaled is not None else (lambda t, c: t * c)
    n = R.t.shape[2]
    c = c[:, None, None]
    if isinstance(L, Dense):
        dtype = compute_dtype(L.t.dtype, R.t.dtype)
        if L.width < n or (L.width == n and scaled is not None and L.t in scaled):
            left, right = scale(L.t, as_dtype(c, L.t.dtype)), R.t
        else:
            left, right = L.t, scale(R.t, as_dtype(c, R.t.dtype))
        return as_dtype(left, dtype).reshape(-1, L.width).transpose(0, 1) @ as_dtype(right, dtype).reshape(-1, n)
    scaled_rows = scale(R.t, as_dtype(c, R.t.dtype))
    if L.mask is not None:
        scaled_rows = scaled_rows * L.mask[:, :, None]
    return R.t.new_zeros(L.size, n).index_add_(0, L.idx.reshape(-1), scaled_rows.reshape(-1, n))


def tensor_key(t: torch.Tensor):
    """What identifies a tensor's values in a cache key: storage, shape, strides and dtype (views
    of one tensor made by different sites are the same values). A traced tensor (the compiled
    step's trace, `bkfx._runtime.step`) has no storage and may have symbolic sizes: the tensor object
    itself (views are then different keys; the compiled program's CSE may still merge them)."""
    if is_fake(t):
        return "traced", id(t)
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


class _Recent:
    """The last `capacity` values computed for keys made of tensors' storage, shape and strides.
    Each entry holds the tensors its key names, so their storage cannot be reused (and a key
    come to mean other values) while the entry lives."""

    def __init__(self, capacity: int):
        self.capacity, self._items = capacity, {}  # key -> (value, tensors held), oldest first

    def __contains__(self, key) -> bool:
        return key in self._items

    def get(self, key, compute, hold):
        hit = self._items.pop(key, None)
        if hit is None:
            hit = (compute(), hold)
            while len(self._items) >= self.capacity:
                self._items.pop(next(iter(self._items)))
        self._items[key] = hit
        return hit[0]


class ScaledCache:
    """`t * c` for the last few factors `t` of one group's clipped sums (one `c`). Views of one
    tensor made by different sites are the same factor: the key is storage, shape and strides."""

    def __init__(self, capacity: int = 2):
        self._recent = _Recent(capacity)

    @staticmethod
    def _key(t: torch.Tensor):
        return tensor_key(t)

    def __contains__(self, t: torch.Tensor) -> bool:
        return self._key(t) in self._recent

    def __call__(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._recent.get(self._key(t), lambda: t * c, t)


def left_apply(L: Factor, G: torch.Tensor) -> torch.Tensor:
    """`L_i G_i` for every sample, with `G: [B, m, n]`: `[B, T, n]` (a product of two
    gradient-like factors: by `gram_matmul`)."""
    if isinstance(L, Dense):
        dtype = compute_dtype(L.t.dtype, G.dtype)
        return gram_matmul(as_dtype(L.t, dtype), as_dtype(G, dtype))
    out = torch.gather(G, 1, L.idx[:, :, None].expand(-1, -1, G.shape[2]))
    return out if L.mask is None else out * L.mask[:, :, None]


@dataclass
class Factored:
    L: Factor
    R: Dense

    def materialise(self, shape: torch.Size) -> "Explicit":
        G = per_sample(self.L, self.R)
        return Explicit(G.reshape(G.shape[0], *shape))


@dataclass
class Explicit:
    G: torch.Tensor  # [B, *param.shape]


Piece = Factored | Explicit


class GramCache:
    """Gram matrices shared between sites: the q, k and v projections of one input need its
    `a aᵀ` once. Keeps the last `capacity` Grams."""

    def __init__(self, capacity: int = 4):
        self._recent = _Recent(capacity)

    @staticmethod
    def _key(f: Factor):
        t = f.t if isinstance(f, Dense) else f.idx
        return (type(f), tensor_key(t), str(getattr(f, "size", None)),
                None if not isinstance(f, OneHot) or f.mask is None else tensor_key(f.mask))

    def __call__(self, a: Factor, b: Factor) -> torch.Tensor:
        return self._recent.get((self._key(a), self._key(b)), lambda: gram(a, b), (a, b))

    def blocks(self, x: Dense, n: int) -> list[torch.Tensor]:
        return self._recent.get((self._key(x), n), lambda: gram_blocks(x, n), x)


def gram_blocks(x: Dense, n: int) -> list[torch.Tensor]:
    """The lower triangle of `x_i x_iᵀ` in `n × n` blocks of positions: `x_j x_kᵀ` for j >= k,
    row by row (a symmetric Gram in `(n+1)/2n` of the work), by `gram_matmul`."""
    parts = x.t.tensor_split(n, dim=1)
    return [gram_matmul(parts[j], parts[k].transpose(1, 2)) for j in range(n) for k in range(j + 1)]


def gram_block_count(T: int, device: torch.device) -> int:
    """How many position blocks a self-inner product uses. On the CPU blocks of at least 64
    positions (smaller matmuls lose more speed than the symmetry saves), at most 4. On a GPU
    one bmm per Gram: a block is too small to fill the device (GPT-2 124M at T = 512 ran
    980 tiny bmms per step, 63 ms on an H100, where the whole Grams cost a fraction)."""
    if device.type != "cpu":
        return 1
    return max(1, min(4, T // 64))


def self_inner(a: Factored, grams=None) -> torch.Tensor:
    """`‖L_iᵀ R_i‖²` for Dense factors: `⟨L Lᵀ, R Rᵀ⟩` over the Grams' lower triangles, the
    off-diagonal blocks counted twice."""
    n = gram_block_count(a.L.t.shape[1], a.L.t.device)
    left = grams.blocks(a.L, n) if grams is not None else gram_blocks(a.L, n)
    right = grams.blocks(a.R, n) if grams is not None else gram_blocks(a.R, n)
    total, i = None, 0
    for j in range(n):
        for k in range(j + 1):
            term = rowdot(left[i], right[i]) * (1 if j == k else 2)
            total = term if total is None else total + term
            i += 1
    return total


def inner(a: Piece, b: Piece, shape: torch.Size, grams=gram) -> torch.Tensor:
    """`⟨G_i^a, G_i^b⟩` for every sample: `[B]`, accumulated in at least float32."""
    if isinstance(a, Explicit) and isinstance(b, Explicit):
        return rowdot(a.G, b.G)
    if isinstance(a, Explicit):
        a, b = b, a
    if isinstance(b, Explicit):
        m, n = canonical_matrix(shape)
        G = b.G.reshape(b.G.shape[0], m, n)
        return rowdot(left_apply(a.L, G), a.R.t)
    if isinstance(a.L, Dense) and isinstance(b.L, Dense) and a.L.t.shape[1] == 1 and b.L.t.shape[1] == 1:
        # T = 1: the Gram matrices are scalars
        return rowdot(a.L.t, b.L.t) * rowdot(a.R.t, b.R.t)
    if a is b and isinstance(a.L, Dense) and gram_block_count(a.L.t.shape[1], a.L.t.device) > 1:
        return self_inner(a, grams if isinstance(grams, GramCache) else None)
    left, right = grams(a.L, b.L), grams(a.R, b.R)
    return rowdot(left if left.dtype != torch.bool else left.to(right.dtype), right)


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`Σ_j x_ij y_ij` per sample in one kernel: `[B]`, in `accumulation_dtype` (bf16/fp16
    operands are upcast: the sum of many rounded products would lose the small terms)."""
    dtype = accumulation_dtype(torch.promote_types(x.dtype, y.dtype))
    same = y is x
    x = as_dtype(_per_row(x), dtype)
    return torch.linalg.vecdot(x, x if same else as_dtype(_per_row(y), dtype))


def _per_row(x: torch.Tensor) -> torch.Tensor:
    """`[B, -1]`, also for B = 0 and for scalar parameters (`[B]`)."""
    return x.unsqueeze(1) if x.dim() == 1 else x.flatten(1)


def weighted_sum(piece: Piece, c: torch.Tensor, shape: torch.Size, scaled=None) -> torch.Tensor:
    """`Σ_i c_i G_i`, shaped like the parameter."""
    if isinstance(piece, Explicit):
        return torch.tensordot(c.to(piece.G.dtype), piece.G, dims=1)
    return clipped_sum(piece.L, piece.R, c, scaled).reshape(shape)
