"""`DPOptimizer`: Gaussian noise once per logical step, then any torch.optim optimizer.

It expects `.grad` to hold the *sum* of clipped per-sample gradients, accumulated over
as many forward/backward calls as the logical batch needs: pass the compiled model as
`model=` (it then writes sums whatever its loss reduction), or compile with
`loss_reduction="sum"`. On `step()` it sets

    grad = (Σ_i C_i G_i + N(0, (σ R)² I)) / expected_batch_size

for every trainable parameter of the wrapped optimizer, then steps it. σ is the noise
multiplier, R the total clipping norm of the style (`sqrt(Σ_g R_g²)` for groups: the
sensitivity of the whole clipped sum), and expected_batch_size is `q N` under Poisson
sampling — a constant, so the logical batch's actual size (which depends on the data)
stays private. Since `.grad` only accumulates sums, several forward/backward calls over
parts of a logical batch followed by one `step()` give the update of one large batch.

An empty logical batch is a noise-only step. With `accountant=` (a
`bkfx.training.accounting.Accountant`) and `sample_rate=`, every step is recorded as one Poisson
subsampled Gaussian step.

Only clipped sums are stepped on (`bkfx._runtime.receipts`). Every write of a clipped sum into `.grad`
by the compiled model's backward (eager, compiled with `dp_model.compile()`, or under
`torch.compile(dp_model)`) leaves a receipt: the `.grad` tensor and its version. `step()`
refuses (`bkfx.errors.UnclippedGradientError`, before anything changes) when the parameters of
the compiled model hold a `.grad` without a matching receipt — a backward through the original
module instead of the compiled one, or on top of it; `.grad` replaced or modified in place;
no `zero_grad()` after the last step — and when no backward wrote any clipped sum since the
last step. Gradient accumulation (several backward calls, `PhysicalBatches`) keeps its receipts;
`zero_grad()` drops them. A DPOptimizer over parameters of no compiled model steps on whatever
`.grad` holds: whoever wrote it vouches that it is a clipped sum.

Empty Poisson batches, explicitly, one of two ways: run the model on the batch as
`poisson_loader` yields it (0 rows: forward and backward run, and the backward writes zero
clipped sums with their receipts), or, with no forward call at all, `step(empty_batch=True)`
(a data-parallel rank without examples, or a loop that skips empty batches). Either way the
step adds the noise and is counted by the accountant.

`DPOptimizer` is a `torch.optim.Optimizer` whose `param_groups`, `state` and `defaults` are
the wrapped optimizer's own objects: LR schedulers take it directly
(`StepLR(dp_optimizer, ...)`), and a group added with `add_param_group` is added to the
wrapped optimizer (refused when its parameters are not the compiled model's: their gradients
would not be clipped). `state_dict()` is the wrapped optimizer's, plus a `"bkfx"` entry with
the step count, every device's noise generator and the accountant.

The noise is drawn on each parameter's device, by one generator per device, with no copy
between host and device (see `add_gaussian_noise_` for each device's stream). `seed=` seeds
every device's generator with the same seed; the streams of a CPU and a CUDA generator differ,
so the same seed gives different (equally distributed) noise on the two.

Data parallel (`torch.distributed`, no wrapper): when a process group is initialised (or
`process_group=` names one), each rank runs the compiled model on its own samples and `step()`
all-reduces (SUM) the clipped sums over the group, in flat buckets of at most
`bkfx.training.distributed.ALLREDUCE_BUCKET` entries per device and dtype. The noise is added once in total: the group's rank 0 draws it and
adds it to its own sum before the all-reduce (the other ranks add none and leave their generators
untouched); every rank then divides by `expected_batch_size`, which must be the GLOBAL one (`q N`
over the whole dataset), so all ranks hold identical gradients and parameters. Every rank must
call `step()` once per logical batch (a rank whose batch is empty too: it contributes zeros).
`process_group=False` keeps a DPOptimizer local although a group is initialised. Do not wrap the
model in `DistributedDataParallel` (bkfx.compile refuses it). A `fully_shard`ed (FSDP2) model's
sharded parameters get the reduce-scatter of the full clipped sums that its unsharded parameters
hold, with rank 0's noise added before it (`bkfx.training.distributed`); step() then reshards the model.

Adaptive clipping (`adaptive_clipping=bkfx.AdaptiveClipping(...)`, `bkfx.training.adaptive`): each step
also counts the logical batch's samples whose norm is at most R (the model counts after every
backward), noises the count once (rank 0's noise, then summed over the ranks), and moves every
group's R geometrically towards the target quantile; the model clips the next step at the new
R and the noise is scaled to it. The accountant charges each step at the combined noise
multiplier of the gradient's σ and the count's σ_b (`accounted_noise_multiplier`). The
thresholds are in `state_dict()`.

Truncated Poisson batches (`bkfx.poisson_loader(max_batch_size=M)`): the model notes the loader's
per-step truncation probability when it runs on its batches, and every step is accounted with it
(`bkfx.training.accounting._epsilon_of` adds it to δ).

`secure_mode=True` draws noise that resists the floating-point attacks on naive Gaussian
samplers (see `add_gaussian_noise_`); it takes no seed (its key comes from the OS).

Mixed precision with a `torch.amp.GradScaler`: compile with `grad_scaler=scaler` (then `.grad`
holds S times the clipped sum) and step with `scaler.step(dp_optimizer)`: the scaler first
unscales `.grad` (and checks it for inf/NaN), then calls `step()`, which adds the noise to the
*unscaled* sum. Calling `step()` on S-scaled gradients would add noise S times too small; with
`model=` given, `step()` refuses to. Call `scaler.step`/`scaler.update` once per logical batch.
"""
from __future__ import annotations

import hashlib
import math
import secrets
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from bkfx._runtime import receipts
from bkfx._torch import foreach_add_, foreach_div_, grad_scaler_unscaled
from bkfx.errors import BkfxError
from bkfx.training.accounting import check_noise_multiplier, check_sample_rate
from bkfx.training.adaptive import AdaptiveClipping, UnclippedCount, combined_noise_multiplier, updated_thresholds
from bkfx.training.distributed import all_reduce_sum_

__all__ = ["NOISE_CHUNK", "SECURE_DRAWS", "DPOptimizer", "add_gaussian_noise_", "secure_standard_normal"]

NOISE_CHUNK = 1 << 18  # entries per independently seeded draw of the noise (256K: a few chunks of work for every thread)
SECURE_DRAWS = 4  # secure mode's noise: the sum of 4 standard normal draws, halved (÷√4 is exact)


class DPOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer`: each `step()` adds N(0, (σR)²) to the summed clipped gradients, divides by
    `expected_batch_size`, then steps. `max_grad_norm` may be omitted when `model=` gives it;
    `seed` or `generator` make the noise reproducible (`generator` serves its own device, the
    other devices' generators are seeded from it); `accountant` + `sample_rate` record each step;
    `secure_mode` draws noise robust to floating-point attacks, keyed from the OS's entropy;
    `process_group` (default: torch.distributed's default group once initialised; False: none)
    sums the clipped gradients over its ranks, with the noise drawn once, on its rank 0."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm=None,
        expected_batch_size: float, generator: torch.Generator | None = None, seed: int | None = None, model=None,
        accountant=None, sample_rate: float | None = None, secure_mode: bool = False, process_group=None,
        adaptive_clipping=None,
    ):
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("optimizer is already a DPOptimizer (its noise would be added twice); wrap the "
                             "torch.optim optimizer it wraps (optimizer.optimizer)")
        if not isinstance(getattr(optimizer, "param_groups", None), list) or not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
        check_noise_multiplier(noise_multiplier)
        if generator is not None and seed is not None:
            raise ValueError("pass either generator= or seed=, not both")
        if secure_mode and (generator is not None or seed is not None):
            raise ValueError("secure_mode draws its noise key from the OS's entropy; a seed or generator would make "
                             "the noise predictable. Drop seed=/generator=, or pass secure_mode=False for a reproducible run")
        if accountant is not None and sample_rate is None:
            raise ValueError("an accountant needs the sample_rate of every step: pass sample_rate=")
        if sample_rate is not None:
            check_sample_rate(sample_rate)
        # torch.optim.Optimizer's own bookkeeping (step hooks, profiling). Optimizer.__init__ is not
        # called: param_groups, state and defaults are the wrapped optimizer's (properties below).
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()
        self.optimizer = optimizer
        model = model if model is not None else _compiled_model_of(optimizer)
        self._model = model
        self.adaptive_clipping = adaptive_clipping
        if adaptive_clipping is not None:
            self._start_adaptive_clipping(noise_multiplier, max_grad_norm)
        self.max_grad_norm = _total_norm(max_grad_norm, model)
        if model is not None:
            model.sum_clipped_gradients = True
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        if generator is None:
            generator = torch.Generator()
            if seed is not None:
                generator.manual_seed(seed)
            else:
                seed = generator.seed()  # a fresh seed for this optimizer only (torch.seed() would reseed the global RNG)
        self.generator = generator  # the noise's generator on its own device (the CPU's unless given)
        self._seed = seed  # seeds the generators of the other devices (drawn from `generator` when it was given)
        self._generators = {_device_key(generator.device): generator}
        self._pool = None  # threads drawing the noise's chunks on the CPU
        self.secure_mode = bool(secure_mode)
        # secure mode: the key of the seeds (a keyed hash of draw, device, chunk), and the draws so far
        self._secure_key = secrets.token_bytes(32) if secure_mode else None
        self._noise_draws = 0
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.process_group = process_group  # None: the default group when torch.distributed is initialised
        self.steps = 0
        # False while more physical batches of the current logical batch are to come
        # (set by `bkfx.training.data.PhysicalBatches`): step() and zero_grad() then leave .grad accumulating.
        self.logical_batch_complete = True
        if adaptive_clipping is not None and accountant is not None:
            accountant.note("adaptive_clipping", {
                "gradient_noise_multiplier": self.noise_multiplier,
                "count_noise_multiplier": float(adaptive_clipping.count_noise_multiplier),
                "groups": len(model.max_grad_norms), "target_unclipped_quantile": adaptive_clipping.target_unclipped_quantile})

    # The wrapped optimizer's own objects, so that schedulers, GradScaler and hooks see one set of groups.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    @property
    def noise_std(self) -> float:
        """`σ R`: the standard deviation of the noise added to the clipped sum."""
        return self.noise_multiplier * self.max_grad_norm

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer; its parameters must be the compiled model's (when
        there is one), since only those get clipped sums in `.grad`."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if self._model is not None:
            own = {id(p) for p in self._model.parameters()}
            if any(id(p) not in own for p in params):
                raise ValueError(
                    "add_param_group: the new group has parameters that are not the compiled model's; their .grad "
                    "would hold unclipped gradients, which the noise does not cover. Compile a model that owns them"
                )
        elif _compiled_model_of_params(params) is not None:
            raise ValueError(
                "add_param_group: the new group's parameters belong to a bkfx-compiled model this optimizer was not "
                "built with; build the DPOptimizer with model= that model instead"
            )
        self.optimizer.add_param_group({**param_group, "params": params})  # a generator given is now consumed

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The noise's generator on `device` (made on first use, seeded with the optimizer's seed)."""
        key = _device_key(device)
        g = self._generators.get(key)
        if g is None:
            if self._seed is None:
                self._seed = int(torch.randint(0, 2**63 - 1, (), generator=self.generator, device=self.generator.device))
            g = self._generators[key] = torch.Generator(device=key)
            g.manual_seed(self._seed)
        return g

    def add_noise(self) -> None:
        """`.grad ← (.grad + N(0, σ²R²)) / expected_batch_size` for every trainable parameter, in place.

        Data parallel: the group's rank 0 adds the noise to its own clipped sums, then they are
        summed over the ranks (all-reduced; reduce-scattered to the shards for FSDP2's sharded
        parameters, whose whole clipped sums the unsharded parameters hold: `bkfx.training.distributed`)."""
        std = self.noise_std
        shards = getattr(self._model, "shards", None)
        group = self._group()
        if shards is not None:
            self._check_shards(shards, group)
        replicated, sharded, noised = [], [], []  # noised: every sum the noise is drawn for, in parameter order
        for param_group in self.optimizer.param_groups:
            for p in param_group["params"]:
                if not p.requires_grad:
                    continue
                name = None if shards is None else shards.name_of(p)
                if name is not None:
                    sharded.append(name)
                    noised.append(shards.full_grad(name))
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
                replicated.append(p.grad)
                noised.append(p.grad)
        if std and (group is None or torch.distributed.get_rank(group) == 0):  # data parallel: rank 0's noise only
            by_device: dict[str, list[torch.Tensor]] = {}
            for t in noised:
                by_device.setdefault(_device_key(t.device), []).append(t)
            for key, tensors in by_device.items():
                pool = None
                if key == "cpu" and torch.get_num_threads() > 1:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="bkfx-noise")
                    pool = self._pool
                secure_key = None
                if self.secure_mode:  # a key per draw and device: resumed runs redraw the same noise
                    secure_key = hashlib.blake2b(f"{self._noise_draws}/{key}".encode(), key=self._secure_key).digest()
                add_gaussian_noise_(tensors, std, self.generator_for(torch.device(key)), pool, secure_key=secure_key)
        self._noise_draws += 1
        if group is not None:
            all_reduce_sum_(replicated, group)
        summed = replicated
        if shards is not None:
            summed = replicated + shards.reduce_scatter_(sharded)
            shards.reshard()
        foreach_div_(summed, self.expected_batch_size)

    def _check_shards(self, shards, group) -> None:
        """FSDP2: the optimizer must step the sharded parameters, and the ranks the noise is drawn
        once over must be those the parameters are sharded over."""
        unsharded = {id(p) for p in shards.unsharded.values()}
        if any(id(p) in unsharded for g in self.optimizer.param_groups for p in g["params"]):
            raise BkfxError(
                "the optimizer holds the unsharded parameters of a fully_shard model (read from model.parameters() "
                "between a forward call and step()); they are freed at step. Build the optimizer on the sharded "
                "parameters: before the first forward call, or after a step()"
            )
        ranks = torch.distributed.get_process_group_ranks
        if group is None and shards.world_size > 1:
            raise BkfxError(
                "a fully_shard model needs its clipped sums reduced over the ranks it is sharded over, but this "
                "DPOptimizer has process_group=False; drop process_group= (or pass the mesh's group)"
            )
        if group is not None and ranks(group) != ranks(shards.group):
            raise BkfxError(
                f"the DPOptimizer's process group (ranks {ranks(group)}) is not the group the model is sharded over "
                f"(ranks {ranks(shards.group)}); pass process_group= the mesh's group (mesh.get_group())"
            )

    def _group(self):
        """The process group to sum over, or None (one process: no group, `process_group=False`,
        or a group of one rank)."""
        group = self.process_group
        if group is False or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            if group not in (None, False):
                raise BkfxError("DPOptimizer was given a process_group but torch.distributed is not initialised")
            return None
        if group is None:
            group = torch.distributed.group.WORLD
        return group if torch.distributed.get_world_size(group) > 1 else None

    def _check_loss_scale(self) -> None:
        """Refuse to step on gradients that still carry a GradScaler's loss scale (the noise would be
        S times too small) or that were unscaled before the logical batch is complete."""
        scaler = getattr(self._model, "grad_scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        if self._group() is not None:  # refused before any collective: a rank may skip while another reduces
            raise BkfxError(
                "a GradScaler with data-parallel DP-SGD is not supported: each rank's inf/NaN check may skip the step "
                "on its own while the others wait in the all-reduce of the clipped sums. Use bf16 autocast (it needs "
                "no scaler) or train in one process"
            )
        unscaled = grad_scaler_unscaled(scaler, self)
        if not self.logical_batch_complete:
            if unscaled:
                raise BkfxError(
                    "the GradScaler unscaled .grad before the logical batch was complete; the next physical batch "
                    "would add scaled gradients to unscaled ones. Call scaler.step(optimizer) and scaler.update() "
                    "only when optimizer.logical_batch_complete is True"
                )
            return
        if not unscaled:
            raise BkfxError(
                "the compiled model has a GradScaler, so .grad holds S times the clipped sum and the noise would be "
                "S times too small; step with scaler.step(optimizer) (or call scaler.unscale_(optimizer) first)"
            )

    def step(self, closure=None, *, empty_batch: bool = False):
        """Noise, average and step, once per logical batch (nothing while one is still accumulating).

        `closure` (which recomputes the loss and calls backward) runs first, so the noise covers the
        gradients it leaves; it returns the loss. Optimizers that call a closure several times per
        step (LBFGS) cannot be made private this way.

        The gradients of a compiled model's parameters must be the clipped sums its backward wrote
        (`bkfx._runtime.receipts`), and at least one must have been written since the last step;
        `empty_batch=True` says this logical batch has no example here (see the class docstring),
        so a step with no backward is noise only, and counted. Otherwise `UnclippedGradientError`,
        with parameters, optimizer state and accountant untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_loss_scale()
        if not self.logical_batch_complete:
            return loss
        receipted = self._check_receipts(empty_batch)
        self.add_noise()
        self.steps += 1
        if self.adaptive_clipping is not None:
            self._adapt_threshold()
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.accounted_noise_multiplier, sample_rate=self.sample_rate,
                                 truncation_probability=getattr(self._model, "truncation_probability", 0.0))
            unit, rows = getattr(self._model, "privacy_unit", ("example", 1))
            if unit == "user":  # the model clipped users (`bkfx.training.data.UserSampler`): q is the users' rate
                self.accountant.note("unit", {"name": "user", "examples_per_user": rows})
        self.optimizer.step()
        receipts.consume(p for _, p in receipted)
        return loss

    def _check_receipts(self, empty_batch: bool) -> list:
        """Refuse gradients of a compiled model's parameters that its backward did not write, and
        a step with none written, unless `empty_batch` (`bkfx._runtime.receipts.check`). Returns the checked
        `(name, tensor)` pairs: each trainable parameter, or for an FSDP2 shard the unsharded
        parameter that holds its clipped sum (and the shard itself when its `.grad` is set: bkfx
        writes a shard's `.grad` only inside step())."""
        model = self._model if self._model is not None else _compiled_model_of(self.optimizer)
        if model is None:  # parameters of no compiled model: whoever wrote .grad vouches for it
            return []
        names = {id(p): n for n, p in model.module.named_parameters(remove_duplicate=False)}
        shards = getattr(model, "shards", None)
        targets = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                name = None if shards is None else shards.name_of(p)
                if name is None:
                    targets.append((names.get(id(p), f"a parameter of shape {tuple(p.shape)}"), p))
                    continue
                if p.grad is not None:
                    targets.append((f"{name} (shard)", p))
                if name in shards.unsharded:
                    targets.append((name, shards.unsharded[name]))
        receipts.check(targets, empty_batch=empty_batch)
        return targets

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad, once per logical batch; the gradients' receipts go too."""
        if not self.logical_batch_complete:
            return
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self.adaptive_clipping is not None:  # the count goes with the clipped sums: a skipped step drops both
            self._model.unclipped_count.take()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        shards = getattr(self._model, "shards", None)
        if shards is not None:  # FSDP2: the clipped sums not yet reduced, on the unsharded parameters
            for p in shards.unsharded.values():
                p.grad = None
            params += list(shards.unsharded.values())
        receipts.consume(params)
        if not set_to_none:  # zeros in place: a clean start for the next backward, not a clipped sum
            for p in params:
                receipts.receipt_zeroed(p)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus `"bkfx"`: steps, every device's noise generator
        (and secure mode's key), and the accountant. Whoever holds it can recompute the noise of
        the steps that follow: keep it as private as the training data."""
        dp = {
            "steps": self.steps, "generator": self.generator.get_state(), "seed": self._seed,
            "generators": {key: g.get_state() for key, g in self._generators.items()},
            "noise_draws": self._noise_draws, "secure_key": None if self._secure_key is None else self._secure_key.hex(),
        }
        if self.accountant is not None:
            dp["accountant"] = self.accountant.state_dict()
        if self.adaptive_clipping is not None:
            dp["adaptive_clipping"] = {"thresholds": self._model.max_grad_norms}
        return {**self.optimizer.state_dict(), "bkfx": dp}

    def load_state_dict(self, state: dict) -> None:
        if "bkfx" in state:
            dp = state["bkfx"]
            inner = {k: v for k, v in state.items() if k != "bkfx"}
        elif "optimizer" in state and "steps" in state:  # the format of bkfx 0.1.0
            dp, inner = state, state["optimizer"]
        else:
            raise ValueError("not a DPOptimizer state dict (it has no 'bkfx' entry); a plain optimizer's state "
                             "loads with dp_optimizer.optimizer.load_state_dict(state)")
        secure_key = dp.get("secure_key")
        if (secure_key is not None) != self.secure_mode:
            saved = "secure_mode=True" if secure_key is not None else "secure_mode=False"
            raise ValueError(f"the state was saved by a DPOptimizer with {saved}; build this one the same way "
                             "(a resumed run must redraw the noise of the steps it repeats)")
        self.optimizer.load_state_dict(inner)
        self.steps = dp["steps"]
        self._noise_draws = dp.get("noise_draws", self.steps)
        if secure_key is not None:
            self._secure_key = bytes.fromhex(secure_key)
        if "generator" in dp:
            self.generator.set_state(dp["generator"])
        self._seed = dp.get("seed", self._seed)
        for key, generator_state in dp.get("generators", {}).items():
            device = torch.device(key)
            if device.type == "cpu" or (torch.get_device_module(device.type).is_available()
                                        and device.index < torch.get_device_module(device.type).device_count()):
                self.generator_for(device).set_state(generator_state)  # a device this machine lacks has no noise to draw
        if self.accountant is not None and "accountant" in dp:
            self.accountant.load_state_dict(dp["accountant"])
        if ("adaptive_clipping" in dp) != (self.adaptive_clipping is not None):
            raise ValueError("the state was saved by a DPOptimizer " + ("with" if "adaptive_clipping" in dp else "without")
                             + " adaptive_clipping=; build this one the same way (the threshold R is part of the run)")
        if self.adaptive_clipping is not None:
            self._set_thresholds(dp["adaptive_clipping"]["thresholds"])
            self._model.unclipped_count.take()

    # -- adaptive clipping (`bkfx.training.adaptive`) ------------------------------------------------------
    @property
    def accounted_noise_multiplier(self) -> float:
        """The noise multiplier the accountant charges a step: σ, or with adaptive clipping the one
        Gaussian mechanism σ and the count's σ_b make (`bkfx.training.adaptive.combined_noise_multiplier`)."""
        if self.adaptive_clipping is None:
            return self.noise_multiplier
        return combined_noise_multiplier(self.noise_multiplier, self.adaptive_clipping.count_noise_multiplier)

    def _start_adaptive_clipping(self, noise_multiplier: float, max_grad_norm) -> None:
        config, model = self.adaptive_clipping, self._model
        if not isinstance(config, AdaptiveClipping):
            raise TypeError(f"adaptive_clipping must be a bkfx.AdaptiveClipping, got {type(config).__name__}")
        if model is None:
            raise ValueError("adaptive clipping moves the compiled model's threshold: pass model= (the bkfx-compiled model)")
        if config.count_noise_multiplier == 0 and noise_multiplier > 0:
            raise ValueError("adaptive clipping with count_noise_multiplier=0 releases the count of unclipped samples "
                             "without noise, which no gradient noise makes private: give the count noise "
                             "(Andrew et al. suggest expected_batch_size / 20), or use noise_multiplier=0 (no privacy)")
        if config.initial is not None:
            self._set_thresholds(config.initial)
        model.unclipped_count = UnclippedCount(len(model.max_grad_norms))

    def _set_thresholds(self, thresholds) -> None:
        """R of every group for the next step, in the model and in the noise's scale."""
        self._model.max_grad_norm = list(thresholds) if isinstance(thresholds, (list, tuple)) else thresholds
        self.max_grad_norm = math.sqrt(sum(r ** 2 for r in self._model.max_grad_norms))

    def _adapt_threshold(self) -> None:
        """The step's count of unclipped samples, noised once (by the group's rank 0) and summed over
        the ranks, moves every group's R (`bkfx.training.adaptive`); the next backward clips at it."""
        model, config = self._model, self.adaptive_clipping
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        counts = model.unclipped_count.take(device)
        group = self._group()
        sigma = config.count_noise_multiplier
        if sigma and (group is None or torch.distributed.get_rank(group) == 0):
            groups = counts.numel()
            if self.secure_mode:
                key = hashlib.blake2b(f"count/{self._noise_draws}".encode(), key=self._secure_key, digest_size=8).digest()
                noise = secure_standard_normal(groups, torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))
            else:
                noise = torch.randn(groups, generator=self.generator, dtype=torch.float64, device=self.generator.device)
            counts = counts + noise.to(device) * (sigma * math.sqrt(groups))  # √G: the G counts' vector has noise multiplier 2σ_b
        if group is not None:
            all_reduce_sum_([counts], group)
        self._set_thresholds(updated_thresholds(model.max_grad_norms, counts.tolist(), self.expected_batch_size, config))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # threads do not pickle; a copy makes its own

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier:g}, max_grad_norm={self.max_grad_norm:g}, "
                f"expected_batch_size={self.expected_batch_size:g}, steps={self.steps}"
                f"{', secure_mode=True' if self.secure_mode else ''}, optimizer={self.optimizer!r})")


def add_gaussian_noise_(
    tensors: list[torch.Tensor], std: float, generator: torch.Generator, pool=None, *, secure_key: bytes | None = None,
) -> None:
    """`t += std · N(0, I)` for each (contiguous) tensor, in place, drawn on the tensors' device
    (which must be `generator`'s): no copy between host and device.

    The CPU's stream: per dtype (in order of first appearance), the entries of that dtype's
    tensors, in order, one after another, are cut into chunks of `NOISE_CHUNK` consecutive
    entries (a chunk may span several small tensors: a model's biases and norm weights share one);
    one `torch.randint(0, 2**63 - 1, (chunks,), generator=generator)` draws a seed per chunk, and
    chunk k's noise is `torch.randn(size, generator=G_k, dtype=...)` with `G_k` a new CPU generator
    seeded with seed k, split among the entries it covers. The chunks are independent, so `pool`
    (a thread pool) may draw them at once; the result does not depend on it.

    A GPU's stream: per dtype (in order of first appearance), one `torch.randn(n, generator=generator)`
    for the n entries of that dtype's tensors, in order, split among them; one fused add (the
    device's generator is already parallel, and a draw per tensor costs a kernel launch each).

    Secure mode (`secure_key`: bytes never used for another call): on every device, the chunks
    as above; chunk k's seed is the first 8 bytes of `BLAKE2b(str(k), key=secure_key)` (less
    its top bit), and its noise `(z_1 + z_2 + z_3 + z_4) / 2` with the `z_j` consecutive float64
    `torch.randn` draws from a generator seeded with it (a new CPU generator, or `generator`
    reseeded on a GPU): exactly N(0, 1), since ÷√4 = ÷2 is exact. A naive sampler's outputs
    (Box-Muller in float32) miss most floats near any value, and which ones it misses leaks the
    value noised (Mironov 2012 for Laplace; Jin et al., "Are We There Yet? Timing and
    Floating-Point Attacks on Differential Privacy Systems", S&P 2022, for Gaussians). A sum of
    several Gaussian draws fills those gaps (Holohan & Braghin, "Secure Random Sampling in
    Differential Privacy", ESORICS 2021 — the idea Opacus's secure mode uses), float64 draws
    leave no gap at the gradients' float32 resolution, and seeds from a keyed hash cannot be
    predicted from earlier noise the way a generator's state can.
    """
    device = generator.device
    for t in tensors:
        if _device_key(t.device) != _device_key(device):
            raise ValueError(f"noise for a tensor on {t.device} requested from a generator on {device}")
    if secure_key is None and device.type != "cpu":
        for dtype, group in _by_dtype(tensors).items():  # one draw and one fused add per dtype: few kernels
            noise = torch.randn(sum(t.numel() for t in group), generator=generator, dtype=dtype, device=device)
            parts = [part.view(t.shape) for part, t in zip(noise.split([t.numel() for t in group]), group)]
            foreach_add_(group, parts, alpha=std)
        return
    chunks = _chunks(tensors)
    if not chunks:
        return
    if secure_key is None:
        seeds = torch.randint(0, 2**63 - 1, (len(chunks),), generator=generator).tolist()
    else:
        seeds = [int.from_bytes(hashlib.blake2b(str(k).encode(), key=secure_key, digest_size=8).digest(), "little") >> 1
                 for k in range(len(chunks))]

    def draw(k: int) -> None:
        segments = chunks[k]
        size = sum(stop - start for _, start, stop in segments)
        g = torch.Generator() if device.type == "cpu" else generator
        g.manual_seed(seeds[k])
        if secure_key is None:
            noise = torch.randn(size, generator=g, dtype=segments[0][0].dtype)
        else:
            noise = secure_standard_normal(size, g)
        parts = [t.view(-1)[start:stop] for t, start, stop in segments]
        foreach_add_(parts, list(noise.split([stop - start for _, start, stop in segments])), alpha=std)

    if pool is None or len(chunks) == 1 or device.type != "cpu":
        for k in range(len(chunks)):
            draw(k)
    else:
        list(pool.map(draw, range(len(chunks))))


def _chunks(tensors: list[torch.Tensor]) -> list[list[tuple]]:
    """The noise stream's chunks (see `add_gaussian_noise_`): each a list of `(tensor, start, stop)`
    segments of one dtype, `NOISE_CHUNK` entries in all (the last of a dtype fewer)."""
    chunks = []
    for group in _by_dtype(tensors).values():
        current, filled = [], 0
        for t in group:
            start = 0
            while start < t.numel():
                stop = min(t.numel(), start + NOISE_CHUNK - filled)
                current.append((t, start, stop))
                filled += stop - start
                start = stop
                if filled == NOISE_CHUNK:
                    chunks.append(current)
                    current, filled = [], 0
        if current:
            chunks.append(current)
    return chunks


def _by_dtype(tensors: list[torch.Tensor]) -> dict:
    """dtype -> its tensors, in order; dtypes in order of first appearance (the noise stream's order)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def secure_standard_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """`(z_1 + ... + z_4) / 2`, the z_j consecutive float64 `randn(n)` draws from `generator`: N(0, 1)."""
    z = torch.empty(n, dtype=torch.float64, device=generator.device).normal_(generator=generator)  # = randn's draws
    draw = torch.empty_like(z)
    for _ in range(SECURE_DRAWS - 1):
        z.add_(draw.normal_(generator=generator))
    return z.mul_(0.5)


def _device_key(device: torch.device) -> str:
    """`"cpu"`, `"cuda:0"`, ...: one generator per device (a bare "cuda" means the current one)."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    return str(device)


def _compiled_model_of(optimizer: torch.optim.Optimizer):
    """The bkfx-compiled model whose parameters `optimizer` steps, when `model=` is not given: its
    `.grad` must hold sums (a mean-reduced model would otherwise be divided by B twice)."""
    return _compiled_model_of_params([p for group in optimizer.param_groups for p in group["params"]])


def _compiled_model_of_params(params):
    from bkfx._runtime.live_models import compiled_models_of

    models = compiled_models_of(params)
    if len(models) > 1:
        raise ValueError(
            f"the optimizer's parameters belong to {len(models)} bkfx-compiled models; pass the one to step as model="
        )
    return models[0] if models else None


def _total_norm(max_grad_norm, model) -> float:
    """`R = sqrt(Σ_g R_g²)`, from the thresholds given or, when omitted, the compiled model's."""
    if max_grad_norm is None:
        if model is None:
            raise ValueError("pass max_grad_norm= (the clipping threshold), or model= to take it from the compiled model")
        norms = model.max_grad_norms
    else:
        norms = [max_grad_norm] if isinstance(max_grad_norm, (int, float)) else list(max_grad_norm)
    total = math.sqrt(sum(float(r) ** 2 for r in norms))
    if model is not None:
        compiled = math.sqrt(sum(float(r) ** 2 for r in model.max_grad_norms))
        if not math.isclose(total, compiled, rel_tol=1e-12):
            raise ValueError(
                f"max_grad_norm gives a total clipping norm of {total:g} but the model clips to {compiled:g} "
                f"(thresholds {model.max_grad_norms}); the noise must be scaled to the model's clipping"
            )
    return total
