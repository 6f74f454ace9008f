"""`python -m fuseformer.bench ...` is `fuseformer bench ...`."""
import sys

from .cli import bench_main

sys.exit(bench_main(sys.argv[1:]))
