"""The benchmark models and their batches: an MLP, a GroupNorm CNN, ViTs, GPT-2s and a WideResNet."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in=784, hidden=1024, classes=10, depth=3):
        super().__init__()
        dims = [d_in] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.out(x)


class GroupNormCNN(nn.Module):
    def __init__(self, classes=10, width=32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.ReLU(), nn.MaxPool2d(2))
            for a, b in zip(chans, chans[1:])
        )
        self.fc = nn.Linear(chans[-1] * 4 * 4, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.fc(x.flatten(1))


class _WideBlock(nn.Module):
    """Pre-activation basic block of a WideResNet: GN-ReLU-conv3x3-GN-ReLU-conv3x3, plus a 1x1
    convolution on the shortcut when the width or the resolution changes."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        h = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        return skip + self.conv2(F.relu(self.norm2(h)))


class WideResNet(nn.Module):
    """WideResNet-`depth`-`k` (Zagoruyko & Komodakis) with GroupNorm instead of BatchNorm (DP
    training needs per-sample separability): a 3x3 stem of 16 channels, 3 groups of
    (depth-4)/6 basic blocks of widths 16k, 32k, 64k (strides 1, 2, 2), GN-ReLU, global average
    pool, linear. WRN-16-4: 2 blocks per group, widths 64/128/256, 2.7M parameters."""

    def __init__(self, depth=16, k=4, classes=10, groups=16):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g in range(3):
            for i in range(n):
                c_in = widths[g] if i == 0 else widths[g + 1]
                blocks.append(_WideBlock(c_in, widths[g + 1], (1 if g == 0 else 2) if i == 0 else 1, groups))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(groups, widths[3])
        self.fc = nn.Linear(widths[3], classes)

    def forward(self, x):
        h = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def _hf_quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def vit(layers=4, width=256, image=32, patch=4, heads=4, classes=10):
    """HF ViT; `vit(12, 768, 224, 16, 12, 1000)` is ViT-B/16 (ViTConfig's defaults, 1000 classes)."""
    tf = _hf_quiet()
    cfg = tf.ViTConfig(
        image_size=image, patch_size=patch, num_channels=3, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * width, num_labels=classes, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.ViTForImageClassification(cfg)


def gpt2(layers=4, width=256, seq=128, vocab=50257, tied=False, heads=None):
    """HF GPT-2. Untied output head by default: Opacus's ghost clipping refuses tied parameters,
    and every method must train the same model (bkfx's tied path is timed by gpt2_step.py)."""
    tf = _hf_quiet()
    cfg = tf.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads or max(1, width // 64), vocab_size=vocab, n_positions=max(seq, 128),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, tie_word_embeddings=tied,
    )
    return tf.GPT2LMHeadModel(cfg)


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def workload(name: str, batch: int, seq: int = 128, vocab: int = 50257):
    """(model factory, inputs, targets, loss function) for a named benchmark model."""
    g = torch.Generator().manual_seed(0)
    if name.startswith("mlp") and "x" in name:  # mlp30x16: 30 Linear(16, 16) layers (ReLU); mlp6x512
        depth, width = map(int, name[3:].split("x"))
        factory = lambda: MLP(width, width, width, depth - 1)  # noqa: E731
        x, y = torch.randn(batch, width, generator=g), torch.randint(0, width, (batch,), generator=g)
        return factory, x, y, F.cross_entropy
    if name == "mlp":
        x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return MLP, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name == "cnn":
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return GroupNormCNN, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name == "vit":
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return vit, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name in ("vit-b16", "vit-tiny"):  # ViT-B/16 at 224 px; its CPU dry-run stand-in
        image = 224 if name == "vit-b16" else 32
        factory = (lambda: vit(12, 768, 224, 16, 12, 1000)) if name == "vit-b16" else (lambda: vit(2, 64, 32, 8, 2))
        classes = 1000 if name == "vit-b16" else 10
        x, y = torch.randn(batch, 3, image, image, generator=g), torch.randint(0, classes, (batch,), generator=g)
        return factory, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name in ("wrn16-4", "wrn16-1"):  # WideResNet-16-4 with GroupNorm on 32x32 images; k=1 for dry runs
        factory = (lambda: WideResNet(16, 4)) if name == "wrn16-4" else (lambda: WideResNet(16, 1, groups=4))
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return factory, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name == "gpt2-tiny":  # GPT-2's structure at dry-run size
        factory = lambda: gpt2(layers=2, width=64, seq=seq, vocab=vocab, heads=2)  # noqa: E731
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        return factory, x, x, lambda out, t: F.cross_entropy(logits_of(out).reshape(-1, vocab), t.reshape(-1))
    if name in ("gpt2", "gpt2-124m"):
        if name == "gpt2-124m":
            factory = lambda: gpt2(layers=12, width=768, seq=seq, vocab=vocab)  # noqa: E731
        else:
            factory = lambda: gpt2(seq=seq, vocab=vocab)  # noqa: E731
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        return factory, x, x, lambda out, t: F.cross_entropy(logits_of(out).reshape(-1, vocab), t.reshape(-1))
    raise ValueError(f"unknown benchmark model {name!r}")
