"""Median training-step time of plain vs bkfx-compiled Hugging Face GPT-2, side by side in one process.

    python benchmarks/gpt2_step.py --layers 4 --width 256 --batch 16 --seq 64 --steps 10

A step is forward + loss + backward + optimizer step (SGD) + zero_grad. The two
methods alternate step by step so that both see the same machine state.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build(args):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab, n_positions=max(args.seq, 64),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg), cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--norm-mode", default="auto")
    args = ap.parse_args()

    import bkfx

    plain, cfg = build(args)
    private, _ = build(args)
    dp = bkfx.compile(private, norm_mode=args.norm_mode)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step(model, module):
        opt = optims[id(module)]
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), x.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    optims = {id(plain): torch.optim.SGD(plain.parameters(), lr=1e-4), id(private): torch.optim.SGD(private.parameters(), lr=1e-4)}
    times = {"non-private": [], "bkfx": []}
    for i in range(args.warmup + args.steps):
        for name, model, module in (("non-private", plain, plain), ("bkfx", dp, private)):
            t0 = time.perf_counter()
            step(model, module)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in plain.parameters())
    print(f"GPT-2 {args.layers} layers x {args.width} wide, vocab {args.vocab} ({params / 1e6:.1f}M params), "
          f"batch {args.batch}, seq {args.seq}, {args.steps} steps after {args.warmup} warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| method | median step (s) | ratio to non-private |")
    print("|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.4f} | {med[k] / med['non-private']:.2f}x |")


if __name__ == "__main__":
    main()
