"""DP fine-tuning with the Hugging Face `Trainer`: `bkfx.integrations.transformers.DPTrainer`.

    pip install -e ".[hf]"
    python examples/train_hf_trainer.py                      # ε = 8, δ = 1e-5, 3 epochs, tiny BERT
    python examples/train_hf_trainer.py --target-epsilon 2

A tiny randomly initialised BERT sequence classifier learns a synthetic task (is the first token in
the upper half of the vocabulary?) on padded sequences of random lengths. `DPTrainer` Poisson-samples the training set,
compiles the model with bkfx (clipped per-sample gradients in one backward), adds the noise once
per logical batch (split into physical batches of at most --max-physical-batch-size), calibrates
σ to the target ε, logs ε with the loss, and evaluates the plain model. Ends with the privacy report.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

from bkfx.integrations.transformers import DPTrainer, PrivacyArguments

VOCAB, LENGTH = 32, 12


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
    ap = argparse.ArgumentParser(description="DP fine-tuning with the Hugging Face Trainer and bkfx")
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="expected logical batch size (Poisson sampling)")
    ap.add_argument("--max-physical-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping threshold")
    ap.add_argument("--train-size", type=int, default=1024)
    ap.add_argument("--accountant", default="rdp", choices=["rdp", "pld"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bkfx-hf-"), report_to="none", save_strategy="no", use_cpu=True,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=8, eval_strategy="epoch",
        max_grad_norm=0,  # the Trainer's whole-batch clipping is not DP-SGD's; per-sample clipping is below
        disable_tqdm=True, seed=args.seed,
    )
    trainer = DPTrainer(
        model=model, args=training, train_dataset=Sequences(args.train_size, seed=1),
        eval_dataset=Sequences(256, seed=2), compute_metrics=accuracy,
        privacy_args=PrivacyArguments(
            target_epsilon=args.target_epsilon, target_delta=args.delta, per_sample_max_grad_norm=args.max_grad_norm,
            max_physical_batch_size=args.max_physical_batch_size, accountant=args.accountant, seed=args.seed),
    )
    print(f"{args.train_size} training sequences, expected batch {args.batch_size} (sample rate "
          f"{trainer.sample_rate:.4f}), {trainer.planned_steps} steps: noise multiplier {trainer.noise_multiplier:.3f} "
          f"for ε = {args.target_epsilon} at δ = {args.delta} ({args.accountant})")
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  ε {entry['epsilon']:.3f}")
        elif "eval_loss" in entry:
            print(f"epoch {entry['epoch']:.0f}  eval loss {entry['eval_loss']:.4f}  eval accuracy {entry['eval_accuracy']:.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    print(trainer.privacy_report())


if __name__ == "__main__":
    main()
