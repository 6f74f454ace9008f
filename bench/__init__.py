"""fuseformer.bench: the benchmark harness behind the `fuseformer bench` command.

Case files (ops.py, model_cases.py) declare cases; runner.py runs every case the same way
(parity against the float64 reference first, then timing of whatever passed); report.py
writes the table, markdown and plots; compare.py diffs two runs. Nothing here imports
fuseformer.kernels at package import: the CLI decides first whether Triton must run in
its interpreter (no CUDA), which has to be set before the kernels are defined.
"""
