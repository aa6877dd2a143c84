"""DP-SGD with the Hugging Face `Trainer`: `DPTrainer`, a `transformers.Trainer` that trains privately.

    from bkfx.integrations.transformers import DPTrainer, PrivacyArguments

    parser = HfArgumentParser((PrivacyArguments, TrainingArguments))   # --target_epsilon 3 --target_delta 1e-5 ...
    privacy_args, args = parser.parse_args_into_dataclasses()           # or PrivacyArguments(...) in code
    # TrainingArguments: per_device_train_batch_size is the expected logical batch size, max_grad_norm=0 (see below)
    trainer = DPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, privacy_args=privacy_args)
    trainer.train()                      # logs ε and δ with the loss; stops before ε passes max_epsilon
    trainer.evaluate()                   # the plain model: no clipping, no noise, eval mode
    print(trainer.privacy_report())      # ε by RDP and PLD, σ, q, steps

What each part of DP-SGD becomes in the Trainer:

- **Poisson sampling.** Each optimizer step's logical batch holds each training example with
  probability q = per_device_train_batch_size / N (`bkfx.poisson_loader`, seeded from
  `PrivacyArguments.dp_seed`, default `TrainingArguments.seed`); an epoch is round(1/q) steps.
  The Trainer's samplers (shuffling, `group_by_length`) are not used.
- **Clipping.** The model is compiled with `bkfx.compile(loss_reduction="sum")` (`trainer.dp_model`;
  a peft model's base model, where its adapters live), so backward leaves the sum of clipped
  per-sample gradients in `.grad`. The loss is computed per sample (`per_sample_loss`): sample i's
  loss is the loss the model's head computes on sample i alone (a causal LM's shifted token mean
  over its own tokens, a classifier's cross-entropy, ...); pass `per_sample_loss=` for other heads.
- **Physical batches.** A logical batch is split into physical batches of at most
  `max_physical_batch_size` examples inside one `training_step` (gradient accumulation of one
  logical batch); the Trainer's `gradient_accumulation_steps` must stay 1, since Poisson
  batches have no fixed number of parts.
- **Noise.** The Trainer's optimizer is wrapped in a `bkfx.DPOptimizer`: N(0, σ²R²) added once per
  step, the sum divided by the expected batch size q N. σ is `noise_multiplier`, or the smallest
  that keeps the planned steps (`max_steps`, or `num_train_epochs` × round(1/q)) within
  (target_epsilon, target_delta). The LR scheduler steps the wrapped optimizer's param_groups.
- **Accounting.** Every step is recorded in `trainer.accountant`; a `PrivacyCallback` logs ε at
  target_delta with the loss (`epsilon`, `delta`) and, with `max_epsilon`, stops training before
  the step that would take ε above it; `trainer.privacy_report()` prints RDP and PLD side by side.
- **Checkpoints** hold the DPOptimizer's state (noise generators, accountant; `optimizer.pt`) and
  the Poisson sampler's position (`bkfx_sampler.pt`); resuming continues the sampling stream where
  it stopped (the Trainer's own batch skipping is turned off: it would resample steps already taken).
- **Evaluation** runs the Trainer's own loop on the original model (eval mode, no_grad): no
  clipping, no noise, parameters and `.grad` untouched, no privacy spent.

Refused, because they would silently change the mechanism: `TrainingArguments.max_grad_norm > 0`
(it clips the batch's summed gradient before the noise; the per-sample threshold is
`per_sample_max_grad_norm`), `gradient_accumulation_steps != 1`, `fp16` (use bf16 or float32),
several processes or GPUs, `auto_find_batch_size`, `group_by_length`, `dataloader_drop_last`,
`model_init` and `compute_loss_func`. The Trainer's `grad_norm` log entry is not written: it
is the norm of the un-noised clipped sum, a statistic of the private batch. The logged training
loss is not privatised either (as in Opacus); it is for monitoring.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from bkfx._runtime.clipping import CLIPPINGS
from bkfx.dpmodel import compile as bkfx_compile
from bkfx.errors import BkfxError
from bkfx.training.accounting import METHODS, Accountant, _quiet_absl, check_noise_multiplier, noise_multiplier_for
from bkfx.training.adaptive import AdaptiveClipping, gradient_noise_multiplier
from bkfx.training.data import (
    PoissonSampler,
    batch_size_of,
    check_physical_batch_size,
    poisson_loader,
    split_physical_batches,
)
from bkfx.training.optimizer import DPOptimizer
from bkfx.training.report import PrivacyReport, privacy_report

SAMPLER_FILE = "bkfx_sampler.pt"  # the Poisson sampler's position, beside the Trainer's rng_state.pth

IGNORE_INDEX = -100  # the label Hugging Face's token losses skip

__all__ = ["DPTrainer", "PrivacyArguments", "PrivacyCallback", "per_sample_loss"]


STYLES = ("all-layer", "layer-wise", "param-wise")  # the clipping styles the command line names
# the command line's choices are these tuples themselves: Literal[("a", "b")] is Literal["a", "b"]


def _help(text: str, **options) -> dict:
    return dict(metadata={"help": text}, **options)


@dataclass
class PrivacyArguments:
    """The DP side of a `DPTrainer` run; the rest is `TrainingArguments`.

    Every field has a type `transformers.HfArgumentParser` reads from the command line, beside
    `TrainingArguments`:

        parser = HfArgumentParser((PrivacyArguments, TrainingArguments))
        privacy_args, training_args = parser.parse_args_into_dataclasses()

    target_delta: δ, for calibrating σ and for the ε that is logged and reported.
    target_epsilon | noise_multiplier: exactly one; target_epsilon calibrates σ to the planned steps.
    max_epsilon: training stops before the step that would take ε above it (`PrivacyCallback`).
    per_sample_max_grad_norm, clipping, style: `bkfx.compile`'s max_grad_norm, clipping, style. The
        command line names a style; in code, style may also be a list of lists of parameter names
        or a callable from parameter name to group key, as `bkfx.compile` takes.
    max_physical_batch_size: bound on the examples per forward/backward (None: the whole logical batch).
    accountant: "rdp" or "pld", for the calibration and the logged ε.
    dp_seed: seeds the Poisson sampling and the noise (two independent streams, as `bkfx.make_private`);
        None takes `TrainingArguments.seed`. (`seed=` is its deprecated name: on the command line it
        would clash with `TrainingArguments.seed`.)
    compile_options: more `bkfx.compile` options (norm_mode, memory_budget, batch_dim, ...): a dict,
        or on the command line a JSON object, as `TrainingArguments` takes its dict fields.
    adaptive_clipping: a `bkfx.AdaptiveClipping` (R then follows a quantile of the norms, starting at
        per_sample_max_grad_norm), or on the command line a JSON object of its fields;
        noise_multiplier is the gradient's z_Δ, and target_epsilon calibrates the combined z of
        gradient and count (as `bkfx.make_private`).
    """

    target_delta: float = field(**_help("δ of the (ε, δ) guarantee: σ is calibrated and ε is logged at this δ "
                                        "(keep it below 1 / the number of training examples)"))
    target_epsilon: float | None = field(default=None, **_help(
        "ε to reach after the planned steps (max_steps, or num_train_epochs × round(1/q)): calibrates the noise "
        "multiplier; give this or noise_multiplier"))
    noise_multiplier: float | None = field(default=None, **_help(
        "σ: the noise's standard deviation over the clipping threshold; give this or target_epsilon"))
    max_epsilon: float | None = field(default=None, **_help(
        "stop training before the step that would take ε (at target_delta) above this"))
    per_sample_max_grad_norm: float = field(default=1.0, **_help("R: each sample's gradient is clipped to norm R"))
    clipping: Literal[CLIPPINGS] = field(default="abadi", **_help(
        "abadi: min(1, R/‖g_i‖); automatic: R/(‖g_i‖ + gamma)"))
    style: Literal[STYLES] = field(default="all-layer", **_help(
        "clip the whole gradient (all-layer), each layer's or each parameter's apart, each to norm R"))
    max_physical_batch_size: int | None = field(default=None, **_help(
        "at most this many examples per forward and backward (a logical batch is split); default the whole batch"))
    accountant: Literal[METHODS] = field(default="rdp", **_help(
        "the privacy accountant of the calibration and of the logged ε: rdp, or pld (tighter, slower)"))
    dp_seed: int | None = field(default=None, **_help(
        "seeds the Poisson sampling and the noise (two independent streams); default TrainingArguments' seed"))
    compile_options: dict | str | None = field(default_factory=dict, **_help(
        "more bkfx.compile options, as a JSON object, e.g. '{\"norm_mode\": \"ghost\"}'"))
    adaptive_clipping: AdaptiveClipping | str | None = field(default=None, **_help(
        "adaptive clipping (bkfx.AdaptiveClipping) as a JSON object of its fields, e.g. "
        "'{\"count_noise_multiplier\": 10, \"target_unclipped_quantile\": 0.5}'"))

    def __post_init__(self):
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("pass exactly one of target_epsilon= (σ is then calibrated) and noise_multiplier=")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ValueError(f"max_epsilon must be positive, got {self.max_epsilon}")
        if self.noise_multiplier is not None:
            check_noise_multiplier(self.noise_multiplier)
        if self.max_physical_batch_size is not None:
            check_physical_batch_size(self.max_physical_batch_size)
        if self.accountant not in METHODS:
            raise ValueError(f"accountant must be one of {METHODS}, got {self.accountant!r}")
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {CLIPPINGS}, got {self.clipping!r}")
        if isinstance(self.style, str) and self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, a list of lists of parameter names or a callable, "
                             f"got {self.style!r}")
        self.compile_options = _json_object("compile_options", self.compile_options) or {}
        if isinstance(self.adaptive_clipping, str):
            fields = _json_object("adaptive_clipping", self.adaptive_clipping)
            try:
                self.adaptive_clipping = AdaptiveClipping(**fields)
            except TypeError as e:
                raise ValueError(f"adaptive_clipping: {e} (the fields are those of bkfx.AdaptiveClipping)") from None
        if self.adaptive_clipping is not None and not isinstance(self.adaptive_clipping, AdaptiveClipping):
            raise TypeError(f"adaptive_clipping must be a bkfx.AdaptiveClipping, got {type(self.adaptive_clipping).__name__}")
        reserved = {"max_grad_norm", "clipping", "style", "loss_reduction"} & set(self.compile_options)
        if reserved:
            raise ValueError(f"compile_options cannot set {sorted(reserved)}: they are fields of PrivacyArguments "
                             "(the loss is always summed over samples)")


# `seed` is dp_seed's former name, kept as a deprecated keyword and attribute outside the dataclass's
# fields: as a field it would clash with TrainingArguments.seed in HfArgumentParser.
def _accepting_seed(init: Callable) -> Callable:
    @functools.wraps(init)
    def __init__(self, *args, seed: int | None = None, **kwargs):
        if seed is not None:
            warnings.warn("PrivacyArguments(seed=) is renamed dp_seed= (seed clashes with TrainingArguments.seed "
                          "in HfArgumentParser)", DeprecationWarning, stacklevel=2)
            if kwargs.get("dp_seed") not in (None, seed):
                raise ValueError(f"seed={seed} and dp_seed={kwargs['dp_seed']} disagree: pass only dp_seed=")
            kwargs["dp_seed"] = seed
        init(self, *args, **kwargs)
    return __init__


def _deprecated_seed(self) -> int | None:
    warnings.warn("PrivacyArguments.seed is renamed dp_seed", DeprecationWarning, stacklevel=2)
    return self.dp_seed


PrivacyArguments.__init__ = _accepting_seed(PrivacyArguments.__init__)
PrivacyArguments.seed = property(_deprecated_seed)


def _json_object(name: str, value) -> dict | None:
    """A dict field as code passes it, or as the command line does: a JSON object."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a dict (or a JSON object string), got {type(value).__name__}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be a JSON object, got {value!r}: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return parsed


# ---- per-sample losses of Hugging Face heads ---------------------------------------------------

_HEADS = {  # model.loss_type (or the class name's suffix) -> the loss of one sample
    "ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForMaskedLM": "token", "ForTokenClassification": "token",
    "ForSequenceClassification": "sequence",
}


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model itself: a peft model's base model (its adapters are injected there)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head(model: nn.Module) -> str:
    model = _base_model(model)
    kind = getattr(model, "loss_type", None)
    if kind in _HEADS:
        return _HEADS[kind]
    name = type(model).__name__
    for suffix, head in _HEADS.items():
        if name.endswith(suffix):
            return head
    raise BkfxError(
        f"DPTrainer does not know the per-sample loss of {name}\n"
        "  what to do: pass per_sample_loss=fn to DPTrainer, fn(outputs, labels) returning a [B] tensor whose entry i "
        "is the loss of sample i alone"
    )


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean cross-entropy over its own tokens whose label is not -100 (0 if none)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # as Hugging Face's losses
    tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    counts = (labels != IGNORE_INDEX).flatten(1).sum(1)
    return tokens.view(labels.shape[0], -1).sum(1) / counts.clamp(min=1)


def per_sample_loss(model: nn.Module, outputs, labels: torch.Tensor) -> torch.Tensor:
    """`[B]`: entry i is the loss `model`'s head computes with `labels` on sample i alone.

    causal LM: logits at t predict label t + 1, mean over the sample's labels that are not -100;
    masked LM, token classification: the same without the shift; sequence classification, by
    `config.problem_type` as Hugging Face decides it: mean squared error (regression),
    cross-entropy (single label), binary cross-entropy with logits averaged over the labels
    (multi-label).
    """
    head = _head(model)
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
    if head == "causal-lm":
        return _token_mean(logits[:, :-1], labels[:, 1:])
    if head == "token":
        return _token_mean(logits, labels)
    config = _base_model(model).config
    num_labels = config.num_labels
    problem = config.problem_type or (
        "regression" if num_labels == 1
        else "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"
    )
    if problem == "regression":
        target = labels.to(logits.dtype).reshape(logits.shape)
        return (logits - target).pow(2).flatten(1).mean(1)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), reduction="none")
    losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return losses.flatten(1).mean(1)


# ---- privacy spent, in the Trainer's logs -----------------------------------------------------

logger = logging.getLogger(__name__)


def _find_dp_optimizer(optimizer) -> DPOptimizer | None:
    """The DPOptimizer inside the Trainer's optimizer (accelerate wraps it), or None."""
    while optimizer is not None and not isinstance(optimizer, DPOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class PrivacyCallback(TrainerCallback):
    """Writes ε at δ into the Trainer's training logs, and stops training before ε would pass `max_epsilon`.

    Works with any `transformers.Trainer` whose optimizer is a `bkfx.DPOptimizer` with an
    accountant; `DPTrainer` adds one itself (from `PrivacyArguments.target_delta` and `max_epsilon`).

    Logs: each log with a training loss (`loss`, and `train_loss` at the end) gets `epsilon`
    (ε_t at δ after the t steps taken, by the accountant) and `delta`. The Trainer appends an
    entry to `state.log_history` just before `on_log`; the callback writes the same keys there.

    Stopping: after step t, the accountant is asked for ε_{t+1}, its history composed with one
    more step as the optimizer will charge it (its accounted σ and sample rate q). If
    ε_{t+1} > max_epsilon, training stops now (`control.should_training_stop`), step t is logged
    with `epsilon_next_step` = ε_{t+1}, and a warning says why; so ε_T ≤ max_epsilon for the
    steps T taken. The Trainer always runs a first step, so a run whose first step would already
    pass max_epsilon (or a resumed run whose budget is spent) is refused at `on_train_begin`.
    """

    def __init__(self, delta: float, max_epsilon: float | None = None):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be positive, got {max_epsilon}")
        self.delta, self.max_epsilon = delta, max_epsilon
        self.optimizer: DPOptimizer | None = None
        self.stopped_at: int | None = None  # the last step taken when max_epsilon stopped training
        self._next_epsilon: float | None = None
        self._spent: dict = {}  # (method, history) -> ε at δ

    def epsilon(self) -> float:
        """ε_t at δ of the steps taken so far."""
        return self._epsilon_of(self.optimizer.accountant)

    def epsilon_after_next_step(self) -> float:
        """ε_{t+1} at δ: the steps taken and one more, charged as the optimizer charges a step."""
        accountant = self.optimizer.accountant
        probe = Accountant(accountant.method)
        probe.load_state_dict(accountant.state_dict())
        last = accountant.history[-1] if accountant.history else None
        probe.step(noise_multiplier=self.optimizer.accounted_noise_multiplier, sample_rate=self.optimizer.sample_rate,
                   truncation_probability=last.truncation if last is not None else 0.0)
        return self._epsilon_of(probe)

    def _epsilon_of(self, accountant: Accountant) -> float:
        # ε_{t+1} asked after step t is the ε_t+1 logged after step t+1: each history is composed once
        key = (accountant.method, tuple(accountant.history))
        if key not in self._spent:
            with _quiet_absl():
                spent = accountant.epsilon(self.delta)
            self._spent = {k: v for k, v in list(self._spent.items())[-3:]}  # the last few histories are enough
            self._spent[key] = spent
        return self._spent[key]

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = _find_dp_optimizer(optimizer)
        if self.optimizer is None or self.optimizer.accountant is None:
            raise BkfxError(
                "PrivacyCallback reads the privacy spent from the Trainer's optimizer, which is not a bkfx.DPOptimizer "
                "with an accountant\n  what to do: train with DPTrainer, or pass optimizers=(DPOptimizer(..., "
                "accountant=bkfx.Accountant(), sample_rate=q), scheduler) to the Trainer"
            )
        self.stopped_at = None
        if self.max_epsilon is not None:
            following = self.epsilon_after_next_step()
            if following > self.max_epsilon:
                raise BkfxError(
                    f"the next step would take ε to {following:.4g} at δ = {self.delta:g}, above max_epsilon = "
                    f"{self.max_epsilon:g} ({self.optimizer.accountant.steps} steps taken), and the Trainer cannot stop "
                    "before its first step\n  what to do: raise max_epsilon or the noise multiplier, or lower the "
                    "sample rate (per_device_train_batch_size / N)"
                )

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_epsilon is None or state.global_step >= state.max_steps:
            return  # no budget, or the run ends here anyway
        following = self.epsilon_after_next_step()
        if following > self.max_epsilon:
            control.should_training_stop = True
            control.should_log = True  # the last step's ε goes in the logs, with the reason
            self.stopped_at, self._next_epsilon = state.global_step, following
            logger.warning(
                "stopping after step %d: ε = %.4g at δ = %g, and step %d would take it to %.4g > max_epsilon = %g",
                state.global_step, self.epsilon(), self.delta, state.global_step + 1, following, self.max_epsilon)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not ("loss" in logs or "train_loss" in logs) or self.optimizer is None:
            return
        # the Trainer appended this log's entry to log_history just before calling on_log
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and {k: v for k, v in entry.items() if k != "step"} != logs:
            entry = None
        spent = {"epsilon": self.epsilon(), "delta": self.delta}
        if self.stopped_at is not None and self.stopped_at == state.global_step and "loss" in logs:
            spent["epsilon_next_step"] = self._next_epsilon
        logs.update(spent)
        if entry is not None:
            entry.update(spent)


# ---- the trainer ------------------------------------------------------------------------------

class DPTrainer(Trainer):
    """A `transformers.Trainer` that trains with DP-SGD (see the module docstring).

    per_sample_loss: fn(outputs, labels) -> [B] losses, one per sample; default the head's own
    loss per sample (`bkfx.integrations.transformers.per_sample_loss`).
    Attributes: `dp_model` (the compiled model), `accountant`, `noise_multiplier`, `sample_rate`,
    `expected_batch_size`, `planned_steps`, `privacy_callback` (the `PrivacyCallback` that logs ε
    and enforces max_epsilon, first among the callbacks); `dp_optimizer` once training has created
    the optimizer.
    """

    def __init__(self, model: nn.Module | None = None, args=None, *, privacy_args: PrivacyArguments,
                 per_sample_loss: Callable | None = None, **trainer_options):
        if not isinstance(privacy_args, PrivacyArguments):
            raise TypeError(f"privacy_args must be a PrivacyArguments, got {type(privacy_args).__name__}")
        if trainer_options.get("model_init") is not None:
            raise ValueError("DPTrainer compiles one model: pass model=, not model_init=")
        if trainer_options.get("compute_loss_func") is not None:
            raise ValueError("DP-SGD needs the loss of each sample: pass per_sample_loss=fn (fn(outputs, labels) -> [B]) "
                             "instead of compute_loss_func=")
        if model is None:
            raise ValueError("DPTrainer needs model=")
        if any(isinstance(c, PrivacyCallback) or c is PrivacyCallback for c in trainer_options.get("callbacks") or ()):
            raise ValueError("DPTrainer adds its own PrivacyCallback (from PrivacyArguments.target_delta and max_epsilon): "
                             "do not pass one in callbacks=")
        super().__init__(model=model, args=args, **trainer_options)
        self.privacy_args = privacy_args
        self.privacy_callback = PrivacyCallback(privacy_args.target_delta, privacy_args.max_epsilon)
        # first in line: the reporting callbacks and the printer then see ε in the logs
        self.callback_handler.callbacks.insert(0, self.privacy_callback)
        self._check_training_arguments()
        self._per_sample_loss = per_sample_loss
        if per_sample_loss is None:
            _head(self.model)  # unknown heads are refused now, not at the first step

        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError("DPTrainer needs a map-style train_dataset (with __len__): Poisson sampling draws from all N examples")
        num_samples = len(dataset)
        batch = self.args.per_device_train_batch_size
        if not 0 < batch <= num_samples:
            raise ValueError(f"per_device_train_batch_size (the expected logical batch size) must be in [1, {num_samples}], "
                             f"got {batch}")
        self.expected_batch_size = batch
        self.sample_rate = batch / num_samples
        steps_per_epoch = PoissonSampler(num_samples, self.sample_rate, seed=0).steps
        self.planned_steps = (self.args.max_steps if self.args.max_steps > 0
                              else math.ceil(self.args.num_train_epochs * steps_per_epoch))
        if privacy_args.noise_multiplier is not None:
            self.noise_multiplier = float(privacy_args.noise_multiplier)
        else:
            self.noise_multiplier = noise_multiplier_for(
                privacy_args.target_epsilon, self.sample_rate, self.planned_steps, privacy_args.target_delta,
                privacy_args.accountant,
            )
            if privacy_args.adaptive_clipping is not None:  # the calibrated σ is the pair's: the gradient gets z_Δ
                self.noise_multiplier = gradient_noise_multiplier(
                    self.noise_multiplier, privacy_args.adaptive_clipping.count_noise_multiplier)
        seed = privacy_args.dp_seed if privacy_args.dp_seed is not None else self.args.seed
        sampling_seed, noise_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))  # as make_private
        self._sampling_generator = torch.Generator().manual_seed(sampling_seed)  # one stream over every epoch and train()
        self._train_sampler = None  # the PoissonSampler of the last training loader (its position goes in checkpoints)
        self._resumed_sampler = None  # a checkpoint's sampler position, for the next training loader
        self._noise_seed = noise_seed
        self.accountant = Accountant(privacy_args.accountant)
        trainable = _base_model(self.model)
        self.dp_model = bkfx_compile(
            trainable, max_grad_norm=privacy_args.per_sample_max_grad_norm, clipping=privacy_args.clipping,
            style=privacy_args.style, loss_reduction="sum", **privacy_args.compile_options,
        )
        if self.args.torch_compile:  # HF compiles the model it evaluates; the DP step is compiled by bkfx
            self.dp_model.compile(backend=self.args.torch_compile_backend or "inductor", mode=self.args.torch_compile_mode)
        self._forward_options = {"use_cache": False} if "use_cache" in inspect.signature(trainable.forward).parameters else {}
        if len(self.label_names) != 1:
            raise ValueError(f"DPTrainer needs exactly one label field, got label_names={self.label_names}")

    def _check_training_arguments(self) -> None:
        args = self.args
        refusals = [
            (args.max_grad_norm not in (None, 0),
             f"TrainingArguments.max_grad_norm={args.max_grad_norm} clips the batch's summed gradient before the noise, "
             "which is not DP-SGD: set max_grad_norm=0 (the per-sample threshold is PrivacyArguments.per_sample_max_grad_norm)"),
            (args.gradient_accumulation_steps != 1,
             "Poisson-sampled logical batches have no fixed number of parts: keep gradient_accumulation_steps=1, set "
             "per_device_train_batch_size to the expected logical batch size and bound memory with "
             "PrivacyArguments.max_physical_batch_size"),
            (args.fp16, "fp16 needs a GradScaler in the DP step; train in bf16 (bf16=True) or float32"),
            (args.world_size > 1 or args.n_gpu > 1, "DPTrainer trains on one process and one device"),
            (getattr(args, "auto_find_batch_size", False), "auto_find_batch_size would change the sample rate; use max_physical_batch_size"),
            (getattr(args, "group_by_length", False), "group_by_length does not apply: batches are Poisson samples"),
            (getattr(args, "dataloader_drop_last", False), "dataloader_drop_last does not apply: batches are Poisson samples"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"DPTrainer: {why}")

    # -- the optimizer: DPOptimizer around the Trainer's -----------------------------------
    @property
    def dp_optimizer(self) -> DPOptimizer | None:
        """The DPOptimizer the Trainer steps (inside accelerate's wrapper, if any)."""
        return _find_dp_optimizer(self.optimizer)

    def create_optimizer(self, *args, **kwargs):
        if self.dp_optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(*args, **kwargs)
        trainable = {id(p) for p in self.dp_model.parameters() if p.requires_grad}
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not stepped <= {id(p) for p in self.dp_model.parameters()}:
            raise ValueError("the optimizer updates parameters that are not the model's")
        if trainable - stepped:
            raise ValueError("the optimizer leaves some trainable parameters out: their clipped gradients would be "
                             "computed and not used; freeze them (requires_grad=False) or give them to the optimizer")
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size,
            seed=self._noise_seed, model=self.dp_model, accountant=self.accountant, sample_rate=self.sample_rate,
            adaptive_clipping=self.privacy_args.adaptive_clipping,
        )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if optimizer is None and self.dp_optimizer is not None:
            dp = self.dp_optimizer
            # the scheduler sets the learning rates of the param_groups the DPOptimizer steps
            optimizer = dp if isinstance(dp, torch.optim.Optimizer) else dp.optimizer
        return super().create_scheduler(num_training_steps, optimizer=optimizer)

    # -- data: Poisson-sampled logical batches ----------------------------------------------
    def get_train_dataloader(self):
        dataset, collate_fn = self.train_dataset, self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate_fn = self._get_collator_with_removed_columns(collate_fn, description="training")
        loader = poisson_loader(
            dataset, self.sample_rate, generator=self._sampling_generator, collate_fn=collate_fn,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        if self._resumed_sampler is not None:
            loader.batch_sampler.load_state_dict(self._resumed_sampler)
            self._resumed_sampler = None
        self._train_sampler = loader.batch_sampler
        return loader

    # -- checkpoints: the sampler's position travels with them ------------------------------
    # The DPOptimizer's state (noise generators, accountant) is in the Trainer's optimizer.pt. The
    # Poisson sampler's position is saved beside it and restored on resume, and the Trainer does not
    # skip batches itself (ignore_data_skip): skipping would draw the skipped batches from a fresh
    # sampler, i.e. resample the steps already taken and repeat their randomness.
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._train_sampler is not None:
            torch.save(self._train_sampler.state_dict(), os.path.join(output_dir, SAMPLER_FILE))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in output_dir {self.args.output_dir!r} to resume from")
        path = os.path.join(resume_from_checkpoint, SAMPLER_FILE)
        if not os.path.isfile(path):
            raise BkfxError(
                f"the checkpoint {resume_from_checkpoint!r} has no Poisson sampler position ({SAMPLER_FILE}): resuming "
                "would draw the logical batches again from the start of the sampling stream, repeating the randomness "
                "of steps already taken (their batches would not be independent of the new ones, as the privacy "
                "accounting assumes)\n  what to do: resume from a checkpoint DPTrainer saved, or start a new run"
            )
        self._resumed_sampler = torch.load(path, weights_only=False)
        skip, self.args.ignore_data_skip = self.args.ignore_data_skip, True
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.args.ignore_data_skip = skip

    # -- one DP step's gradients: every physical batch of a logical batch -----------------------
    def per_sample_losses(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """`[B]` losses of one physical batch: `per_sample_loss=`, or the model head's own loss per sample."""
        if self._per_sample_loss is not None:
            return self._per_sample_loss(outputs, labels)
        return per_sample_loss(self.model, outputs, labels)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of each physical batch of the logical batch `inputs` through the
        compiled model, the per-sample losses summed: `.grad` ends with the sum of clipped
        per-sample gradients of the whole logical batch. Returns the mean loss of its samples."""
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        label_name = self.label_names[0]
        if label_name not in inputs:
            raise ValueError(f"the training batch has no {label_name!r} field (the labels); it has {sorted(inputs)}")
        labels = inputs.pop(label_name)
        size = batch_size_of((inputs, labels))
        total = torch.zeros((), device=self.args.device)
        # an empty logical batch contributes nothing: its step is noise only
        parts = split_physical_batches((inputs, labels), self.privacy_args.max_physical_batch_size or size) if size else []
        for part, part_labels in parts:
            with self.compute_loss_context_manager():
                outputs = self.dp_model(**part, **self._forward_options)
                losses = self.per_sample_losses(outputs, part_labels)
            if losses.shape != (part_labels.shape[0],):
                raise BkfxError(f"the per-sample loss must have shape [B] = [{part_labels.shape[0]}], one loss per "
                                f"sample, got {list(losses.shape)}")
            losses.sum().backward()
            total += losses.detach().sum().to(total.dtype)
        return total / max(size, 1)

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # the norm of the un-noised clipped sum is a statistic of the private batch: not logged

    # -- privacy spent -------------------------------------------------------------------------
    def epsilon(self) -> float:
        """ε at target_delta of the steps taken so far, by the accountant of PrivacyArguments."""
        with _quiet_absl():
            return self.accountant.epsilon(self.privacy_args.target_delta)

    def privacy_report(self) -> PrivacyReport:
        """ε at target_delta by RDP and by PLD, σ, q and the steps taken so far."""
        return privacy_report(self.accountant, delta=self.privacy_args.target_delta)


def _is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)
