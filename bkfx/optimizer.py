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
`bkfx.accounting.Accountant`) and `sample_rate=`, every step is recorded as one Poisson
subsampled Gaussian step.

The noise is drawn on each parameter's device, by one generator per device, with no copy
between host and device (see `add_gaussian_noise_` for each device's stream). `seed=` seeds
every device's generator with the same seed; the streams of a CPU and a CUDA generator differ,
so the same seed gives different (equally distributed) noise on the two.

Mixed precision with a `torch.amp.GradScaler`: compile with `grad_scaler=scaler` (then `.grad`
holds S times the clipped sum) and step with `scaler.step(dp_optimizer)`: the scaler first
unscales `.grad` (and checks it for inf/NaN), then calls `step()`, which adds the noise to the
*unscaled* sum. Calling `step()` on S-scaled gradients would add noise S times too small; with
`model=` given, `step()` refuses to. Call `scaler.step`/`scaler.update` once per logical batch.

LR schedulers take the wrapped optimizer (`torch.optim.lr_scheduler.StepLR(dp.optimizer, ...)`):
its `param_groups` are the ones this optimizer steps.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from bkfx.accounting import check_noise_multiplier, check_sample_rate
from bkfx.errors import BkfxError

NOISE_CHUNK = 1 << 20  # entries per independently seeded draw of the noise


class DPOptimizer:
    """Wraps `optimizer`: each `step()` adds N(0, (σR)²) to the summed clipped gradients, divides by
    `expected_batch_size`, then steps. `max_grad_norm` may be omitted when `model=` gives it;
    `seed` or `generator` make the noise reproducible (`generator` serves its own device, the
    other devices' generators are seeded from it); `accountant` + `sample_rate` record each step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm=None,
        expected_batch_size: float, generator: torch.Generator | None = None, seed: int | None = None, model=None,
        accountant=None, sample_rate: float | None = None,
    ):
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
        check_noise_multiplier(noise_multiplier)
        if generator is not None and seed is not None:
            raise ValueError("pass either generator= or seed=, not both")
        if accountant is not None and sample_rate is None:
            raise ValueError("an accountant needs the sample_rate of every step: pass sample_rate=")
        if sample_rate is not None:
            check_sample_rate(sample_rate)
        self.optimizer = optimizer
        model = model if model is not None else _compiled_model_of(optimizer)
        self._model = model
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
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.steps = 0
        # False while more physical batches of the current logical batch are to come
        # (set by `bkfx.data.PhysicalBatches`): step() and zero_grad() then leave .grad accumulating.
        self.logical_batch_complete = True

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def noise_std(self) -> float:
        """`σ R`: the standard deviation of the noise added to the clipped sum."""
        return self.noise_multiplier * self.max_grad_norm

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
        """`.grad ← (.grad + N(0, σ²R²)) / expected_batch_size` for every trainable parameter, in place."""
        std = self.noise_std
        grads = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
                grads.append(p.grad)
        if std:
            by_device: dict[str, list[torch.Tensor]] = {}
            for t in grads:
                by_device.setdefault(_device_key(t.device), []).append(t)
            for key, tensors in by_device.items():
                pool = None
                if key == "cpu" and torch.get_num_threads() > 1:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="bkfx-noise")
                    pool = self._pool
                add_gaussian_noise_(tensors, std, self.generator_for(torch.device(key)), pool)
        torch._foreach_div_(grads, self.expected_batch_size)

    def _check_loss_scale(self) -> None:
        """Refuse to step on gradients that still carry a GradScaler's loss scale (the noise would be
        S times too small) or that were unscaled before the logical batch is complete."""
        scaler = getattr(self._model, "grad_scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        from torch.amp.grad_scaler import OptState

        stage = scaler._per_optimizer_states[id(self)]["stage"]
        if not self.logical_batch_complete:
            if stage is OptState.UNSCALED:
                raise BkfxError(
                    "the GradScaler unscaled .grad before the logical batch was complete; the next physical batch "
                    "would add scaled gradients to unscaled ones. Call scaler.step(optimizer) and scaler.update() "
                    "only when optimizer.logical_batch_complete is True"
                )
            return
        if stage is not OptState.UNSCALED:
            raise BkfxError(
                "the compiled model has a GradScaler, so .grad holds S times the clipped sum and the noise would be "
                "S times too small; step with scaler.step(optimizer) (or call scaler.unscale_(optimizer) first)"
            )

    def step(self, closure=None):
        """Noise, average and step, once per logical batch (nothing while one is still accumulating)."""
        self._check_loss_scale()
        if not self.logical_batch_complete:
            return None
        self.add_noise()
        self.steps += 1
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.logical_batch_complete:
            return
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict(), "steps": self.steps, "generator": self.generator.get_state(),
            "seed": self._seed, "generators": {key: g.get_state() for key, g in self._generators.items()},
        }
        if self.accountant is not None:
            state["accountant"] = self.accountant.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._seed = state.get("seed", self._seed)
        for key, generator_state in state.get("generators", {}).items():
            device = torch.device(key)
            if device.type == "cpu" or (torch.get_device_module(device.type).is_available()
                                        and device.index < torch.get_device_module(device.type).device_count()):
                self.generator_for(device).set_state(generator_state)  # a device this machine lacks has no noise to draw
        if self.accountant is not None and "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier:g}, max_grad_norm={self.max_grad_norm:g}, "
                f"expected_batch_size={self.expected_batch_size:g}, steps={self.steps}, optimizer={self.optimizer!r})")


def add_gaussian_noise_(tensors: list[torch.Tensor], std: float, generator: torch.Generator, pool=None) -> None:
    """`t += std · N(0, I)` for each (contiguous) tensor, in place, drawn on the tensors' device
    (which must be `generator`'s): no copy between host and device.

    The CPU's stream: the tensors' entries, in order, are cut into chunks of `NOISE_CHUNK`
    consecutive entries of one tensor; one `torch.randint(0, 2**63 - 1, (chunks,), generator=generator)`
    draws a seed per chunk, and chunk k's noise is `torch.randn(size, generator=G_k)` with `G_k`
    a new CPU generator seeded with seed k. The chunks are independent, so `pool` (a thread
    pool) may draw them at once; the result does not depend on it.

    A GPU's stream: `torch.randn(t.shape, generator=generator)` for each tensor in order (one
    kernel per tensor; the device's generator is already parallel).
    """
    device = generator.device
    for t in tensors:
        if _device_key(t.device) != _device_key(device):
            raise ValueError(f"noise for a tensor on {t.device} requested from a generator on {device}")
    if device.type != "cpu":
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device), alpha=std)
        return
    chunks = [(t, start, min(start + NOISE_CHUNK, t.numel())) for t in tensors for start in range(0, t.numel(), NOISE_CHUNK)]
    if not chunks:
        return
    seeds = torch.randint(0, 2**63 - 1, (len(chunks),), generator=generator).tolist()

    def draw(k: int) -> None:
        t, start, stop = chunks[k]
        g = torch.Generator()
        g.manual_seed(seeds[k])
        t.view(-1)[start:stop].add_(torch.randn(stop - start, generator=g, dtype=t.dtype), alpha=std)

    if pool is None or len(chunks) == 1:
        for k in range(len(chunks)):
            draw(k)
    else:
        list(pool.map(draw, range(len(chunks))))


def _device_key(device: torch.device) -> str:
    """`"cpu"`, `"cuda:0"`, ...: one generator per device (a bare "cuda" means the current one)."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    return str(device)


def _compiled_model_of(optimizer: torch.optim.Optimizer):
    """The bkfx-compiled model whose parameters `optimizer` steps, when `model=` is not given: its
    `.grad` must hold sums (a mean-reduced model would otherwise be divided by B twice)."""
    from bkfx.compile import compiled_models_of

    params = [p for group in optimizer.param_groups for p in group["params"]]
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
