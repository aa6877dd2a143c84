"""The ledger: per-sample pieces recorded during backward, finalised when it ends.

Each forward call of a compiled model opens a `Tape`. During backward every site's
tap hands its output gradient to its `Record`, which turns it into per-sample pieces
(through the site's rules, the operand's chain and the site's norm mode) kept on the
tape. When the autograd engine finishes the backward pass (its end-of-backward
callback, so unused branches and several outputs need no special care), the tape
computes each parameter's per-sample squared norm (cross terms of tied parameters
included), each group's clip factor, and adds the book-kept clipped sums to `.grad`.

A parameter that only one site uses has its per-sample squared norm computed as soon as
that site's backward has run (its Gram matrices are then dropped, except the few most
recent, which the q, k and v projections of one input share); only tied parameters wait
for the group's end for their cross terms. A group (all-layer: one group of all
parameters) is finalised as soon as all its sites recorded by the forward pass have been
through backward; its clipped sums are written parameter by parameter, each parameter's
book-kept factors released once its `.grad` is written. Whatever remains is finalised by
the end-of-backward callback.

Scaling: with `loss_reduction="mean"` the recorded gradients are `1/B` of the
per-sample ones, so norms are multiplied by B and the clipped sum
`Σ_i C_i G_i^recorded` is already `(1/B) Σ_i C_i G_i` (times B when the optimizer
asks for sums).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.func import vjp, vmap

from bkfx._ir.plan import Site, get_path
from bkfx._runtime.clipping import clip_factor
from bkfx._runtime.receipts import add_clipped_sum
from bkfx._torch import keeping_graph, queue_end_of_backward
from bkfx.errors import BkfxError, InPlaceModificationError, located_error
from bkfx.rules import SiteCall
from bkfx.rules.factors import Dense, Explicit, Factored, GramCache, OneHot, ScaledCache, inner, rowdot, weighted_sum
from bkfx.rules.precision import NO_AUTOCAST, AutocastState, accumulation_dtype, loss_scale

_current: contextvars.ContextVar["Tape | None"] = contextvars.ContextVar("bkfx_tape", default=None)


def current() -> "Tape | None":
    return _current.get()


@contextlib.contextmanager
def recording(tape: "Tape"):
    token = _current.set(tape)
    try:
        yield tape
    finally:
        _current.reset(token)


@dataclass
class ClipConfig:
    groups: list[list[str]]
    thresholds: list[float]
    clipping: str
    loss_reduction: str
    gamma: float = 0.01
    sum_output: bool = False  # write Σ_i C_i G_i whatever the reduction (for DPOptimizer)
    grad_scaler: object = None  # a torch.amp.GradScaler whose loss scale S the recorded gradients carry


@dataclass
class Tape:
    sites: list[Site]
    params: dict[str, torch.nn.Parameter]
    config: ClipConfig
    batch: int
    tied: frozenset  # parameters more than one site uses (their norms need cross terms): `tied_parameters(sites)`
    on_finalise: object = None  # called with the tape after each backward pass
    traced: bool = False  # recorded for a compiler (`bkfx._runtime.step`): see `_SmallExplicit`
    pieces: dict[str, list] = field(default_factory=dict)
    per_sample_norms: torch.Tensor | None = None
    group_norms: list | None = None
    _queued: bool = False
    _recorded: list = field(default_factory=list)  # the sites run by the forward calls of this tape
    _pending: dict | None = None  # group -> how many of its recorded site runs are still to come in this backward
    calls: int = 1  # forward calls joined on this tape (`join`)
    finalised: bool = False  # a backward pass has ended on this tape
    superseded: bool = False  # a later forward call of another batch size opened a new tape before this one's backward
    _group_squares: dict = field(default_factory=dict)
    _partial: dict = field(default_factory=dict)  # group -> Σ squared norms of its untied parameters so far
    mask: torch.Tensor | None = None  # [B] bool, False for padding rows (`bkfx.training.data.Padding`): clip factor 0
    rows_per_unit: int | None = None  # user-level privacy: each run of k rows is one unit, clipped as one (`_to_units`)

    def __post_init__(self):
        self._group_of = {n: g for g, names in enumerate(self.config.groups) for n in names}
        self.grams = GramCache()
        self._small: dict[int, _SmallExplicit] = {}  # group -> its small explicit per-sample gradients
        self._live = weakref.WeakSet()  # this tape's Records; the autograd graph holds them while it lives

    def awaiting_backward(self) -> bool:
        """Whether a forward call recorded sites whose graph is still alive and no backward ran:
        a further forward call before that backward is part of the same step."""
        return not self.finalised and len(self._live) > 0

    def join(self, sites: list[Site]) -> None:
        """Add a further forward call to this tape (two views of each sample before one
        backward): sample i of every call is the same sample, so its per-sample gradient is
        the sum over the calls, and every parameter may now have pieces from several calls,
        whose cross terms its norm needs. A call with another batch size is not joined: it
        opens a new tape and marks this one `superseded`."""
        self.sites = sites
        self.calls += 1
        self.tied = frozenset(self.params)

    def name_of(self, param: torch.Tensor) -> str:
        return next(n for n, p in self.params.items() if p is param)

    def record(self, site: Site, args, kwargs, chains) -> "Record":
        self._recorded.append(site)
        record = Record(self, site, args, kwargs, chains)
        self._live.add(record)
        return record

    def _groups_of(self, site: Site) -> set[int]:
        return {self._group_of[n] for n in site.params if n in self._group_of}

    def add(self, site: Site, parts: list) -> None:
        """Book-keep one site's pieces `[(parameter name, piece)]`; untied parameters' norms now."""
        if self.rows_per_unit is not None:
            parts = [(name, self._to_units(piece)) for name, piece in parts]
        by_name: dict[str, list] = {}
        for name, piece in parts:
            by_name.setdefault(name, []).append(piece)
        for name, pieces in by_name.items():
            if name in self.tied or name not in self._group_of:
                self.pieces.setdefault(name, []).extend(pieces)
                continue
            g = self._group_of[name]
            if all(isinstance(p, Explicit) for p in pieces) and self.params[name].numel() <= SMALL_EXPLICIT:
                # biases, norm weights: their norms and clipped sums are taken together at the
                # group's end (`_SmallExplicit`), a few kernels for all instead of several each
                G = pieces[0].G if len(pieces) == 1 else sum(p.G for p in pieces)
                self._small.setdefault(g, _SmallExplicit(joined=not self.traced)).add(name, G)
                continue
            squared = _squared_norm(pieces, self.params[name].shape, self.grams)
            self._partial[g] = squared if g not in self._partial else self._partial[g] + squared
            self.pieces[name] = pieces
        if not self._queued:
            self._queued = True
            queue_end_of_backward(self.finalise)

    def site_done(self, site: Site) -> None:
        """A site's backward has run; finalise every group none of whose sites is still to come."""
        if self._pending is None:
            self._pending = {}
            for recorded in self._recorded:
                for g in self._groups_of(recorded):
                    self._pending[g] = self._pending.get(g, 0) + 1
        for g in self._groups_of(site):
            if self._pending.get(g):
                self._pending[g] -= 1
                if not self._pending[g]:
                    self._finalise_group(g)

    def _finalise_group(self, g: int) -> None:
        """Clip factors of group g from its parameters' per-sample norms; clipped sums into .grad."""
        names = [n for n in self.config.groups[g] if n in self.pieces]
        squared = self._partial.pop(g, None)
        small = self._small.pop(g, None)
        if small is not None:
            term = small.squared_norms()
            squared = term if squared is None else squared + term
        for n in names:
            if n in self.tied:
                term = _squared_norm(self.pieces[n], self.params[n].shape, self.grams)
                squared = term if squared is None else squared + term
        if squared is None:
            return
        self._group_squares[g] = squared
        scale = self.batch if self.config.loss_reduction == "mean" else 1
        c = clip_factor(squared.sqrt() * self._norm_scale(squared), self.config.thresholds[g], self.config.clipping,
                        self.config.gamma)
        if self.config.sum_output:
            c = c * scale
        rows = None
        if self.mask is not None:
            c, rows = self._without_padding(c)
        scaled = ScaledCache()
        with torch.no_grad():
            if small is not None:
                for name, grad in small.clipped_sums(c, self.params, rows):
                    self._add_to_grad(self.params[name], grad)
            for name in names:
                p, pieces = self.params[name], self.pieces.pop(name)
                while pieces:  # each factor is released as soon as its part of the sum is written
                    self._add_to_grad(p, weighted_sum(_first_rows(pieces.pop(), rows), c, p.shape, scaled))

    def _add_to_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """A clipped sum into `.grad`, with the receipt `DPOptimizer.step()` checks (`bkfx._runtime.receipts`);
        traced for a compiler, `p` is the trace's leaf: the compiled step receipts the real parameter."""
        add_clipped_sum(p, grad, receipt=not self.traced)

    def _without_padding(self, c: torch.Tensor):
        """`(c, rows)`: the clip factors with padding rows' set to 0, and, eagerly when the real rows
        are the first n (as `bkfx.poisson_loader` pads), n: the clipped sums are then taken over
        those rows only, with the very shapes (so the very sums) of the unpadded batch. A compiled
        step keeps the padded shape (its point) and sums the zero-weighted rows too."""
        mask = self.unit_mask.to(c.device)
        c = torch.where(mask, c, torch.zeros_like(c))
        if self.traced or self.rows_per_unit is not None:
            return c, None
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            return c, None
        return c[:n], n

    @property
    def unit_mask(self) -> torch.Tensor | None:
        """`[units]` bool: the units with a real row (a unit is a row, or k rows for users)."""
        if self.mask is None or self.rows_per_unit is None:
            return self.mask
        return self.mask.view(-1, self.rows_per_unit).any(1)

    def _to_units(self, piece):
        """User-level privacy: the piece of each unit of k consecutive rows (a user's examples, padded
        to k), padding rows zeroed first. A unit's gradient is the sum of its rows' gradients:
        explicit pieces are summed over the k rows; factored ones `Σ_j L_jᵀ R_j = [L_1; ...; L_k]ᵀ
        [R_1; ...; R_k]` have their rows' factors concatenated along T (exact, cross terms of the
        unit's rows included, so ghost norms stay exact per unit)."""
        k = self.rows_per_unit
        keep = None if self.mask is None else self.mask.to(_device_of_piece(piece))
        if isinstance(piece, Explicit):
            G = piece.G if keep is None else piece.G * keep.view((-1,) + (1,) * (piece.G.dim() - 1)).to(piece.G.dtype)
            return Explicit(G.reshape(-1, k, *G.shape[1:]).sum(1))
        L, R = piece.L, piece.R
        units = R.t.shape[0] // k
        if isinstance(L, Dense):
            t = L.t if keep is None else L.t * keep[:, None, None].to(L.t.dtype)
            L = Dense(t.reshape(units, k * t.shape[1], t.shape[2]))  # sizes explicit: 0 units is a batch too
        else:
            mask = L.mask if keep is None else (keep[:, None] if L.mask is None else L.mask & keep[:, None])
            mask = None if mask is None else mask.expand(L.idx.shape).reshape(units, k * L.idx.shape[1])
            L = OneHot(L.idx.reshape(units, k * L.idx.shape[1]), L.size, mask)
        return Factored(L, Dense(R.t.reshape(units, k * R.t.shape[1], R.t.shape[2])))

    def _norm_scale(self, squared: torch.Tensor):
        """Recorded norms to per-sample norms: `× B` for a mean loss, `÷ S` for a GradScaler's
        loss scale S (the recorded output gradients carry it; the clipped sum keeps it, so the
        scaler's `unscale_` and inf check of `.grad` work as without bkfx)."""
        scale = self.batch if self.config.loss_reduction == "mean" else 1
        S = loss_scale(self.config.grad_scaler, squared.device)
        return scale if S is None else scale / S

    def finalise(self) -> None:
        """End of the backward pass: the remaining groups, then the per-sample norms."""
        with NO_AUTOCAST.apply():
            self._finalise()

    def _finalise(self) -> None:
        self._queued = False
        self.finalised = True
        for g in range(len(self.config.groups)):
            self._finalise_group(g)
        self._pending = None
        self.grams = GramCache()
        if not self._group_squares:
            return
        squares, self._group_squares = self._group_squares, {}
        if self.mask is not None:  # padding rows have no norm
            mask = self.unit_mask
            squares = {g: torch.where(mask.to(v.device), v, torch.zeros_like(v)) for g, v in squares.items()}
        scale = self._norm_scale(next(iter(squares.values())))
        self.group_norms = [
            (squares[g].sqrt() * scale).detach() if g in squares else None for g in range(len(self.config.groups))
        ]
        self.per_sample_norms = (sum(squares.values()).sqrt() * scale).detach()
        if self.on_finalise is not None:
            self.on_finalise(self)


def _keeping_graph() -> bool:
    """Whether the running backward pass was asked to keep its graph (retain_graph=True)."""
    return keeping_graph()


SMALL_EXPLICIT = 1 << 16  # parameters of at most this many entries are clipped together (_SmallExplicit)


class _SmallExplicit:
    """One group's small explicit per-sample gradients (biases, norm weights), side by side as
    `[B, Σ p_k]`: their squared norms are one `‖·‖²` per row and their clipped sums one
    `cᵀ G`, split back to the parameters; written once for every such parameter.

    Traced for a compiler (`joined=False`) they stay apart, each norm and clipped sum a
    reduction of its own: inductor then computes each per-sample gradient (a bias's sum over
    positions) in the kernel that produces the output gradient it reads, where the joined
    `[B, Σ p_k]` made one kernel at the end of backward read every such gradient again
    (GPT-2 4x256 at T = 64: 4 of 13 ms a step in inductor's kernels)."""

    def __init__(self, joined: bool = True):
        self.joined = joined
        self.names: list[str] = []
        self.G: list[torch.Tensor] = []
        self._flat: torch.Tensor | None = None

    def add(self, name: str, G: torch.Tensor) -> None:
        self.names.append(name)
        self.G.append(G)

    def _joined(self) -> torch.Tensor:
        """`[B, Σ p_k]` in the accumulation dtype (made once; the pieces are then released)."""
        if self.G:
            dtype = accumulation_dtype(self.G[0].dtype)
            for G in self.G[1:]:
                dtype = torch.promote_types(dtype, accumulation_dtype(G.dtype))
            self._flat = torch.cat([G.reshape(G.shape[0], math.prod(G.shape[1:])).to(dtype) for G in self.G], 1)
            self.G = []
        return self._flat

    def squared_norms(self) -> torch.Tensor:
        if not self.joined:
            return sum(rowdot(G, G) for G in self.G)
        flat = self._joined()
        return torch.linalg.vecdot(flat, flat)

    def clipped_sums(self, c: torch.Tensor, params: dict, rows: int | None = None):
        """`(name, Σ_i c_i G_i)` for each parameter, shaped like it (over the first `rows` samples
        when given: `c` has that many)."""
        if not self.joined:
            parts = []
            for name, G in zip(self.names, self.G):
                G = G if rows is None else G[:rows]
                dtype = accumulation_dtype(G.dtype)
                weights = c.to(dtype).reshape((-1,) + (1,) * (G.dim() - 1))
                parts.append((name, (G.to(dtype) * weights).sum(0).view(params[name].shape)))
            self.G = []
            return parts
        flat = self._joined()
        total = c.to(flat.dtype) @ (flat if rows is None else flat[:rows])
        self._flat = None
        sizes = [params[n].numel() for n in self.names]
        return [(n, part.view(params[n].shape)) for n, part in zip(self.names, total.split(sizes))]


def _device_of_piece(piece) -> torch.device:
    return piece.G.device if isinstance(piece, Explicit) else piece.R.t.device


def _first_rows(piece, rows: int | None):
    """The piece of the first `rows` samples only (all when None): views, no copies."""
    if rows is None:
        return piece
    if isinstance(piece, Explicit):
        return Explicit(piece.G[:rows])
    L = piece.L
    L = Dense(L.t[:rows]) if isinstance(L, Dense) else OneHot(L.idx[:rows], L.size, None if L.mask is None else L.mask[:rows])
    return Factored(L, Dense(piece.R.t[:rows]))


def tied_parameters(sites: list[Site]) -> frozenset:
    """Parameters that more than one site uses (a tied embedding and output head)."""
    seen, tied = set(), set()
    for site in sites:
        for name in site.params:
            (tied if name in seen else seen).add(name)
    return frozenset(tied)


def _squared_norm(pieces: list, shape, grams) -> torch.Tensor:
    """`‖Σ_k G_i^k‖²` for one parameter's pieces: all pairwise inner products."""
    explicit = [p for p in pieces if isinstance(p, Explicit)]
    factored = [p for p in pieces if isinstance(p, Factored)]
    if len(explicit) > 1:
        explicit = [Explicit(sum(p.G for p in explicit))]
    pieces[:] = factored + explicit  # the merged explicit piece serves the clipped sum too
    total = None
    for k, a in enumerate(pieces):
        for b in pieces[k:]:
            term = inner(a, b, shape, grams) * (1 if a is b else 2)
            total = term if total is None else total + term
    return total


class Record:
    """One site's forward values; its `backward` turns the output gradient into pieces."""

    def __init__(self, tape: Tape, site: Site, args, kwargs, chains):
        self.tape, self.site, self.args, self.kwargs, self.chains = tape, site, args, kwargs, chains
        self.saved = None  # what the site's rule kept from the forward (bkfx.rules.runner)
        self.versions = {path: get_path(args, path)._version for path in site.layouts}
        self.autocast = AutocastState.current()  # the rules re-run forward computations under it

    def backward(self, g: torch.Tensor) -> None:
        site, tape = self.site, self.tape
        if tape.superseded:
            raise BkfxError(
                f"backward through a forward call (batch size {tape.batch}) after a later forward call with another "
                "batch size: bkfx joins forward calls made before one backward as views of the same samples, which "
                "needs equal batch sizes, and cannot clip calls of different samples together\n"
                "  what to do: call backward() after each forward call (gradient accumulation works), give every call "
                "of one step the same samples, and run forward passes that are not trained on under torch.no_grad()"
            )
        if self.args is None:
            raise BkfxError(
                f"backward through site {site.node} ({site.op}) a second time, but its saved inputs were "
                "released after the first backward; call backward(retain_graph=True) the first time"
            )
        for path, version in self.versions.items():
            if get_path(self.args, path)._version != version:
                raise located_error(
                    InPlaceModificationError,
                    "an input this site saved for its per-sample gradients was modified in place after the forward pass",
                    site.node, site.op, site.source,
                    "avoid in-place operations (x += y, x.mul_(...)) on activations that feed parameters; "
                    "use the out-of-place form",
                )
        call = SiteCall(
            site.op, self.args, self.kwargs, g, site.layouts,
            site.out_layout if site.out_layouts is None else site.out_layouts, tape.batch, self.saved,
            fallback_paths=tuple(o.path for o in site.operands if o.rule.fallback),
        )
        with self.autocast.apply():
            pieces = [(operand, operand.rule.piece(call, operand.path)) for operand in site.operands]
        with NO_AUTOCAST.apply():
            self._book_keep(pieces)

    def _book_keep(self, pieces) -> None:
        site, tape = self.site, self.tape
        ghost = self._ghost([p for _, p in pieces if isinstance(p, Factored)])
        parts = []
        for operand, piece in pieces:
            for name, part in self._to_params(operand, piece):
                if isinstance(part, Factored) and not ghost:
                    part = part.materialise(tape.params[name].shape)
                parts.append((name, part))
        if not _keeping_graph():  # the factors now live in the pieces only, released as the clipped sums are written
            self.args = self.kwargs = self.chains = self.saved = None
        tape.add(site, parts)
        tape.site_done(site)

    def _ghost(self, factored: list[Factored]) -> bool:
        """The site's mode at this batch size (explicit only up to the batch its memory budget
        allows, `Site.explicit_up_to`); a run-time guard is decided with the factored pieces'
        actual `(T, m, n)`, by the cost model's time estimates (`Site.ghost_at`)."""
        return self.site.ghost_at(self.tape.batch, [(f.R.t.shape[1], f.L.width, f.R.width) for f in factored])

    def _to_params(self, operand, piece):
        """The operand's piece as pieces of the parameters it is computed from."""
        if operand.chain == "identity":
            return [(operand.params[0], piece)]
        if operand.chain == "transpose":
            if isinstance(piece, Factored) and isinstance(piece.L, Dense):
                return [(operand.params[0], Factored(piece.R, piece.L))]
            if isinstance(piece, Factored):
                piece = piece.materialise(get_path(self.args, operand.path).shape)
            return [(operand.params[0], Explicit(piece.G.transpose(1, 2)))]
        value = get_path(self.args, operand.path)
        if isinstance(piece, Factored):
            piece = piece.materialise(value.shape)
        leaves = list(self.chains[",".join(map(str, operand.path))])
        leaf_params = [leaves[i] for i in operand.chain_params]

        def chain(*ps):
            vals = list(leaves)
            for i, p in zip(operand.chain_params, ps):
                vals[i] = p
            return operand.chain_fn(*vals)

        names = [self.tape.name_of(p) for p in leaf_params]
        if piece.G.shape[0] == 0:
            return [(n, Explicit(p.new_zeros(0, *p.shape))) for n, p in zip(names, leaf_params)]
        _, pullback = vjp(chain, *[p.detach() for p in leaf_params])
        grads = vmap(pullback)(piece.G)
        return [(n, Explicit(G)) for n, G in zip(names, grads)]
