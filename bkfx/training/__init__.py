"""DP-SGD training around a compiled model (public modules).

`optimizer` (`DPOptimizer`), `data` (Poisson sampling, physical batches), `accounting`
(`Accountant`, ε), `report` (`privacy_report`), `checkpoint` (save and resume a DP run),
`distributed` (DDP and FSDP2 collectives), `batchnorm` (`replace_batchnorm`). The common names
are also in `bkfx` itself.
"""
