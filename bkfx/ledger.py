"""The ledger: per-sample pieces recorded during backward, finalised when it ends.

Each forward call of a compiled model opens a `Tape`. During backward every site's
tap hands its output gradient to its `Record`, which turns it into per-sample pieces
(through the site's rules, the operand's chain and the site's norm mode) kept on the
tape. When the autograd engine finishes the backward pass (its end-of-backward
callback, so unused branches and several outputs need no special care), the tape
computes each parameter's per-sample squared norm (cross terms of tied parameters
included), each group's clip factor, and adds the book-kept clipped sums to `.grad`.

Scaling: with `loss_reduction="mean"` the recorded gradients are `1/B` of the
per-sample ones, so norms are multiplied by B and the clipped sum
`Σ_i C_i G_i^recorded` is already `(1/B) Σ_i C_i G_i`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from torch.func import vjp, vmap

from bkfx.clipping import clip_factor
from bkfx.errors import InPlaceModificationError
from bkfx.factors import Dense, Explicit, Factored, canonical_matrix, inner, weighted_sum
from bkfx.plan import Site, get_path
from bkfx.rules import SiteCall

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


@dataclass
class Tape:
    sites: list[Site]
    params: dict[str, torch.nn.Parameter]
    config: ClipConfig
    batch: int
    on_finalise: object = None  # called with the tape after each finalisation
    pieces: dict[str, list] = field(default_factory=dict)
    per_sample_norms: torch.Tensor | None = None
    group_norms: list | None = None
    _queued: bool = False

    def name_of(self, param: torch.Tensor) -> str:
        return next(n for n, p in self.params.items() if p is param)

    def record(self, site: Site, args, kwargs, chains) -> "Record":
        return Record(self, site, args, kwargs, chains)

    def add(self, name: str, piece) -> None:
        self.pieces.setdefault(name, []).append(piece)
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finalise)

    def finalise(self) -> None:
        self._queued = False
        if not self.pieces:
            return
        pieces, self.pieces = self.pieces, {}
        scale = self.batch if self.config.loss_reduction == "mean" else 1
        squared = {name: _squared_norm(ps, self.params[name].shape) for name, ps in pieces.items()}
        some = next(iter(squared.values()))
        total = torch.zeros_like(some)
        factors, self.group_norms = {}, []
        for group, R in zip(self.config.groups, self.config.thresholds):
            sq = sum((squared[n] for n in group if n in squared), torch.zeros_like(some))
            total = total + sq
            norm = sq.sqrt() * scale
            self.group_norms.append(norm.detach())
            c = clip_factor(norm, R, self.config.clipping, self.config.gamma)
            for n in group:
                factors[n] = c
        self.per_sample_norms = (total.sqrt() * scale).detach()
        with torch.no_grad():
            for name, ps in pieces.items():
                p = self.params[name]
                grad = sum(weighted_sum(piece, factors[name], p.shape) for piece in ps)
                if p.grad is None:
                    p.grad = grad.to(p.dtype)
                else:
                    p.grad.add_(grad)
        if self.on_finalise is not None:
            self.on_finalise(self)


def _squared_norm(pieces: list, shape) -> torch.Tensor:
    """`‖Σ_k G_i^k‖²` for one parameter's pieces: all pairwise inner products."""
    explicit = [p for p in pieces if isinstance(p, Explicit)]
    factored = [p for p in pieces if isinstance(p, Factored)]
    if len(explicit) > 1:
        explicit = [Explicit(sum(p.G for p in explicit))]
    pieces[:] = factored + explicit  # the merged explicit piece serves the clipped sum too
    total = None
    for k, a in enumerate(pieces):
        for b in pieces[k:]:
            term = inner(a, b, shape) * (1 if a is b else 2)
            total = term if total is None else total + term
    return total


class Record:
    """One site's forward values; its `backward` turns the output gradient into pieces."""

    def __init__(self, tape: Tape, site: Site, args, kwargs, chains):
        self.tape, self.site, self.args, self.kwargs, self.chains = tape, site, args, kwargs, chains
        self.versions = {path: get_path(args, path)._version for path in site.layouts}

    def backward(self, g: torch.Tensor) -> None:
        site, tape = self.site, self.tape
        for path, version in self.versions.items():
            if get_path(self.args, path)._version != version:
                raise InPlaceModificationError(
                    f"an input of site {site.node} ({site.op}) was modified in place after the forward pass\n"
                    f"  source: {site.source}\n"
                    "  what to do: avoid in-place operations (x += y, relu_) on activations that feed parameters"
                )
        call = SiteCall(site.op, self.args, self.kwargs, g, site.layouts, site.out_layout, tape.batch)
        pieces = [(operand, operand.rule.piece(call, operand.path)) for operand in site.operands]
        ghost = self._ghost([p for _, p in pieces if isinstance(p, Factored)])
        for operand, piece in pieces:
            for name, part in self._to_params(operand, piece):
                if isinstance(part, Factored) and not ghost:
                    part = part.materialise(tape.params[name].shape)
                tape.add(name, part)

    def _ghost(self, factored: list[Factored]) -> bool:
        mode = self.site.mode
        if mode != "guard":
            return mode == "ghost"
        ghost = explicit = 0
        for f in factored:
            T, m, n = f.R.t.shape[1], f.L.width, f.R.width
            ghost, explicit = ghost + T * T * (m + n), explicit + T * m * n
        return ghost <= explicit

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

        _, pullback = vjp(chain, *[p.detach() for p in leaf_params])
        grads = vmap(pullback)(piece.G)
        names = [self.tape.name_of(p) for p in leaf_params]
        return [(n, Explicit(G)) for n, G in zip(names, grads)]
