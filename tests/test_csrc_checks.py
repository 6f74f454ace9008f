"""csrc/checks.h, the argument checks of both csrc/ Python modules, compiled with g++ against this
machine's torch (c10 only, no CUDA) and run: the messages the checks build, and the exception
type each check throws (c10::ValueError and c10::TypeError are what pybind11 turns into Python's
ValueError and TypeError).

Why the messages are built by fuseformer::msg and not by TORCH_CHECK's own stream is in
checks.h: on the GPU machines a check whose message streamed a number crashed the process. The
rule test below keeps every check in csrc/ on that path.
"""
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

DRIVER = r"""
#include "checks.h"

#include <cstdio>
#include <vector>

#include <c10/core/Device.h>

namespace {
int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

template <typename Error, typename Fn>
void expect_throw(Fn fn, const std::string& text) {
  try {
    fn();
    expect(false, "no exception, wanted: " + text);
  } catch (const Error& err) {
    const std::string got = err.what_without_backtrace();
    expect(got.find(text) != std::string::npos, "message '" + got + "' lacks '" + text + "'");
  } catch (const std::exception& err) {
    expect(false, std::string("wrong exception type: ") + err.what());
  }
}
}  // namespace

int main() {
  using fuseformer::msg;
  const std::vector<int64_t> shape = {2, 9000, 1};
  const c10::IntArrayRef sizes(shape);
  const std::string approximate = "relu";
  expect(msg("head dim ", int64_t{40}, " of ", 3, "u: ", 7u) == "head dim 40 of 3u: 7", "integers");
  expect(msg("shape ", sizes, ", empty ", c10::IntArrayRef()) == "shape [2, 9000, 1], empty []", "shapes");
  expect(msg("got '", approximate, "'") == "got 'relu'", "std::string");
  expect(msg("dtype ", c10::ScalarType::BFloat16) == "dtype BFloat16", "dtype");
  expect(msg("on ", c10::Device(c10::DeviceType::CPU)) == "on cpu", "device");
  expect(msg("eps ", -1.5).rfind("eps -1.5", 0) == 0, "double");
  expect(msg() == "", "empty");

  // The macros: the right exception type, the message built only on failure.
  int built = 0;
  auto counted = [&]() { ++built; return std::string("x"); };
  FF_CHECK_VALUE(true, "never ", counted());
  expect(built == 0, "a passing check built its message");
  const int64_t hidden = 9000;
  expect_throw<c10::ValueError>([&] { FF_CHECK_VALUE(hidden <= 8192, "hidden size must be in [1, ", 8192, "], got ", hidden); },
                                "hidden size must be in [1, 8192], got 9000");
  expect_throw<c10::TypeError>([&] { FF_CHECK_TYPE(false, "x must be float16, got ", c10::ScalarType::Double); },
                               "x must be float16, got Double");
  expect_throw<c10::Error>([&] { FF_CHECK(false, "launch failed: ", "invalid argument"); }, "launch failed: invalid argument");
  const std::vector<int64_t> want = {1, 9};
  expect_throw<c10::ValueError>(
      [&] {
        const c10::IntArrayRef got(shape);
        FF_CHECK_VALUE(got == c10::IntArrayRef(want), "key_bias must have shape ", c10::IntArrayRef(want), ", got ", got);
      },
      "key_bias must have shape [1, 9], got [2, 9000, 1]");
  std::printf(failures == 0 ? "ALL OK\n" : "%d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_every_check_builds_its_message_without_a_stream():
    """TORCH_CHECK* appears only inside checks.h's FF_CHECK* (and nothing calls c10::str): a
    check written with TORCH_CHECK's own formatting would stream its numbers again."""
    offenders = []
    for path in sorted(CSRC.iterdir()):
        if path.suffix not in (".cpp", ".cu", ".cuh", ".h") or path.name == "checks.h":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bTORCH_CHECK\w*\s*\(|\bAT_ERROR\b|\bc10::str\s*\(", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "use FF_CHECK / FF_CHECK_VALUE / FF_CHECK_TYPE (csrc/checks.h):\n" + "\n".join(offenders)
    for name in ("bindings.cpp", "bindings_gemm.cpp"):
        assert '#include "checks.h"' in (CSRC / name).read_text(), name


def test_checks_header_messages_and_exception_types(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    source = tmp_path / "checks_driver.cpp"
    source.write_text(DRIVER)
    binary = tmp_path / "checks_driver"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, "-std=c++17", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}", *includes, str(source),
           "-o", str(binary), *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10"]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr[-4000:]}"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and "ALL OK" in ran.stdout, ran.stdout + ran.stderr
