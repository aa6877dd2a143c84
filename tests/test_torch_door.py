"""Every private torch API bkfx uses goes through bkfx/_torch.py (one door, with version gates)."""
import ast
import pathlib

import torch

import bkfx._torch as door

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRIVATE_ATTRIBUTES = {"_execution_engine", "_per_optimizer_states", "_training_state", "_is_view", "_in_spec",
                      "_get_fsdp_state"}


def _private_uses(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch") and any(
                part.startswith("_") for part in node.module.split(".")):
            found.append(f"{path.name}:{node.lineno} from {node.module} import")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.startswith("torch") and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute):
            if node.attr in PRIVATE_ATTRIBUTES:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "torch" and any(
                    a.startswith("_") and not a.startswith("__") for a in chain):
                found.append(f"{path.name}:{node.lineno} torch.{'.'.join(reversed(chain))}")
    return found


def test_private_torch_apis_are_used_only_through_the_door():
    uses = []
    for folder in ("bkfx", "passes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != ROOT / "bkfx" / "_torch.py":
                uses += _private_uses(path)
    assert not uses, "private torch APIs outside bkfx/_torch.py:\n" + "\n".join(sorted(set(uses)))


def test_the_door_admits_this_torch_and_names_the_floor():
    assert door.TORCH_VERSION >= door.MIN_TORCH
    assert door.TORCH_VERSION == tuple(int(x) for x in torch.__version__.split(".")[:2])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={door.MIN_TORCH[0]}.{door.MIN_TORCH[1]}"' in pyproject  # the claimed floor is the tested one


def test_oldest_lane_installs_the_floor():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"torch=={door.MIN_TORCH[0]}.{door.MIN_TORCH[1]}.0" in ci  # the floor is what the second lane runs


def test_every_entry_the_door_opens_on_use_resolves_on_this_torch():
    """The entries imported lazily (inductor, FSDP2, GradScaler, dynamo) resolve here, so a torch that
    moved one fails this test in CI's lanes, not a user's first compiled step."""
    compile_fx, list_mode_options, config = door.inductor()
    assert callable(compile_fx) and "triton.cudagraphs" in list_mode_options("reduce-overhead")
    assert hasattr(config, "triton") and isinstance(door.inductor_decompositions(), dict)
    assert door.compiling_for_cuda_graphs() is False
    assert callable(torch.autograd.Variable._execution_engine.queue_callback)
    assert callable(torch._C._autograd._get_current_graph_task_keep_graph)
    from torch.utils.data._utils.pin_memory import pin_memory  # pin_batch's (pinning needs an accelerator)

    assert callable(pin_memory)

    scaler = torch.amp.GradScaler("cpu")
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale(weight.sum()).backward()
    assert door.grad_scaler_unscaled(scaler, optimizer) is False
    scaler.unscale_(optimizer)
    assert door.grad_scaler_unscaled(scaler, optimizer) is True

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    assert hasattr(FSDPModule, "_get_fsdp_state") and hasattr(TrainingState, "PRE_BACKWARD")
    with door.top_level_dispatch():
        assert torch.is_grad_enabled()


def test_the_reduce_scatter_the_door_picks_exists_here():
    import torch.distributed as dist

    assert callable(getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)
