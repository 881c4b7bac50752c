// torch_npu binding of the merge_attn_states kernel: cpattn::ascendc_merge_attn_states on NPU.
//
// outs: N tensors [rows, D] (one dtype: float32/float16/bfloat16), lses: N float32 [rows],
// out [rows, D] and out_lse [rows] written in place (out may be outs[0]). Inputs that are not
// contiguous are copied; the outputs must be contiguous. The kernel reads the inputs through two
// device tables of N addresses, copied to the device right after the tiling struct.
#include "npu_ops.h"

#include "../host/merge_attn_states_tiling.h"
#include "launch.h"

namespace cpattn_npu {

void merge_attn_states(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& out_lse) {
  const char* op = "cpattn::ascendc_merge_attn_states";
  TORCH_CHECK(!outs.empty() && outs.size() == lses.size(), op, ": needs N >= 1 outs and as many lses; got ",
              outs.size(), " and ", lses.size());
  const at::Device dev = out.device();
  const int code = dtype_code(out.scalar_type());
  TORCH_CHECK(code >= 0, op, ": out dtype must be float32, float16 or bfloat16; got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), op, ": out must be a contiguous [rows, D] tensor");
  TORCH_CHECK(out_lse.scalar_type() == at::kFloat && out_lse.is_contiguous() && out_lse.numel() == out.size(0),
              op, ": out_lse must be a contiguous float32 [rows] tensor");
  check_npu(out_lse, dev, op, "out_lse");
  const int64_t rows = out.size(0), d = out.size(1);
  const uint32_t n = u32(static_cast<int64_t>(outs.size()), op, "N");

  std::vector<at::Tensor> keep{out, out_lse};
  std::vector<uint64_t> optr(n), lptr(n);
  for (uint32_t i = 0; i < n; ++i) {
    check_npu(outs[i], dev, op, "outs[i]");
    check_npu(lses[i], dev, op, "lses[i]");
    TORCH_CHECK(outs[i].scalar_type() == out.scalar_type() && outs[i].numel() == rows * d, op, ": outs[", i,
                "] must be ", out.scalar_type(), " with ", rows * d, " elements");
    TORCH_CHECK(lses[i].scalar_type() == at::kFloat && lses[i].numel() == rows, op, ": lses[", i,
                "] must be float32 with ", rows, " elements");
    at::Tensor o = outs[i].is_contiguous() ? outs[i] : outs[i].contiguous();
    at::Tensor l = lses[i].is_contiguous() ? lses[i] : lses[i].contiguous();
    optr[i] = reinterpret_cast<uint64_t>(o.data_ptr());
    lptr[i] = reinterpret_cast<uint64_t>(l.data_ptr());
    keep.push_back(o);
    keep.push_back(l);
  }

  MergeAttnStatesTiling t{};
  const std::string why = cpattn::ascendc::merge_attn_states_tiling(
      static_cast<uint64_t>(rows), n, u32(d, op, "D"), static_cast<uint32_t>(code), /*writeLse=*/true,
      vector_core_count(dev), &t);
  TORCH_CHECK(why.empty(), op, ": ", why);
  if (rows == 0 || t.usedCores == 0) return;

  // [tiling | out addresses | lse addresses], one host-to-device copy
  std::vector<uint8_t> bytes = tiling_bytes(t, 2 * sizeof(uint64_t) * n);
  const size_t head = bytes.size() - 2 * sizeof(uint64_t) * n;
  std::memcpy(bytes.data() + head, optr.data(), sizeof(uint64_t) * n);
  std::memcpy(bytes.data() + head + sizeof(uint64_t) * n, lptr.data(), sizeof(uint64_t) * n);
  at::Tensor dev_bytes = to_device(bytes, dev);
  keep.push_back(dev_bytes);
  auto* base = static_cast<uint8_t*>(dev_bytes.data_ptr());
  void* o_ptr = out.data_ptr();
  void* l_ptr = out_lse.data_ptr();
  const uint32_t block_dim = t.usedCores;
  enqueue_launch("cpattn_merge_attn_states", dev, std::move(keep), [=](void* stream) {
    launch_merge_attn_states(block_dim, stream, base + head, base + head + sizeof(uint64_t) * n, o_ptr, l_ptr, base);
  });
}

}  // namespace cpattn_npu
