"""DP fine-tuning with the Hugging Face `Trainer`: `bkfx.integrations.transformers.DPTrainer`.

    pip install -e ".[hf]"
    python examples/train_hf_trainer.py                      # ε = 8, δ = 1e-5, 3 epochs, tiny BERT
    python examples/train_hf_trainer.py --target_epsilon 2 --max_epsilon 1.5 --num_train_epochs 1
    python examples/train_hf_trainer.py --help               # every PrivacyArguments and TrainingArguments flag

A tiny randomly initialised BERT sequence classifier learns a synthetic task (is the first token in
the upper half of the vocabulary?) on padded sequences of random lengths. The flags are
`transformers.HfArgumentParser`'s, read into `DataArguments`, `PrivacyArguments` and
`TrainingArguments`; the example's defaults (DEFAULTS) come first, so a flag given on the command
line overrides them. `DPTrainer` Poisson-samples the training set, compiles the model with bkfx
(clipped per-sample gradients in one backward), adds the noise once per logical batch (split into
physical batches of at most --max_physical_batch_size), calibrates σ to the target ε, logs ε and
δ with the loss (stopping before ε passes --max_epsilon, if given), and evaluates the plain model.
Ends with the privacy report.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import transformers

from bkfx.integrations.transformers import DPTrainer, PrivacyArguments

VOCAB, LENGTH = 32, 12


@dataclass
class DataArguments:
    train_size: int = field(default=1024, metadata={"help": "synthetic training sequences"})
    eval_size: int = field(default=256, metadata={"help": "synthetic held-out sequences"})


DEFAULTS = [  # before the command line's flags, which override them
    "--target_delta", "1e-5", "--per_sample_max_grad_norm", "1.0", "--max_physical_batch_size", "32",
    "--per_device_train_batch_size", "64",  # the expected logical batch size (Poisson sampling)
    "--per_device_eval_batch_size", "256", "--num_train_epochs", "3", "--learning_rate", "5e-3",
    "--lr_scheduler_type", "constant", "--logging_steps", "8", "--eval_strategy", "epoch",
    "--max_grad_norm", "0",  # the Trainer's whole-batch clipping is not DP-SGD's; per-sample clipping is bkfx's
    "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true", "--seed", "0",
]


class Sequences(torch.utils.data.Dataset):
    """Token sequences (right-padded, attention_mask 0 on padding); label 1 iff the first token is >= VOCAB / 2."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        self.ids[self.mask == 0] = 0
        self.labels = (self.ids[:, 0] >= VOCAB // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def accuracy(prediction: transformers.EvalPrediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = transformers.HfArgumentParser((DataArguments, PrivacyArguments, transformers.TrainingArguments))
    # ε = 8 unless the command line fixes σ instead (PrivacyArguments takes exactly one of the two)
    budget = [] if any(a.split("=")[0] in ("--noise_multiplier", "--noise-multiplier") for a in argv) else [
        "--target_epsilon", "8"]
    output = ["--output_dir", tempfile.mkdtemp(prefix="bkfx-hf-")]
    data, privacy, training = parser.parse_args_into_dataclasses(args=DEFAULTS + budget + output + argv)

    start = time.perf_counter()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(training.seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    trainer = DPTrainer(
        model=model, args=training, train_dataset=Sequences(data.train_size, seed=1),
        eval_dataset=Sequences(data.eval_size, seed=2), compute_metrics=accuracy, privacy_args=privacy,
    )
    target = f"for ε = {privacy.target_epsilon}" if privacy.target_epsilon is not None else "given"
    print(f"{data.train_size} training sequences, expected batch {training.per_device_train_batch_size} (sample rate "
          f"{trainer.sample_rate:.4f}), {trainer.planned_steps} steps: noise multiplier {trainer.noise_multiplier:.3f} "
          f"{target} at δ = {privacy.target_delta} ({privacy.accountant})")
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  ε {entry['epsilon']:.3f} at δ {entry['delta']:g}")
        elif "eval_loss" in entry:
            print(f"epoch {entry['epoch']:.0f}  eval loss {entry['eval_loss']:.4f}  eval accuracy {entry['eval_accuracy']:.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    print(trainer.privacy_report())


if __name__ == "__main__":
    main()
