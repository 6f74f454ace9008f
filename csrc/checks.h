// The argument checks of both Python modules (bindings.cpp, bindings_gemm.cpp): each failed
// check raises a Python exception naming the argument (TypeError for dtypes, ValueError for
// devices, shapes and sizes, RuntimeError otherwise) before any pointer reaches a kernel.
//
// Why messages are built by fuseformer::msg and not by TORCH_CHECK's own formatting: on the
// H100 and H200 machines (torch 2.11+cu130, the module built there with g++ and nvcc 13.0),
// every failed check whose message streamed a number into c10::str's std::ostringstream
// (an int64, or a shape, which c10 prints number by number) killed the process with a
// segmentation fault instead of raising, while the checks whose messages held only strings,
// dtypes and devices raised as they should (test_gpu_check_macros_raise_python_errors,
// 2026-11-26: 16 crashed, every one of them a message with a number). msg renders numbers with
// std::to_string and hands TORCH_CHECK one std::string, which c10::str passes through without
// a stream. The cause inside that process's C++ runtime was not pinned down; this avoids the
// whole path rather than one symptom of it.
//
// Only c10 headers: tests/test_csrc_checks.py compiles this with g++ against a CPU torch.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace fuseformer {
namespace detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, std::string_view text) { out.append(text.data(), text.size()); }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }

// A shape or strides as torch prints them: [2, 3, 4].
inline void append(std::string& out, c10::IntArrayRef values) {
  out += '[';
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}

template <typename T, std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& out, T value) {
  out += std::to_string(value);
}

}  // namespace detail

// The pieces of a message joined into one string: text, numbers, shapes, dtypes and devices.
template <typename... Pieces>
std::string msg(const Pieces&... pieces) {
  std::string out;
  (detail::append(out, pieces), ...);
  return out;
}

}  // namespace fuseformer

// TORCH_CHECK_* with the message built by fuseformer::msg (only on failure: TORCH_CHECK
// evaluates its message arguments in the failing branch alone).
#define FF_CHECK(cond, ...) TORCH_CHECK(cond, ::fuseformer::msg(__VA_ARGS__))
#define FF_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::fuseformer::msg(__VA_ARGS__))
#define FF_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::fuseformer::msg(__VA_ARGS__))

// One-line checks shared by both modules.
#define CHECK_CUDA(x) FF_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got one on ", (x).device())
#define CHECK_CONTIGUOUS(x) FF_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")
#define CHECK_DIM(x, n) FF_CHECK_VALUE((x).dim() == (n), #x " must have " #n " dimensions, got shape ", (x).sizes())
#define CHECK_SAME_DTYPE(x, ref)                                                                              \
  FF_CHECK_TYPE((x).scalar_type() == (ref).scalar_type(), #x " has dtype ", (x).scalar_type(), " but " #ref \
                " has ", (ref).scalar_type(), "; they must match")
#define CHECK_SAME_DEVICE(x, ref) \
  FF_CHECK_VALUE((x).device() == (ref).device(), #x " is on ", (x).device(), " but " #ref " is on ", (ref).device())
#define CHECK_LIKE(x, ref) \
  CHECK_CUDA(x);           \
  CHECK_SAME_DEVICE(x, ref); \
  CHECK_SAME_DTYPE(x, ref)
