"""The `bkfx` command: look at a model's plan and graph, and check it against the reference.

    bkfx inspect FILE.py:FACTORY --input-shape 8,3,32,32 [--dtype float32|float64]
                 [--int-input VOCAB] [--out DIR] [--format svg|png|pdf] [--norm-mode MODE]
    bkfx check   FILE.py:FACTORY --input-shape 4,3,32,32 [--num-classes K] [--int-input VOCAB]
                 [--max-grad-norm R] [--clipping abadi|automatic] [--norm-mode MODE]

`FACTORY` is a function in `FILE.py` that takes no arguments and returns the
`nn.Module`. The input is random: standard normal, or token ids in `[0, VOCAB)` with
`--int-input`.

`inspect` compiles the model, runs one forward pass, prints `dp_model.explain()` and
writes the rewritten graph to `DIR/FACTORY.dot` and a picture of it (`bkfx.tools.graph.render`:
Graphviz's `dot` when installed, else matplotlib; DOT only when neither is).

`check` runs `bkfx.testing.assert_matches_reference` in float64 with the cross entropy of
the output (`[B, K]`, or `[B, T, K]` per position) against random classes, and prints the
worst relative error of each parameter's `.grad` and of the per-sample norms. Exit code
0 when all are within 1e-6, 1 when any is not.

Bad input — a missing file, no such factory, a factory that raises, an input the model
does not accept, a model bkfx refuses — is reported as one line on stderr, exit code 2.
`--traceback` shows the whole traceback instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bkfx
from bkfx.errors import BkfxError, CommandLineError

__all__ = ["TOLERANCE", "DTYPES", "EXIT_PASS", "EXIT_FAIL", "EXIT_BAD_INPUT", "parse_shape", "load_factory",
    "build_model", "random_input", "forward", "compiled", "inspect", "cross_entropy", "check", "parser",
    "main"]

TOLERANCE = 1e-6  # float64, as in bkfx.testing.assert_matches_reference
DTYPES = {"float32": torch.float32, "float64": torch.float64}
EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


# -- loading the model and its input -------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    """`"8,3,32,32"` as `(8, 3, 32, 32)`; every size a positive integer."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise CommandLineError(f"--input-shape must be comma-separated integers like 8,3,32,32, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise CommandLineError(f"--input-shape needs at least one dimension, each >= 1, got {text!r}")
    return shape


def load_factory(target: str):
    """The function `FACTORY` of `FILE.py:FACTORY`, with FILE imported as a module."""
    file, sep, name = target.rpartition(":")
    if not sep or not file or not name:
        raise CommandLineError(f"the model must be given as FILE.py:FACTORY, got {target!r}")
    path = Path(file)
    if not path.is_file():
        raise CommandLineError(f"no such file: {file}")
    sys.path.insert(0, str(path.resolve().parent))  # the model file may import its neighbours
    spec = importlib.util.spec_from_file_location(f"bkfx_cli_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise CommandLineError(f"importing {file} failed: {_one_line(e)}") from e
    factory = getattr(module, name, None)
    if factory is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        defined = ", ".join(names) or "nothing callable"
        raise CommandLineError(f"{file} has no factory named {name!r} (it defines: {defined})")
    if not callable(factory):
        raise CommandLineError(f"{file}:{name} is not callable")
    return factory


def build_model(target: str, dtype: torch.dtype) -> nn.Module:
    factory = load_factory(target)
    try:
        model = factory()
    except Exception as e:
        raise CommandLineError(f"{target}() raised {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CommandLineError(f"{target}() returned an object of type {type(model).__name__}, not an nn.Module")
    return model.to(dtype)


def random_input(shape: tuple[int, ...], dtype: torch.dtype, vocab: int | None) -> torch.Tensor:
    """Standard normal of `shape`, or token ids in `[0, vocab)` when `vocab` is given."""
    if vocab is not None:
        if vocab < 1:
            raise CommandLineError(f"--int-input must be a vocabulary size >= 1, got {vocab}")
        return torch.randint(0, vocab, shape)
    return torch.randn(shape, dtype=dtype)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own output on `x`, so that a wrong input shape is reported as such."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise CommandLineError(f"the model's forward failed on an input of shape {list(x.shape)} ({x.dtype}): "
                               f"{_one_line(e)}") from e
    if not isinstance(out, torch.Tensor):
        raise CommandLineError(f"the model returned a {type(out).__name__}; "
                               "bkfx inspect/check need a single tensor output")
    return out


def compiled(model: nn.Module, x: torch.Tensor, **options) -> bkfx.DPModel:
    """`bkfx.compile(model, **options)`, called once on `x` so that the plan exists."""
    dp = bkfx.compile(model, **options)
    dp(x)
    return dp


def _one_line(e: BaseException) -> str:
    """An exception as one line: its class and its message's lines joined."""
    text = " | ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- the two commands -------------------------------------------------------------------------------------
def inspect(args) -> int:
    dtype = DTYPES[args.dtype]
    model = build_model(args.model, dtype)
    x = random_input(parse_shape(args.input_shape), dtype, args.int_input)
    forward(model, x)
    dp = compiled(model, x, norm_mode=args.norm_mode)
    from bkfx.tools.graph import RenderError, available_engine, render, to_networkx, write_dot

    print(dp.explain())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.model.rpartition(":")[2]
    graph = to_networkx(dp)
    written = [write_dot(graph, out / f"{name}.dot")]
    engine = available_engine()
    if engine is None:
        print(f"\ngraph: {written[0]} (no picture: install Graphviz's `dot` or matplotlib to draw it)")
        return EXIT_PASS
    try:
        written.append(render(graph, out / f"{name}.{args.format}"))
    except RenderError as e:
        print(f"\ngraph: {written[0]} (no picture: {e})")
        return EXIT_PASS
    print(f"\ngraph: {', '.join(map(str, written))} (drawn with {engine})")
    return EXIT_PASS


def cross_entropy(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy over every position of a `[B, K]` or `[B, T, K]` output."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def check(args) -> int:
    from bkfx.testing import assert_matches_reference, clipped_sum_reference, per_sample_gradients

    model = build_model(args.model, torch.float64)
    x = random_input(parse_shape(args.input_shape), torch.float64, args.int_input)
    out = forward(model, x)
    if out.dim() not in (2, 3):
        raise CommandLineError("check needs a [B, K] or [B, T, K] output for cross entropy, "
                               f"the model returned {list(out.shape)}")
    classes = out.shape[-1]
    if args.num_classes is not None and args.num_classes != classes:
        raise CommandLineError(f"--num-classes is {args.num_classes} but the model's output is {list(out.shape)} "
                               f"(K = {classes})")
    y = torch.randint(0, classes, out.shape[:-1])
    loss_fn = partial(cross_entropy, reduction="mean")
    options = dict(max_grad_norm=args.max_grad_norm, clipping=args.clipping, norm_mode=args.norm_mode)
    # bkfx's refusal first: the reference's vmap fails less clearly on the same models (e.g. batch norm)
    compiled(model, x, **options)
    _, norms = clipped_sum_reference(
        per_sample_gradients(model, loss_fn, (x,), y), max_grad_norm=args.max_grad_norm, clipping=args.clipping,
    )
    try:  # an infinite tolerance: the errors come back and are judged here, all of them
        dp, errors = assert_matches_reference(model, loss_fn, x, y, rtol=math.inf, **options)
    except AssertionError as e:  # only NaN fails an infinite tolerance
        errors, dp = {"(comparison)": math.nan}, None
        print(f"the comparison itself failed: {e}")
    rows = [(name, list(p.shape), errors.get(name)) for name, p in model.named_parameters() if p.requires_grad]
    if dp is not None and dp.per_sample_norms is not None:
        norm_error = ((dp.per_sample_norms - norms).abs().max() / norms.abs().max().clamp_min(1e-30)).item()
        rows.append(("per-sample norms", [len(norms)], norm_error))
    print(f"bkfx check {args.model}: input {list(x.shape)} float64, loss cross entropy over {classes} classes "
          f"(mean), max_grad_norm {args.max_grad_norm}, {args.clipping} clipping, norm_mode {args.norm_mode}")
    width = max(len(r[0]) for r in rows)
    print(f"{'parameter':<{width}}  {'shape':<16}  worst relative error")
    failed = 0
    for name, shape, err in rows:
        ok = err is not None and err <= TOLERANCE
        failed += not ok
        shown = "not compared" if err is None else f"{err:.2e}"
        print(f"{name:<{width}}  {str(shape):<16}  {shown:>20}  {'ok' if ok else 'FAIL'}")
    if failed:
        print(f"FAIL: {failed} of {len(rows)} differ from the vmap reference by more than {TOLERANCE:g} (relative); "
              "a model whose forward pass is random (dropout in training mode) differs between the two runs")
        return EXIT_FAIL
    print(f"PASS: every .grad and the per-sample norms match the vmap reference within {TOLERANCE:g} (relative)")
    return EXIT_PASS


# -- argument parsing ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line on stderr and exit code 2."""

    def error(self, message):
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="bkfx", description="Inspect bkfx's plan for a model, or check it against the reference.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p):
        p.add_argument("model", metavar="FILE.py:FACTORY", help="a file and a function in it returning the nn.Module")
        p.add_argument("--input-shape", required=True, help="the random input's shape, batch first, e.g. 8,3,32,32")
        p.add_argument("--int-input", type=int, metavar="VOCAB",
                       help="token ids in [0, VOCAB) instead of normal floats")
        p.add_argument("--norm-mode", default="auto", choices=["auto", "ghost", "explicit"])
        p.add_argument("--seed", type=int, default=0, help="seed of the model's and the input's random numbers")
        p.add_argument("--traceback", action="store_true", help="on error, show the whole traceback")

    ins = commands.add_parser("inspect", help="print the plan and draw the rewritten graph")
    common(ins)
    ins.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ins.add_argument("--out", default=".", metavar="DIR", help="where to write FACTORY.dot and its picture")
    ins.add_argument("--format", default="svg", choices=["svg", "png", "pdf"])
    chk = commands.add_parser("check", help="compare .grad with the vmap reference in float64")
    common(chk)
    chk.add_argument("--num-classes", type=int, metavar="K", help="the output's last size (checked)")
    chk.add_argument("--max-grad-norm", type=float, default=1.0)
    chk.add_argument("--clipping", default="abadi", choices=["abadi", "automatic"])
    return top


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = parser().parse_args(argv)
        torch.manual_seed(args.seed)
        with warnings.catch_warnings():
            # torch's warnings about its own internals are not the user's business here; stderr is for errors
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")
            return {"inspect": inspect, "check": check}[args.command](args)
    except Exception as e:
        if args is not None and args.traceback:
            raise
        problem = str(e) if isinstance(e, CommandLineError) else (
            _one_line(e) if isinstance(e, BkfxError) else f"unexpected {_one_line(e)} (rerun with --traceback)"
        )
        print(f"bkfx: error: {' | '.join(s.strip() for s in problem.splitlines() if s.strip())}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
