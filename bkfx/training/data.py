"""Poisson sampling and physical batches: the data side of DP-SGD.

DP-SGD's privacy analysis (the Poisson subsampled Gaussian, `bkfx.training.accounting`) assumes
that every logical batch includes each of the N examples independently with
probability q. Batch sizes are then random, `Binomial(N, q)`, with mean `q N` and 0
possible; an epoch is `round(1/q)` such steps. Shuffling into fixed-size batches is a
different mechanism with a different (and, for the usual accounting, unproven) guarantee.

A logical batch larger than memory allows is split into physical batches; the model
adds each one's clipped sum to `.grad` and the optimizer steps once per logical batch.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from bkfx._torch import pin_batch
from bkfx.training.accounting import check_sample_rate, truncation_probability

__all__ = ["PoissonSampler", "EmptyBatchCollate", "Padding", "current_padding", "padded", "PaddedCollate",
    "poisson_loader", "PoissonLoader", "batch_size_of", "check_physical_batch_size",
    "split_physical_batches", "PhysicalBatches", "UserSampler", "UserCollate"]


class PoissonSampler(Sampler):
    """Batch sampler over `range(num_samples)`: each step's batch holds each index with probability q.

    Yields `steps` lists of indices (default `round(1/q)`, one epoch), possibly empty.
    Iterating again draws a new epoch from the same generator, so a seeded sampler
    gives the same sequence of batches run after run. A pass stopped before the end of its
    epoch is continued by the next one: an epoch is always `steps` batches.

    `state_dict()` is the position in that sequence: the generator's state at the start of
    the current epoch, the epoch's index (`epoch`) and the batches of it delivered so far
    (`batches_done`); after `load_state_dict` the next pass redraws the epoch from its start
    and yields the batches not yet delivered. Batches count as delivered when the sampler
    yields them, or, under `poisson_loader` (whose workers may draw batches ahead), when the
    loader yields them to the training loop.

    Data parallel: with `rank=` and `world_size=` (and the same `seed=` on every rank), every
    rank draws the same global batch of the whole dataset, each example with probability q,
    and yields only its shard, the indices i with `i % world_size == rank` (which may be empty).
    The union of the ranks' batches is the single-process sampler's batch with that seed, so
    the accounting is unchanged, and `expected_batch_size` stays the global `q N` that
    `DPOptimizer` divides the all-reduced sum by.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, *, steps: int | None = None,
        generator: torch.Generator | None = None, seed: int | None = None,
        rank: int | None = None, world_size: int | None = None, max_batch_size: int | None = None,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        check_sample_rate(sample_rate)
        if generator is not None and seed is not None:
            raise ValueError("pass either generator= or seed=, not both")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank= and world_size= (a sharded sampler), or neither")
        if world_size is not None:
            if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
                raise ValueError(f"world_size must be a positive int, got {world_size!r}")
            if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
                raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
            if world_size > 1 and generator is None and seed is None:
                raise ValueError("a sharded sampler needs the same seed= (or generator state) on every rank, so that "
                                 "the ranks draw the same global batch; pass seed=")
        self.rank = 0 if rank is None else rank
        self.world_size = 1 if world_size is None else world_size
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = max(1, round(1 / self.sample_rate)) if steps is None else steps
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool)
                                           or max_batch_size <= 0):
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.max_batch_size = max_batch_size  # truncated Poisson sampling: see `truncate`
        if generator is None:
            generator = torch.Generator()
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        self.generator = generator
        self.epoch = 0  # the epoch in progress, or the next one
        self.batches_done = 0  # batches of that epoch delivered
        self._epoch_start = None  # the generator's state when the epoch in progress began (None: none is)
        self.counted_by_loader = False  # True under a PoissonLoader, which counts the batches the loop receives

    @property
    def expected_batch_size(self) -> float:
        """`q N`, the mean batch size (what the DP optimizer divides the noisy sum by); sharded, the
        global one, over all ranks."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        if self._epoch_start is None:
            self._epoch_start = self.generator.get_state()
            self.batches_done = 0
        else:  # continue the epoch in progress: redraw its delivered batches from its start
            self.generator.set_state(self._epoch_start)
        return self._batches(self.batches_done)

    def _batches(self, skip: int) -> Iterator[list[int]]:
        for k in range(self.steps):
            included = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            batch = self._select(included.nonzero().flatten())  # its draws too are redrawn for skipped batches
            if k < skip:
                continue
            if not self.counted_by_loader:
                self.delivered(k + 1)
            yield batch

    def _select(self, indices: torch.Tensor) -> list[int]:
        """The batch of the Poisson-drawn `indices`: truncated, this rank's shard."""
        indices = self.truncate(indices)
        if self.world_size > 1:
            indices = indices[indices % self.world_size == self.rank]
        return indices.tolist()

    def truncate(self, indices: torch.Tensor) -> torch.Tensor:
        """Truncated Poisson sampling: a batch of more than `max_batch_size` (M) indices becomes a
        uniformly random subset of M of them (drawn from the sampler's generator, so every rank of a
        sharded sampler keeps the same one), in index order; smaller batches are kept whole."""
        if self.max_batch_size is None or indices.numel() <= self.max_batch_size:
            return indices
        keep = torch.randperm(indices.numel(), generator=self.generator)[:self.max_batch_size]
        return indices[keep.sort().values]

    @property
    def truncation_probability(self) -> float:
        """The probability that one step's batch is truncated, for the worst neighbouring dataset
        (one example more): `P[Binomial(N + 1, q) > M]`; 0 without `max_batch_size`."""
        if self.max_batch_size is None:
            return 0.0
        return truncation_probability(self.num_samples + 1, self.sample_rate, self.max_batch_size)

    def delivered(self, batches_done: int) -> None:
        """Record that `batches_done` batches of the current epoch have been delivered; after the
        last one the epoch is over (the generator has drawn exactly its batches) and the next pass
        starts the next epoch."""
        self.batches_done = batches_done
        if batches_done >= self.steps:
            self.epoch += 1
            self.batches_done = 0
            self._epoch_start = None

    def state_dict(self) -> dict:
        """The position: the current epoch's starting generator state, `epoch`, `batches_done` (and
        the sampling's parameters, which a resumed run must share)."""
        start = self.generator.get_state() if self._epoch_start is None else self._epoch_start
        return {"generator": start, "epoch": self.epoch, "batches_done": self.batches_done,
                "num_samples": self.num_samples, "sample_rate": self.sample_rate, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        saved = (state["num_samples"], state["sample_rate"], state["steps"])
        if saved != (self.num_samples, self.sample_rate, self.steps):
            raise ValueError(
                f"the sampler state is of {saved[0]} examples at sample rate {saved[1]} with {saved[2]} steps per epoch, "
                f"this sampler has {self.num_samples}, {self.sample_rate}, {self.steps}: resume with the same dataset "
                "and sample rate (the privacy accounting depends on them)"
            )
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._epoch_start = state["generator"].clone() if self.batches_done else None


class EmptyBatchCollate:
    """A collate function that also collates the empty batch Poisson sampling produces.

    Non-empty batches go to `collate_fn`. The empty batch is `collate_fn([dataset[0]])`
    with every tensor cut to 0 rows: the same structure, dtypes and trailing shapes as
    any other batch, so the model runs on it (batch size 0) like on any other.
    """

    def __init__(self, dataset, collate_fn=None):
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self._one = None  # a collated batch of one example, made on the first empty batch

    def __call__(self, examples: list):
        if examples:
            return self.collate_fn(examples)
        if self._one is None:
            self._one = self.collate_fn([self.dataset[0]])
        return _zero_rows(self._one)


def _zero_rows(batch):
    """`batch` with 0 examples: tensors cut to `[:0]`, containers rebuilt, collated strings emptied."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({k: _zero_rows(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_zero_rows(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(v, (str, bytes)) for v in batch):
            return type(batch)()  # default_collate turns strings into a list with one per example
        return type(batch)(_zero_rows(v) for v in batch)
    return batch


@dataclass(frozen=True)
class Padding:
    """Which rows of the batch in hand are padding, as the loader that padded it says: `mask` is
    `[B]` bool, True for a real example; `truncation_probability` the sampler's per-step
    `P[Bin(N+1, q) > M]`, which the accountant adds (`DPOptimizer` reads it from the model)."""

    mask: torch.Tensor
    truncation_probability: float = 0.0
    rows_per_unit: int | None = None  # user-level privacy: each run of this many rows is one user (`UserSampler`)


_padding: contextvars.ContextVar[Padding | None] = contextvars.ContextVar("bkfx_padding", default=None)


def current_padding() -> Padding | None:
    """The padding of the batch the training loop holds now (set by a padded `poisson_loader` and
    `PhysicalBatches` while the loop runs on the batch, or by `padded`); None: no padding."""
    return _padding.get()


@contextlib.contextmanager
def padded(mask: torch.Tensor, truncation_probability: float = 0.0, rows_per_unit: int | None = None):
    """Mark rows of the batches run inside as padding (`mask[i]` False): the DP model gives them
    clip factor 0, and they enter no `.grad`, norm or count. For loops that pad batches themselves."""
    token = _padding.set(Padding(torch.as_tensor(mask, dtype=torch.bool), float(truncation_probability), rows_per_unit))
    try:
        yield
    finally:
        _padding.reset(token)


def _reset(token) -> None:
    try:
        _padding.reset(token)
    except ValueError:  # a loop abandoned and closed from another context: clear it there
        _padding.set(None)


class _Padded:
    """A padded batch on its way from a worker to the loader: the batch and its number of real rows
    (the first ones). Pinned like the batch it carries."""

    def __init__(self, batch, real: int, mask: torch.Tensor | None = None, rows_per_unit: int | None = None):
        self.batch, self.real, self.mask, self.rows_per_unit = batch, real, mask, rows_per_unit

    def pin_memory(self, device=None):
        return _Padded(pin_batch(self.batch, device), self.real, self.mask, self.rows_per_unit)


class PaddedCollate(EmptyBatchCollate):
    """Collates a truncated Poisson batch of n <= M examples padded to a fixed size: the next
    multiple of `multiple` (at least one multiple, so the empty batch is one too), or M when
    `multiple` is None. The padding rows repeat the dataset's first example (valid inputs for any
    model) after the real ones; the loader marks them (`Padding`)."""

    def __init__(self, dataset, collate_fn, max_batch_size: int, multiple: int | None):
        super().__init__(dataset, collate_fn)
        self.max_batch_size, self.multiple = max_batch_size, multiple

    def size_for(self, n: int) -> int:
        if self.multiple is None:
            return self.max_batch_size
        return max(1, math.ceil(n / self.multiple)) * self.multiple

    def __call__(self, examples: list):
        size = self.size_for(len(examples))
        return _Padded(self.collate_fn(list(examples) + [self.dataset[0]] * (size - len(examples))), len(examples))


def poisson_loader(
    dataset, sample_rate: float, *, steps: int | None = None, generator: torch.Generator | None = None,
    seed: int | None = None, collate_fn=None, rank: int | None = None, world_size: int | None = None,
    max_batch_size: int | None = None, pad_to_multiple_of: int | None = None, user_ids=None,
    examples_per_user: int = 1, **loader_options,
) -> DataLoader:
    """A DataLoader over `dataset` whose batches are Poisson samples at rate `sample_rate`.

    One pass is `steps` batches (default `round(1/q)`, one epoch in expectation); batches
    may be empty and come out as 0-row tensors. `loader_options` go to DataLoader
    (num_workers, pin_memory, ...); batch_size, shuffle, sampler and drop_last do not
    apply to Poisson sampling. `rank`/`world_size` (with the same `seed` on every rank) give
    each rank its shard of the global Poisson batch (see `PoissonSampler`).

    Fixed shapes (truncated Poisson sampling, as jax_privacy's; Beltran et al. 2024): with
    `max_batch_size=M` a batch of more than M drawn examples keeps a uniformly random M of them,
    and every batch is padded, to the next multiple of `pad_to_multiple_of=k` (so at most ⌈M/k⌉
    shapes: CUDA graphs capture at most ⌈M/k⌉ graph pairs) or to M. Padding rows repeat the first
    example and are marked (`current_padding()`, read by the DP model at its forward call): the DP
    model gives them clip factor 0, so they add nothing to `.grad`, the norms' count or the noise
    scale (the expected batch size stays q N). Each example is still included with probability q
    unless truncated; the accountant adds the truncation probability `P[Bin(N+1, q) > M]` per step
    to δ (`bkfx.training.accounting.truncation_probability`). With a loss reduced by "mean", the loss
    divides by the padded size; the DP model's clipped sums do not depend on it.

    User-level privacy: with `user_ids=` (the user of each example) the steps sample users with
    probability q (`sample_rate` is then per user), at most `examples_per_user` examples each,
    padded to that many rows per user (`UserSampler`); the DP model clips per user, and the
    expected batch size for `DPOptimizer` is q × the number of users (`loader.batch_sampler
    .expected_batch_size`).
    """
    fixed = sorted({"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"} & set(loader_options))
    if fixed:
        raise ValueError(f"poisson_loader draws its own batches; {', '.join(fixed)} cannot be set (use sample_rate)")
    if pad_to_multiple_of is not None:
        if max_batch_size is None:
            raise ValueError("pad_to_multiple_of needs max_batch_size= (the truncation that bounds the padded shapes)")
        if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    if max_batch_size is not None and world_size not in (None, 1):
        raise ValueError("max_batch_size with a sharded sampler (world_size > 1) is not supported: each rank's shard "
                         "of the truncated batch would still vary in size")
    if user_ids is not None:
        if max_batch_size is not None or world_size not in (None, 1):
            raise ValueError("user_ids= (user-level sampling) cannot be combined with max_batch_size= or a sharded sampler")
        if len(user_ids) != len(dataset):
            raise ValueError(f"user_ids has {len(user_ids)} entries for {len(dataset)} examples: give each example's user")
        sampler = UserSampler(user_ids, sample_rate, examples_per_user=examples_per_user, steps=steps,
                              generator=generator, seed=seed)
        return PoissonLoader(_MarkedDataset(dataset), batch_sampler=sampler,
                             collate_fn=UserCollate(dataset, collate_fn, examples_per_user), **loader_options)
    sampler = PoissonSampler(len(dataset), sample_rate, steps=steps, generator=generator, seed=seed,
                             rank=rank, world_size=world_size, max_batch_size=max_batch_size)
    collate = EmptyBatchCollate(dataset, collate_fn) if max_batch_size is None else \
        PaddedCollate(dataset, collate_fn, max_batch_size, pad_to_multiple_of)
    return PoissonLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_options)


class PoissonLoader(DataLoader):
    """The DataLoader `poisson_loader` makes: it tells its `PoissonSampler` how many batches the
    training loop has received (its workers draw batches ahead), so the sampler's `state_dict()`
    resumes after the last batch the loop got. The workers' base seed of each pass is drawn from
    the sampler's seed and epoch, not from torch's global generator: a pass started by a resumed
    run leaves the model's randomness (dropout) and the workers' where the original run had them."""

    def __init__(self, dataset, *, batch_sampler: PoissonSampler, **options):
        super().__init__(dataset, batch_sampler=batch_sampler, generator=torch.Generator(), **options)
        batch_sampler.counted_by_loader = True

    def __iter__(self):
        sampler = self.batch_sampler
        self.generator.manual_seed(int(np.random.SeedSequence([sampler.generator.initial_seed(), sampler.epoch])
                                       .generate_state(1, np.uint64)[0] >> np.uint64(1)))
        batches = super().__iter__()  # starts the sampler's pass
        done = sampler.batches_done
        token = None
        try:
            for batch in batches:
                done += 1
                sampler.delivered(done)
                if isinstance(batch, _Padded):  # the loop's batch has padding rows until the next one
                    size = batch_size_of(batch.batch)
                    mask = torch.arange(size) < batch.real if batch.mask is None else batch.mask
                    if token is not None:
                        _reset(token)
                    token = _padding.set(Padding(mask, sampler.truncation_probability, batch.rows_per_unit))
                    batch = batch.batch
                yield batch
        finally:
            if token is not None:
                _reset(token)


def batch_size_of(batch) -> int:
    """The number of examples in a collated batch: the leading size its tensors share."""
    sizes = {t.shape[0] for t in _tensors(batch)}
    if len(sizes) != 1:
        raise ValueError(f"a batch's tensors must share their first (sample) dimension, found sizes {sorted(sizes)}")
    return sizes.pop()


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


def _rows(batch, start: int, stop: int):
    """Examples `start:stop` of a collated batch (tensors sliced, other leaves kept whole)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _rows(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_rows(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_rows(v, start, stop) for v in batch)
    return batch


def check_physical_batch_size(max_physical_batch_size: int) -> None:
    if max_physical_batch_size <= 0:
        raise ValueError(f"max_physical_batch_size must be positive, got {max_physical_batch_size}")


def split_physical_batches(batch, max_physical_batch_size: int) -> Iterator:
    """A logical batch of B examples as `max(1, ceil(B / M))` physical batches of at most M examples.

    Tensors (in tuples, lists, dicts) are sliced along their first dimension (views, no
    copies); the empty batch is one empty physical batch, so a loop over the physical
    batches of every logical batch always runs at least once.
    """
    check_physical_batch_size(max_physical_batch_size)
    size = batch_size_of(batch)
    for start in range(0, max(size, 1), max_physical_batch_size):
        yield _rows(batch, start, min(start + max_physical_batch_size, size))


class PhysicalBatches:
    """The batches of a loader of logical batches, as physical batches for an unchanged training loop.

    Each logical batch is split by `split_physical_batches`; before each physical batch
    the DP optimizer is told whether it ends its logical batch, and until then its
    `step()` and `zero_grad()` do nothing, so clipped sums accumulate in `.grad`:

        for x, y in PhysicalBatches(loader, 32, optimizer):
            loss_fn(model(x), y).backward()
            optimizer.step()        # noise and step only after a logical batch's last part
            optimizer.zero_grad()
    """

    def __init__(self, loader, max_physical_batch_size: int, optimizer):
        check_physical_batch_size(max_physical_batch_size)
        self.loader = loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __iter__(self):
        try:
            for batch in self.loader:
                parts = list(split_physical_batches(batch, self.max_physical_batch_size))
                padding = current_padding()
                for k, part in enumerate(parts):
                    self.optimizer.logical_batch_complete = k == len(parts) - 1
                    if padding is None:
                        yield part
                        continue
                    start = k * self.max_physical_batch_size  # the part's rows of the padding mask
                    with padded(padding.mask[start:start + self.max_physical_batch_size], padding.truncation_probability):
                        yield part
        finally:
            self.optimizer.logical_batch_complete = True

    @property
    def dataset(self):
        return self.loader.dataset


class UserSampler(PoissonSampler):
    """User-level Poisson sampling: each step samples every user with probability q (users, not
    examples, are the unit of privacy) and takes at most `examples_per_user` (k) of each sampled
    user's examples (a uniformly random k of them when the user has more). A batch is the sampled
    users' examples, user by user, each user padded to exactly k rows (padding index -1), so the DP
    model clips each run of k rows as one unit (`Padding.rows_per_unit`): the gradient of the sum of
    the user's examples' losses, clipped. `expected_batch_size` is q U, the expected number of users,
    which `DPOptimizer` divides the noisy sum by."""

    def __init__(self, user_ids, sample_rate: float, *, examples_per_user: int, steps: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None):
        ids = torch.as_tensor(user_ids)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("user_ids must be a non-empty 1-d sequence: the user of each example")
        if not isinstance(examples_per_user, int) or isinstance(examples_per_user, bool) or examples_per_user <= 0:
            raise ValueError(f"examples_per_user must be a positive int, got {examples_per_user!r}")
        users, inverse = torch.unique(ids, return_inverse=True)
        super().__init__(len(users), sample_rate, steps=steps, generator=generator, seed=seed)
        self.examples_per_user = examples_per_user
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(users))
        self._examples = list(order.split(counts.tolist()))  # each user's example indices

    def _select(self, users: torch.Tensor) -> list[int]:
        """The sampled users' examples, at most k each (a uniformly random k), each padded to k rows."""
        k, batch = self.examples_per_user, []
        for u in users.tolist():
            examples = self._examples[u]
            if examples.numel() > k:
                examples = examples[torch.randperm(examples.numel(), generator=self.generator)[:k].sort().values]
            batch += examples.tolist() + [-1] * (k - examples.numel())
        return batch


class _MarkedDataset(torch.utils.data.Dataset):
    """`(dataset[i], True)`, or for the padding index -1 `(dataset[0], False)`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (self.dataset[0], False) if i < 0 else (self.dataset[i], True)


class UserCollate(EmptyBatchCollate):
    """Collates a user-level batch of marked examples (`_MarkedDataset`): the batch, with the
    padding mask and the rows per user (`_Padded`)."""

    def __init__(self, dataset, collate_fn, rows_per_unit: int):
        super().__init__(dataset, collate_fn)
        self.rows_per_unit = rows_per_unit

    def __call__(self, marked: list):
        if not marked:
            return _Padded(super().__call__([]), 0, torch.zeros(0, dtype=torch.bool), self.rows_per_unit)
        examples, real = zip(*marked)
        return _Padded(self.collate_fn(list(examples)), sum(real), torch.tensor(real), self.rows_per_unit)
