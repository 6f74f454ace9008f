"""`python -m fuseformer.bench ...` is `fuseformer bench ...`."""
import sys

from .cli import main

sys.exit(main())
