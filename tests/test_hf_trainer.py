"""`bkfx.integrations.transformers.DPTrainer` against bkfx by hand: the same Poisson batches, the
same clipped sums and the same noise as `bkfx.make_private` + `DPOptimizer` in a plain loop, step by
step, in float64; ε logged as the accountant computes it; evaluation outside the DP mechanism."""
from __future__ import annotations

import copy
import logging
import subprocess
import sys

import accelerate  # noqa: F401  (the Trainer needs it)
import pytest
import torch
import torch.nn.functional as F
import transformers

import bkfx
from bkfx.errors import BkfxError
from bkfx.integrations.transformers import DPTrainer, PrivacyArguments, PrivacyCallback, per_sample_loss
from bkfx.training.adaptive import combined_noise_multiplier

transformers.logging.set_verbosity_error()

V, T, N = 20, 6, 24  # vocabulary, sequence length, training examples


def gpt2_lm(dropout: float = 0.0):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V, n_positions=T,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config).double()


def bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=T, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double()


class Synthetic(torch.utils.data.Dataset):
    """Token sequences with right padding (attention_mask 0, label -100 for an LM) of random lengths."""

    def __init__(self, n: int, task: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        self.mask = (torch.arange(T) < lengths[:, None]).long()
        self.labels = (self.ids.masked_fill(self.mask == 0, -100) if task == "lm"
                       else torch.randint(0, 3, (n,), generator=g))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


MODELS = {"gpt2-lm": (gpt2_lm, "lm"), "bert-classifier": (bert_classifier, "classification")}


def hand_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_i of sample i's loss, written out: an LM's shifted token mean over its own tokens, or cross-entropy."""
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="sum")
    total = logits.new_zeros(())
    for lg, y in zip(logits, labels):
        total = total + F.cross_entropy(lg[:-1], y[1:], ignore_index=-100)
    return total


def training_args(tmp_path, **options):
    base = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                disable_tqdm=True, max_grad_norm=0, lr_scheduler_type="constant", learning_rate=0.5,
                per_device_train_batch_size=8, dataloader_pin_memory=False, seed=3)
    return transformers.TrainingArguments(**{**base, **options})


class Snapshots(transformers.TrainerCallback):
    """The parameters after every optimizer step."""

    def __init__(self, model):
        self.model, self.after_step = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append({n: p.detach().clone() for n, p in self.model.named_parameters()})


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def by_hand(model, task, dataset, steps, *, noise_multiplier, max_grad_norm, seed, batch_size, physical,
            on_step=None, **private):
    """The same training with bkfx's own pieces: make_private (Poisson loader, compiled model, DPOptimizer)
    and a plain loop; returns the parameters after each step."""
    dp_model, optimizer, loader, _ = bkfx.make_private(
        model, sgd(model), dataset, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        batch_size=batch_size, loss_reduction="sum", seed=seed, max_physical_batch_size=physical, **private,
    )
    options = {"use_cache": False} if task == "lm" else {}  # HF's cache is not a tensor output
    after = []
    while len(after) < steps:
        for batch in loader:
            labels = batch.pop("labels")
            if len(labels):
                hand_loss(task, dp_model(**batch, **options).logits, labels).backward()
            stepped = optimizer.logical_batch_complete
            optimizer.step()
            optimizer.zero_grad()
            if stepped:
                after.append({n: p.detach().clone() for n, p in model.named_parameters()})
                if on_step is not None:
                    on_step(optimizer)
            if len(after) == steps:
                break
    return after


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_each_step_equals_bkfx_and_dp_optimizer_by_hand(name, tmp_path):
    make, task = MODELS[name]
    model, dataset = make(), Synthetic(N, task, seed=1)
    reference_model = copy.deepcopy(model)
    steps, sigma, R, seed = 3, 2.0, 0.3, 11
    snapshots = Snapshots(model)
    trainer = DPTrainer(
        model=model, args=training_args(tmp_path, max_steps=steps), train_dataset=dataset,
        optimizers=(sgd(model), None), callbacks=[snapshots],
        privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=sigma, per_sample_max_grad_norm=R,
                                      max_physical_batch_size=3, dp_seed=seed),
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    expected = by_hand(reference_model, task, dataset, steps, noise_multiplier=sigma, max_grad_norm=R, seed=seed,
                       batch_size=8, physical=3)
    assert len(snapshots.after_step) == steps == trainer.state.global_step == trainer.dp_optimizer.steps
    for got, want in zip(snapshots.after_step, expected):
        for n in want:
            assert torch.equal(got[n], want[n]), n
    assert all(not torch.equal(initial[n], expected[-1][n]) for n in initial)
    assert trainer.accountant.steps == steps

    # ε is logged with the loss after every step, grows, and is the accountant's
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == list(range(1, steps + 1))
    eps = [e["epsilon"] for e in logged]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    for k, e in enumerate(eps, start=1):
        assert e == bkfx.epsilon(sigma, 8 / N, k, 1e-5)
    assert all(e["delta"] == 1e-5 for e in logged)
    assert "grad_norm" not in logged[0]  # the un-noised sum's norm is not logged
    report = trainer.privacy_report()
    assert (report.steps, report.noise_multiplier, report.sample_rate) == (steps, sigma, 8 / N)
    assert report.epsilon_rdp == eps[-1] and report.epsilon_pld == bkfx.epsilon(sigma, 8 / N, steps, 1e-5, "pld")
    assert report.epsilon_pld < report.epsilon_rdp


def test_adaptive_clipping_from_the_command_line_steps_as_make_private_does(tmp_path):
    """`--adaptive_clipping '{...}'` through HfArgumentParser: each step's parameters and threshold R
    equal make_private's with the same AdaptiveClipping (the noised count, then R's update), R moves
    from its start, and the accountant charges the pair's combined noise multiplier."""
    model, dataset = gpt2_lm(), Synthetic(N, "lm", seed=1)
    reference_model = copy.deepcopy(model)
    parser = transformers.HfArgumentParser(PrivacyArguments)
    (privacy_args,) = parser.parse_args_into_dataclasses(args=[
        "--target_delta", "1e-5", "--noise_multiplier", "2.0", "--per_sample_max_grad_norm", "0.3",
        "--max_physical_batch_size", "3", "--dp_seed", "11",
        "--adaptive_clipping", '{"count_noise_multiplier": 4.0, "target_unclipped_quantile": 0.7, "learning_rate": 0.5}'])
    steps = 3
    snapshots, thresholds = Snapshots(model), []

    class Thresholds(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            thresholds.append(trainer.dp_optimizer.max_grad_norm)

    trainer = DPTrainer(model=model, args=training_args(tmp_path, max_steps=steps), train_dataset=dataset,
                        optimizers=(sgd(model), None), callbacks=[snapshots, Thresholds()], privacy_args=privacy_args)
    trainer.train()
    expected_thresholds = []
    expected = by_hand(reference_model, "lm", dataset, steps, noise_multiplier=2.0, max_grad_norm=0.3, seed=11,
                       batch_size=8, physical=3, adaptive_clipping=privacy_args.adaptive_clipping,
                       on_step=lambda optimizer: expected_thresholds.append(optimizer.max_grad_norm))
    assert len(snapshots.after_step) == steps == trainer.dp_optimizer.steps
    for got, want in zip(snapshots.after_step, expected):
        for n in want:
            assert torch.equal(got[n], want[n]), n
    assert thresholds == expected_thresholds and len(set(thresholds + [0.3])) == steps + 1, thresholds  # R moves
    z = combined_noise_multiplier(2.0, 4.0)  # the clipped sum's and the count's noise as one mechanism
    assert [(r.noise_multiplier, r.count) for r in trainer.accountant.history] == [(z, steps)] and z < 2.0


@pytest.mark.slow
def test_physical_batches_accumulate_one_logical_batch(tmp_path):
    """A logical batch in physical batches of 1 or all at once: the same update (up to float64 summation order)."""
    finals = []
    for physical in (None, 1):
        model = gpt2_lm()
        trainer = DPTrainer(
            model=model, args=training_args(tmp_path, max_steps=2), train_dataset=Synthetic(N, "lm", seed=2),
            privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=0.5, per_sample_max_grad_norm=0.2,
                                          max_physical_batch_size=physical, dp_seed=5),
        )
        trainer.train()
        assert trainer.dp_optimizer.steps == 2
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for other in finals[1:]:
        for n, p in finals[0].items():
            torch.testing.assert_close(other[n], p, rtol=0, atol=1e-12)


def test_target_epsilon_calibrates_sigma_for_the_planned_steps(tmp_path):
    model = bert_classifier()
    trainer = DPTrainer(
        model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=Synthetic(N, "cls", seed=3),
        privacy_args=PrivacyArguments(target_delta=1e-5, target_epsilon=4.0, dp_seed=0),
    )
    q = 8 / N
    assert trainer.planned_steps == round(1 / q)
    assert trainer.noise_multiplier == bkfx.noise_multiplier_for(4.0, q, trainer.planned_steps, 1e-5)
    trainer.train()
    assert trainer.accountant.steps == trainer.state.global_step == trainer.planned_steps
    final = trainer.epsilon()
    assert final <= 4.0 and final == bkfx.epsilon(trainer.noise_multiplier, q, trainer.planned_steps, 1e-5)
    train_metrics = [e for e in trainer.state.log_history if "train_loss" in e]
    assert train_metrics[-1]["epsilon"] == final


def test_evaluation_leaves_parameters_grads_and_privacy_untouched(tmp_path):
    """Evaluation runs the Trainer's own loop on the plain model in eval mode (dropout off): its loss is
    the plain Trainer's, and parameters, .grad, the optimizer's steps and the accountant do not change."""
    model, dataset, held_out = gpt2_lm(dropout=0.3), Synthetic(N, "lm", seed=4), Synthetic(10, "lm", seed=5)
    trainer = DPTrainer(
        model=model, args=training_args(tmp_path, max_steps=1, per_device_eval_batch_size=10), train_dataset=dataset,
        eval_dataset=held_out,
        privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, per_sample_max_grad_norm=0.5, dp_seed=0),
    )
    trainer.train()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)  # as if mid-step
    model.train()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    steps, history = trainer.dp_optimizer.steps, trainer.accountant.state_dict()
    metrics = trainer.evaluate()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and torch.equal(p.grad, before[n][1]), n
    assert trainer.dp_optimizer.steps == steps and trainer.accountant.state_dict() == history
    assert trainer.evaluate()["eval_loss"] == metrics["eval_loss"]  # dropout 0.3 is off: eval mode
    plain = transformers.Trainer(model=model, args=trainer.args, eval_dataset=held_out)
    assert plain.evaluate()["eval_loss"] == metrics["eval_loss"]  # the Trainer's own evaluation


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_loss_is_the_heads_own_loss_on_each_sample_alone(name):
    make, task = MODELS[name]
    model, data = make(), Synthetic(5, task, seed=6)
    batch = {k: torch.stack([data[i][k] for i in range(5)]) for k in ("input_ids", "attention_mask", "labels")}
    labels = batch.pop("labels")
    with torch.no_grad():
        losses = per_sample_loss(model, model(**batch), labels)
        for i in range(5):
            alone = model(**{k: v[i:i + 1] for k, v in batch.items()}, labels=labels[i:i + 1]).loss
            # HF computes token losses in float32 (logits.float()), even for a float64 model
            rtol = 1e-6 if alone.dtype == torch.float32 else 1e-12
            torch.testing.assert_close(losses[i], alone.to(losses.dtype), rtol=rtol, atol=0)


def test_refusals(tmp_path):
    dataset, privacy = Synthetic(N, "lm", seed=0), PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPTrainer(model=gpt2_lm(), args=training_args(tmp_path, max_grad_norm=1.0), train_dataset=dataset,
                  privacy_args=privacy)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        DPTrainer(model=gpt2_lm(), args=training_args(tmp_path, gradient_accumulation_steps=2), train_dataset=dataset,
                  privacy_args=privacy)
    with pytest.raises(ValueError, match="per_sample_loss"):
        DPTrainer(model=gpt2_lm(), args=training_args(tmp_path), train_dataset=dataset, privacy_args=privacy,
                  compute_loss_func=lambda *a, **k: None)
    with pytest.raises(ValueError, match="expected logical batch size"):
        DPTrainer(model=gpt2_lm(), args=training_args(tmp_path, per_device_train_batch_size=N + 1),
                  train_dataset=dataset, privacy_args=privacy)
    with pytest.raises(BkfxError, match="per_sample_loss"):
        DPTrainer(model=transformers.GPT2Model(gpt2_lm().config), args=training_args(tmp_path),
                  train_dataset=dataset, privacy_args=privacy)
    with pytest.raises(ValueError, match="exactly one of target_epsilon"):
        PrivacyArguments(target_delta=1e-5)
    with pytest.raises(ValueError, match="its own PrivacyCallback"):
        DPTrainer(model=gpt2_lm(), args=training_args(tmp_path), train_dataset=dataset, privacy_args=privacy,
                  callbacks=[PrivacyCallback(1e-5)])


def test_privacy_callback_logs_epsilon_and_stops_before_max_epsilon(tmp_path, caplog):
    """σ = 2, q = 4/48, δ = 1e-5: ε after steps 1, 2, 3, 4 is 0.468, 0.515, 0.559, 0.595. With
    max_epsilon = 0.577 training stops after step 3, before the step that would pass it (max_steps
    allows 50); step 3 is logged although logging_steps is 2, with ε_4 as the reason."""
    sigma, q, max_epsilon = 2.0, 4 / 48, 0.577
    spent = {k: bkfx.epsilon(sigma, q, k, 1e-5) for k in range(1, 5)}
    trainer = DPTrainer(
        model=gpt2_lm(), args=training_args(tmp_path, max_steps=50, per_device_train_batch_size=4, logging_steps=2),
        train_dataset=Synthetic(48, "lm", seed=1),
        privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=sigma, max_epsilon=max_epsilon, dp_seed=0),
    )
    assert trainer.callback_handler.callbacks[0] is trainer.privacy_callback  # reporters see ε
    with caplog.at_level(logging.WARNING, logger="bkfx.integrations.transformers"):
        trainer.train()
    assert trainer.state.global_step == trainer.accountant.steps == trainer.privacy_callback.stopped_at == 3
    assert spent[3] <= max_epsilon < spent[4]
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [(e["step"], e["epsilon"], e["delta"]) for e in logged] == [(2, spent[2], 1e-5), (3, spent[3], 1e-5)]
    assert "epsilon_next_step" not in logged[0] and logged[1]["epsilon_next_step"] == spent[4]
    final = trainer.state.log_history[-1]
    assert "train_loss" in final and (final["epsilon"], final["delta"]) == (spent[3], 1e-5)
    assert max(e.get("epsilon", 0) for e in trainer.state.log_history) <= max_epsilon
    assert "stopping after step 3" in caplog.text and "max_epsilon = 0.577" in caplog.text


def test_privacy_callback_refuses_a_first_step_over_max_epsilon_and_a_plain_optimizer(tmp_path):
    """The Trainer runs its first step whatever the callbacks say: a budget the first step would
    pass is refused before it; and the callback needs a DPOptimizer with an accountant to read."""
    trainer = DPTrainer(
        model=gpt2_lm(), args=training_args(tmp_path, max_steps=5, per_device_train_batch_size=4),
        train_dataset=Synthetic(48, "lm", seed=1),
        privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=2.0, max_epsilon=0.4),  # ε_1 = 0.468
    )
    with pytest.raises(BkfxError, match="first step"):
        trainer.train()
    assert trainer.accountant.steps == 0
    model = gpt2_lm()
    plain = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=1),
                                 train_dataset=Synthetic(N, "lm", seed=1), callbacks=[PrivacyCallback(1e-5)])
    with pytest.raises(BkfxError, match="DPOptimizer"):
        plain.train()


def test_importing_bkfx_does_not_import_transformers():
    code = "import sys, bkfx, bkfx.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resume_from_checkpoint_continues_the_same_batches_noise_and_accounting(tmp_path):
    """Steps 1-4 in one run, and steps 1-2, a checkpoint, a new trainer resumed for steps 3-4: every
    step's parameters equal (the Poisson sampler continues from its saved position: redrawing batches
    already drawn would correlate the steps, outside the privacy analysis), and the accountant counts
    4 steps."""
    def run(output, resume=None, stop_after=None):
        model = gpt2_lm()
        snapshots = Snapshots(model)
        args = training_args(output, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = DPTrainer(
            model=model, args=args, train_dataset=Synthetic(N, "lm", seed=1), optimizers=(sgd(model), None),
            callbacks=[snapshots],
            privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, per_sample_max_grad_norm=0.3,
                                          dp_seed=5),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, snapshots.after_step

    whole, steps = run(tmp_path / "whole")
    assert len(steps) == 4 and whole.accountant.steps == 4
    resumed, later = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert len(later) == 2 and resumed.accountant.steps == 4 and resumed.state.global_step == 4
    for got, want in zip(later, steps[2:]):
        for n in want:
            assert torch.equal(got[n], want[n]), n


def test_resuming_without_the_sampler_position_is_refused(tmp_path):
    model = gpt2_lm()
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    options = dict(train_dataset=Synthetic(N, "lm", seed=1), optimizers=(sgd(model), None),
                   privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, per_sample_max_grad_norm=0.3))
    DPTrainer(model=model, args=args, **options).train()
    import os
    os.remove(tmp_path / "checkpoint-1" / "bkfx_sampler.pt")
    model = gpt2_lm()
    options["optimizers"] = (sgd(model), None)
    with pytest.raises(BkfxError, match="sampler"):
        DPTrainer(model=model, args=args, **options).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


@pytest.mark.slow
@pytest.mark.compiled
def test_torch_compile_argument_compiles_the_dp_step(tmp_path):
    """TrainingArguments(torch_compile=True) runs bkfx's compiled BK step (with the backend and
    mode given): the same updates as the eager step, up to float64 rounding."""
    finals = []
    for compile_ in (False, True):
        model = gpt2_lm()
        options = dict(torch_compile=True, torch_compile_backend="aot_eager") if compile_ else {}
        trainer = DPTrainer(
            model=model, args=training_args(tmp_path, max_steps=2, **options), train_dataset=Synthetic(N, "lm", seed=2),
            privacy_args=PrivacyArguments(target_delta=1e-5, noise_multiplier=0.5, per_sample_max_grad_norm=0.2,
                                          max_physical_batch_size=4, dp_seed=5),
        )
        trainer.train()
        assert (trainer.dp_model._last_program is not None) == compile_
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n, p in finals[0].items():
        torch.testing.assert_close(finals[1][n], p, rtol=0, atol=1e-12)
