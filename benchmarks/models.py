"""The benchmark models and their batches: an MLP, a GroupNorm CNN, a small ViT and a GPT-2."""
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


def _hf_quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def vit(layers=4, width=256, image=32, patch=4):
    tf = _hf_quiet()
    cfg = tf.ViTConfig(
        image_size=image, patch_size=patch, num_channels=3, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=4 * width, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.ViTForImageClassification(cfg)


def gpt2(layers=4, width=256, seq=128, vocab=50257, tied=False):
    """HF GPT-2. Untied output head by default: Opacus's ghost clipping refuses tied parameters,
    and every method must train the same model (bkfx's tied path is timed by gpt2_step.py)."""
    tf = _hf_quiet()
    cfg = tf.GPT2Config(
        n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab, n_positions=max(seq, 128),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, tie_word_embeddings=tied,
    )
    return tf.GPT2LMHeadModel(cfg)


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def workload(name: str, batch: int, seq: int = 128, vocab: int = 50257):
    """(model factory, inputs, targets, loss function) for a named benchmark model."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return MLP, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name == "cnn":
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return GroupNormCNN, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name == "vit":
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return vit, x, y, lambda out, t: F.cross_entropy(logits_of(out), t)
    if name in ("gpt2", "gpt2-124m"):
        if name == "gpt2-124m":
            factory = lambda: gpt2(layers=12, width=768, seq=seq, vocab=vocab)  # noqa: E731
        else:
            factory = lambda: gpt2(seq=seq, vocab=vocab)  # noqa: E731
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        return factory, x, x, lambda out, t: F.cross_entropy(logits_of(out).reshape(-1, vocab), t.reshape(-1))
    raise ValueError(f"unknown benchmark model {name!r}")
