"""bkfx's runtime, internal: what runs when a compiled model steps.

`ops` (the BK site operation the rewritten graph calls), `ledger` (per-sample pieces recorded in
backward, clipped sums written into `.grad`), `clipping` (clip functions and styles), `guards`
(when a capture is still valid), `step` (the compiled BK step: trace, kernels, programs, CUDA
graphs, the autograd Function that runs them), `dynamo_op` (the DP model as one operator under
`torch.compile`), `live_models` (the compiled models alive now). Imports the IR and the rules.
"""
