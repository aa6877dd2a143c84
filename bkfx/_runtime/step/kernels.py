"""Stage 1 of the compiled BK step, the joint trace: what the trace runs so that it keeps the batch
size symbolic. `symbolic_kernels` swaps in batching rules for the backward ops of indexing that
read no concrete batch size; `decompositions` is inductor's table, so that the programs are the
ATen graphs inductor expects."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from bkfx._torch import inductor_decompositions


@contextlib.contextmanager
def symbolic_kernels():
    """While bkfx traces: `vmap` batching rules that keep the batch size symbolic for the
    backward ops of indexing (`embedding_dense_backward`, `index_add`, `slice_backward`,
    `index_select`).

    The ledger pulls a site's per-sample pieces back through a general chain of parameter ops
    with `vmap` (`Ledger._to_params`: GPT-2's position embedding, a sliced or indexed
    parameter). torch's C++ batching rules of these backward ops read the batch size as an
    integer, so the trace would hold only for the batch size it was made at (one trace per batch
    size). These rules (registered for the `FuncTorchBatched` key during the trace only, as
    functorch registers its own Python decompositions) compute the same values from ops whose
    batching rules keep it symbolic: zeros and `index_put` (accumulating), `pad`, `index`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": for the trace only
        library = torch.library.Library("aten", "IMPL", "FuncTorchBatched")
        library.impl(torch.ops.aten.embedding_dense_backward.default, _embedding_dense_backward)
        library.impl(torch.ops.aten.index_add.default, _index_add)
        library.impl(torch.ops.aten.slice_backward.default, _slice_backward)
        library.impl(torch.ops.aten.index_select.default, _index_select)
    try:
        yield
    finally:
        library._destroy()  # torch's own kernels again


def _embedding_dense_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    if scale_grad_by_freq:  # refused by bkfx's embedding rule; torch's own decomposition otherwise
        from bkfx._torch import decomposition_table

        return decomposition_table[torch.ops.aten.embedding_dense_backward.default](
            grad, indices, num_weights, padding_idx, scale_grad_by_freq)
    rows = grad.reshape(-1, grad.shape[-1])
    flat = indices.reshape(-1)
    if padding_idx >= 0:
        rows = rows * (flat != padding_idx).unsqueeze(-1).to(rows.dtype)
    return torch.ops.aten.index_put(_fresh_zeros(rows, [num_weights, grad.shape[-1]]), [flat], rows, True)


def _index_add(self, dim, index, source, alpha=1):
    dim = dim % max(self.dim(), 1)
    return torch.ops.aten.index_put(self + _fresh_zeros(source, self.shape), [None] * dim + [index.reshape(-1)],
                                    source * alpha if alpha != 1 else source, True)


def _slice_backward(grad, input_sizes, dim, start, end, step):
    dim = dim % len(input_sizes)
    size = input_sizes[dim]
    start, end = (0 if start is None else start), (size if end is None else end)
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    start = max(0, min(start, size))
    end = max(start, min(end, size))
    if step != 1:
        index = torch.arange(start, end, step, device=grad.device)
        return torch.ops.aten.index_put(_fresh_zeros(grad, input_sizes), [None] * dim + [index], grad)
    # zeros on both sides of the slice: a pad of the batched gradient (`cat` with unbatched zeros
    # reads the batch size)
    return torch.nn.functional.pad(grad, [0, 0] * (len(input_sizes) - 1 - dim) + [start, size - end])


def _index_select(self, dim, index):
    dim = dim % max(self.dim(), 1)
    return torch.ops.aten.index(self, [None] * dim + [index.reshape(-1)])


def _fresh_zeros(like, sizes):
    """Zeros of one sample's `sizes` for every sample of `like`'s batch, each in memory of its own.

    Made from `like` (a batched tensor), not by a factory: `new_zeros` of a batched tensor reads
    its concrete batch size, and a factory's unbatched zeros would be expanded over the batch by
    `index_put`'s batching rule: one row of memory for every sample, which inductor's in-place
    accumulation then sums over the samples."""
    count = math.prod(sizes)
    if like.numel() == 0 or count == 0:
        return torch.zeros(sizes, dtype=like.dtype, device=like.device)
    seed = torch.zeros_like(like).reshape(-1)[:1]  # one zero per sample
    return torch.nn.functional.pad(seed, [0, count - 1]).reshape(sizes)


def decompositions() -> dict:
    """The decompositions torch.compile traces with (inductor's table), so that the programs are
    the ATen graphs inductor expects. (Composite ops such as `matmul` run their Python forms,
    which keep the batch size symbolic, through the python dispatcher `build` enables, not
    through this table.)"""

    return inductor_decompositions()
