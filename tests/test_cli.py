"""The `bkfx` command, run as a user runs it (a subprocess): `inspect` prints the plan and writes
the graph, `check` compares with the reference and sets the exit code, and bad input gets one
line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest
import torch

import bkfx
from bkfx.tools.graph import to_networkx

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "examples" / "models" / "small_cnn.py"
TRANSFORMER = ROOT / "examples" / "models" / "tiny_transformer.py"
pytestmark = pytest.mark.filterwarnings("ignore:'[a-zA-Z]+' deprecated - use:DeprecationWarning")  # pydot


def bkfx_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bkfx.tools.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """A user's file of factories, good and bad, and one that does not even parse."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def mlp():
            return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))

        def raises():
            raise ValueError("no weights for this size")

        def batchnorm():  # batch statistics mix samples: bkfx refuses it
            return nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

        def dropout():  # a random forward pass: the reference and bkfx see different masks
            return nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.5), nn.Linear(32, 3))

        def scalar():
            return nn.Linear(12, 1)

        def not_a_model():
            return 3
    """))
    (folder / "broken.py").write_text("def broken(:\n")
    return folder


def test_inspect_prints_the_plan_and_writes_the_graph(tmp_path):
    done = bkfx_cli("inspect", f"{CNN}:small_cnn", "--input-shape", "4,3,8,8", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bkfx plan: 5 sites, 10 parameter operands, 10 trainable parameters; numbers at B=4")
    assert "conv1.weight" in done.stdout and "small_cnn.py:" in done.stdout and "totals at B=4" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("0 ") and "conv1.weight" in line)
    assert row.split()[5:8] == [str(8 * 8), "16", str(3 * 3 * 3)]  # T = output positions, p, d
    # the DOT has one node per node of the same model's graph, compiled here
    sys.path.insert(0, str(CNN.parent))
    try:
        from small_cnn import small_cnn
    finally:
        sys.path.remove(str(CNN.parent))
    dp = bkfx.compile(small_cnn())
    dp(torch.randn(4, 3, 8, 8))
    back = nx.nx_pydot.read_dot(str(tmp_path / "small_cnn.dot"))
    assert set(back.nodes) == set(to_networkx(dp).nodes)
    assert "<svg" in (tmp_path / "small_cnn.svg").read_text()
    assert done.stdout.rstrip().endswith("(drawn with graphviz)" if shutil.which("dot") else "(drawn with matplotlib)")


def test_inspect_token_model_as_png_in_float64(tmp_path):
    done = bkfx_cli("inspect", f"{TRANSFORMER}:tiny_transformer", "--input-shape", "2,8", "--int-input", "64",
                    "--dtype", "float64", "--format", "png", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tok.weight (tied: sites 15)" in done.stdout and "embedding" in done.stdout
    assert (tmp_path / "tiny_transformer.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tiny_transformer.dot").exists()


@pytest.mark.parametrize("target, shape, extra", [
    (f"{CNN}:small_cnn", "3,3,8,8", ["--num-classes", "10"]),
    (f"{TRANSFORMER}:tiny_transformer", "2,8", ["--int-input", "64", "--num-classes", "64", "--clipping", "automatic"]),
])
def test_check_passes_on_the_examples(target, shape, extra):
    done = bkfx_cli("check", target, "--input-shape", shape, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("PASS:")
    rows = [line.split() for line in lines[2:-1]]
    assert all(r[-1] == "ok" and float(r[-2]) <= 1e-6 for r in rows)
    assert rows[-1][:2] == ["per-sample", "norms"]


def test_check_fails_with_exit_code_1_when_gradients_differ(user_models):
    done = bkfx_cli("check", "models.py:dropout", "--input-shape", "4,12", cwd=user_models)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout.splitlines()[-1] and done.stderr == ""


BAD_INPUT = [  # (arguments, what the one line says); the first five run as subprocesses
    (["inspect", "missing.py:mlp", "--input-shape", "4,12"], "no such file: missing.py"),
    (["inspect", "models.py:nope", "--input-shape", "4,12"], "has no factory named 'nope'"),
    (["inspect", "models.py:raises", "--input-shape", "4,12"], "raises() raised ValueError: no weights for this size"),
    (["inspect", "models.py:mlp", "--input-shape", "4,13"], "forward failed on an input of shape [4, 13]"),
    (["check", "models.py:batchnorm", "--input-shape", "4,12"], "SampleMixingError: batch normalisation"),
    (["inspect", "models.py", "--input-shape", "4,12"], "FILE.py:FACTORY"),
    (["inspect", "broken.py:broken", "--input-shape", "4,12"], "importing broken.py failed: SyntaxError"),
    (["inspect", "models.py:not_a_model", "--input-shape", "4,12"], "not an nn.Module"),
    (["inspect", "models.py:mlp", "--input-shape", "4,x"], "--input-shape must be comma-separated integers"),
    (["inspect", "models.py:batchnorm", "--input-shape", "4,12"], "SampleMixingError: batch normalisation"),
    (["check", "models.py:mlp", "--input-shape", "4,12", "--num-classes", "5"], "--num-classes is 5"),
    (["check", "models.py:scalar", "--input-shape", "4,12", "--int-input", "3"], "forward failed"),
    (["check", "models.py:mlp"], "required: --input-shape"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


def one_error_line(returncode, stdout, stderr, says):
    assert returncode == 2, stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bkfx: error: ") and says in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""


@pytest.mark.parametrize("args, says", BAD_INPUT[:5])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(user_models, args, says):
    done = bkfx_cli(*args, cwd=user_models)
    one_error_line(done.returncode, done.stdout, done.stderr, says)


@pytest.mark.parametrize("args, says", BAD_INPUT[5:])
def test_more_bad_input_in_process(user_models, args, says, capsys, monkeypatch):
    from bkfx.tools.cli import main

    monkeypatch.chdir(user_models)
    code = main(args)
    out, err = capsys.readouterr()
    one_error_line(code, out, err, says)


def test_the_entry_point_is_installed():
    script = Path(sys.executable).with_name("bkfx")
    found = str(script) if script.exists() else shutil.which("bkfx")
    assert found, "the `bkfx` console script is not installed: pip install -e ."
    done = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "inspect" in done.stdout and "check" in done.stdout
