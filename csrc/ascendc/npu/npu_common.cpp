#include "npu_common.h"

#include <array>
#include <mutex>

namespace cpattn_npu {

uint32_t vector_core_count(const at::Device& dev) {
  static std::mutex mu;
  static std::array<int64_t, 64> cache{};  // 0: not asked yet
  const int idx = dev.index() < 0 ? 0 : dev.index();
  TORCH_CHECK(idx < static_cast<int>(cache.size()), "cpattn ascendc: device index ", idx, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (cache[idx] == 0) {
    int64_t n = 0;
    const aclError rc = aclGetDeviceCapability(static_cast<uint32_t>(idx), ACL_DEVICE_INFO_VECTOR_CORE_NUM, &n);
    TORCH_CHECK(rc == ACL_SUCCESS && n > 0, "cpattn ascendc: aclGetDeviceCapability(VECTOR_CORE_NUM) failed on npu:",
                idx, " (error ", rc, ", value ", n, ")");
    cache[idx] = n;
  }
  return static_cast<uint32_t>(cache[idx]);
}

at::Tensor to_device(const std::vector<uint8_t>& bytes, const at::Device& dev) {
  at::Tensor host = at::empty({static_cast<int64_t>(bytes.size())},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  return host.to(dev, /*non_blocking=*/true);
}

void enqueue_launch(const char* name, const at::Device& dev, std::vector<at::Tensor> keep,
                    std::function<void(void*)> launch) {
  void* stream = c10_npu::getCurrentNPUStream(dev.index()).stream(false);
  at_npu::native::OpCommand cmd;
  cmd.Name(name);
  cmd.SetCustomHandler([stream, keep = std::move(keep), launch = std::move(launch)]() -> int {
    launch(stream);
    return 0;
  });
  cmd.Run();
}

}  // namespace cpattn_npu
