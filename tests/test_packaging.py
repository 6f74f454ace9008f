"""The install layout: one `fuseformer` namespace, and no harm when the repository root is on
sys.path (as under `python -m pytest` run there) and someone imports the bare name `kernels`,
as transformers does when it probes for Hugging Face's `kernels` package."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import sys, torch
import fuseformer.kernels as K
x = torch.randn(4, 8)
w, b = torch.randn(8), torch.randn(8)
before = K.add_layer_norm(x, None, w, b, backend="triton")
import kernels  # the bare folder name, found through the repository root on sys.path
assert kernels is K, "a bare `kernels` import must hand out fuseformer.kernels, not run it again"
import transformers.models.bert.modeling_bert  # probes `kernels` itself
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available(), "fuseformer.kernels must not pass for Hugging Face's kernels"
after = K.add_layer_norm(x, None, w, b, backend="triton")  # the custom op is still registered
assert torch.equal(before, after)
print("ok")
"""


def test_bare_kernels_import_does_not_register_the_custom_ops_twice():
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_public_names_import_under_the_fuseformer_namespace():
    import fuseformer.bench
    import fuseformer.kernels as K
    import fuseformer.models as M

    assert K.__name__ == "fuseformer.kernels" and M.__name__ == "fuseformer.models"
    assert fuseformer.bench.__name__ == "fuseformer.bench"
    for name in ("scaled_dot_product_attention", "varlen_attention", "add_layer_norm", "linear_gelu",
                 "set_backend", "get_backend", "use_backend", "available_backends"):
        assert callable(getattr(K, name)), name
