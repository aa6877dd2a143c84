"""Hugging Face architectures beyond GPT-2 and ViT (tiny random configs, float64, dropout off) against the
per-sample reference: encoders with padding masks, an encoder-decoder, audio and vision towers. The
reference is one backward per sample (HF's mask code cannot run under vmap)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from bkfx.testing import assert_matches_reference

pytestmark = pytest.mark.slow  # Hugging Face models against a per-sample loop reference

transformers.logging.set_verbosity_error()

B, L, V = 3, 7, 40
SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=V)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Head(nn.Module):
    """The model called with keyword inputs; its logits (or last hidden state) pooled to `[B, 3]`."""

    def __init__(self, model, names, width):
        super().__init__()
        self.model, self.names = model, names
        self.out = nn.Linear(width, 3)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs)))
        h = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return self.out(h.mean(1) if h.dim() == 3 else h)


def _text():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, mask


MODELS = {
    "bert": lambda: (Head(transformers.BertModel(transformers.BertConfig(**SMALL, **NO_DROPOUT)),
                          ["input_ids", "attention_mask"], 16), _text()),
    "distilbert": lambda: (Head(transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=V, dropout=0.0, attention_dropout=0.0)),
        ["input_ids", "attention_mask"], 16), _text()),
    "opt": lambda: (Head(transformers.OPTModel(transformers.OPTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=V, word_embed_proj_dim=16,
        dropout=0.0, attention_dropout=0.0, use_cache=False)), ["input_ids", "attention_mask"], 16), _text()),
    "qwen2": lambda: (Head(transformers.Qwen2Model(transformers.Qwen2Config(num_key_value_heads=1, use_cache=False,
                                                                            **SMALL)),
                           ["input_ids", "attention_mask"], 16), _text()),
    "t5": lambda: (Head(transformers.T5Model(transformers.T5Config(
        d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=V, dropout_rate=0.0, use_cache=False)),
        ["input_ids", "attention_mask", "decoder_input_ids"], 16), (*_text(), _text()[0])),
    "whisper-encoder": lambda: (Head(transformers.WhisperModel(transformers.WhisperConfig(
        d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
        max_source_positions=8, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, dropout=0.0,
        use_cache=False)).get_encoder(), ["input_features"], 16),
        (torch.randn(B, 8, 16, generator=torch.Generator().manual_seed(2)),)),
    "clip-vision": lambda: (Head(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)),
        ["pixel_values"], 16), (torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(3)),)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_architecture_matches_the_reference(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = model.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(4))
    assert_matches_reference(model, F.cross_entropy, inputs, y, method="loop", max_grad_norm=0.3)
