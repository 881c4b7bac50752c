// Shared pieces of the torch_npu binding (plain C++: no kernel code, no `<<<>>>`).
//
// Device: every op makes its tensors' NPU the current device for its duration
// (c10_npu::OptionalNPUGuard), so the stream, the queued launch and the runtime calls all refer
// to that device in a process that drives several NPUs.
//
// Ordering: torch_npu queues its own work through a task queue before it reaches the stream, so
// a kernel launched straight onto the stream could overtake work queued earlier. Every launch
// here therefore goes through at_npu::native::OpCommand::SetCustomHandler (as vllm-ascend's
// custom kernels do): the handler runs in queue order on the current stream. The stream handle is
// taken with stream(false), which does not drain the queue.
#ifndef CPATTN_ASCENDC_NPU_COMMON_H
#define CPATTN_ASCENDC_NPU_COMMON_H

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "acl/acl.h"
#include "torch_npu/csrc/core/npu/NPUGuard.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

namespace cpattn_npu {

// dtype code shared by every kernel's tiling: 0 float32, 1 float16, 2 bfloat16 (-1: none).
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: return -1;
  }
}

inline void check_npu(const at::Tensor& t, const at::Device& dev, const char* op, const char* name) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, "; got ", t.device());
}

inline uint32_t u32(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v >= 0 && v <= static_cast<int64_t>(UINT32_MAX), op, ": ", what, " (", v, ") out of the kernel's 32-bit range");
  return static_cast<uint32_t>(v);
}

// Vector (AIV) cores of `dev`, asked once per device from the runtime.
uint32_t vector_core_count(const at::Device& dev);

// Device copy of `bytes` host bytes (a tiling struct, pointer tables): staged in pinned host
// memory and copied asynchronously on the current stream, so it is ordered before the launch.
at::Tensor to_device(const std::vector<uint8_t>& bytes, const at::Device& dev);

// Host bytes of a tiling struct, 32-byte padded, optionally followed by more bytes.
template <typename Tiling>
std::vector<uint8_t> tiling_bytes(const Tiling& t, size_t extra = 0) {
  const size_t head = (sizeof(Tiling) + 31) / 32 * 32;
  std::vector<uint8_t> b(head + extra, 0);
  std::memcpy(b.data(), &t, sizeof(Tiling));
  return b;
}

// "" when `plan` returns normally, else the message of the c10::Error it raised (a backend reason).
template <typename F>
std::string why_not(F&& plan) {
  try {
    plan();
    return "";
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
}

// Queue `launch(stream)` on `dev`'s current stream, in order with torch_npu's queued work.
// `keep` holds the tensors the kernel reads or writes until the launch has been issued.
void enqueue_launch(const char* name, const at::Device& dev, std::vector<at::Tensor> keep,
                    std::function<void(void*)> launch);

}  // namespace cpattn_npu

#endif
