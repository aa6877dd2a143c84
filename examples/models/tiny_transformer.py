"""A tiny causal transformer language model for `bkfx inspect` / `bkfx check` (token ids `[B, T]`).

Token embedding + learned positions, pre-norm blocks (causal self-attention and an MLP, each
residual), a final LayerNorm and an output head tied to the token embedding.

    bkfx inspect examples/models/tiny_transformer.py:tiny_transformer --input-shape 8,16 --int-input 64
    bkfx check examples/models/tiny_transformer.py:tiny_transformer --input-shape 4,16 --int-input 64 --num-classes 64
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, max_len)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, d))
        self.blocks = nn.ModuleList(Block(d, heads, max_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.tok.weight)  # head tied to the token embedding


def tiny_transformer() -> nn.Module:
    return TinyTransformer()
