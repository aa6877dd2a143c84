"""Integrations of bkfx with training frameworks, each in its own module and imported on demand
(`import bkfx` imports none of them, so their frameworks stay optional):

- `bkfx.integrations.transformers`: `DPTrainer`, a Hugging Face `transformers.Trainer` that trains privately.
"""
