"""Small helpers several test files share (the tests folder is on sys.path under pytest)."""
from __future__ import annotations

from typing import Callable


def marked_lines(path: str) -> Callable[[str], int]:
    """`line_of(marker)`: the one line of the file at `path` that ends with the comment `# <marker>`
    (the source line a bkfx error must name)."""

    def line_of(marker: str) -> int:
        with open(path) as f:
            lines = [i for i, text in enumerate(f, 1) if text.rstrip().endswith(f"# {marker}")]
        assert len(lines) == 1, marker
        return lines[0]

    return line_of


def with_simulated_cuda_graphs(monkeypatch) -> None:
    """Every compiled step built from now on (in this test) runs bkfx's CUDA-graph path
    (mode="reduce-overhead") on the CPU with graphs simulated: each replay writes the same output
    memory, as a CUDA graph does."""
    import bkfx._runtime.step as compiled_step
    from bkfx._runtime.step import cudagraphs

    monkeypatch.setattr(cudagraphs, "capture", cudagraphs.simulated_capture)
    real_build = compiled_step.build

    def with_graphs(*args, **kwargs):
        program = real_build(*args, **kwargs)
        program.graphs = cudagraphs.CudaGraphs()
        return program

    monkeypatch.setattr(compiled_step, "build", with_graphs)
