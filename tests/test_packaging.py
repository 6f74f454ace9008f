"""The install layout: one `fuseformer` namespace, and no harm when the repository root is on
sys.path (as under `python -m pytest` run there) and someone imports the bare name `kernels`,
as transformers does when it probes for Hugging Face's `kernels` package."""
import importlib.util
import os
import pathlib
import site
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


def _venv_site_packages(venv: pathlib.Path) -> pathlib.Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return pathlib.Path(out.stdout.strip())


def test_offline_editable_install_into_a_fresh_venv(tmp_path):
    """`pip install --no-build-isolation --no-deps -e .` with no index, as on a GPU machine
    without network that already has torch: it must build through pyproject.toml's backend
    and leave `import fuseformer.kernels` working from any folder."""
    venv = tmp_path / "venv"
    # --system-site-packages: torch, triton and pip come from this interpreter, nothing is
    # downloaded; --without-pip keeps the venv's creation under a second.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    venv_site = _venv_site_packages(venv)
    if sys.prefix != sys.base_prefix:
        # This interpreter is a venv itself (the GPU machines' torch lives in one): the new
        # venv's "system" packages are the base Python's, not this venv's. Hand it this
        # interpreter's site-packages too, after its own.
        (venv_site / "_parent_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    if importlib.util.find_spec("wheel") is None:
        # pip falls back to `setup.py develop` (which setuptools >= 80 turns into a nested,
        # isolated, online `pip install`) only where `wheel` is importable, as on most
        # machines. Make it importable here too, with setuptools' own vendored copy, so this
        # test fails the way those machines do if the build declaration goes missing.
        vendored = pathlib.Path(importlib.util.find_spec("setuptools").origin).parent / "_vendor" / "wheel"
        if vendored.is_dir():
            (venv_site / "wheel").symlink_to(vendored, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", TRITON_INTERPRET="1")
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert list(venv_site.glob("fuseformer-*.dist-info")), "pip reported success but installed nothing into the venv"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import fuseformer.kernels as K, fuseformer.bench.cli as c; print(K.__file__); print(callable(K.linear_gelu))"
    out = subprocess.run([python, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    path, is_callable = out.stdout.split()
    assert pathlib.Path(path).resolve() == (ROOT / "kernels" / "__init__.py").resolve() and is_callable == "True"
