// torch_npu binding of the merge_attn_states kernel: cpattn::ascendc_merge_attn_states on NPU, and
// cpattn::ascendc_merge_attn_states_check (why it cannot run those arguments; "" if it can).
//
// outs: N tensors [rows, D] (one dtype: float32/float16/bfloat16), lses: N float32 [rows],
// out [rows, D] and out_lse [rows] written in place (out may be outs[0]). Inputs that are not
// contiguous are copied; the outputs must be contiguous. The kernel reads the inputs through two
// device tables of N addresses, copied to the device right after the tiling struct.
#include "npu_ops.h"

#include "../host/merge_attn_states_tiling.h"
#include "launch.h"

namespace cpattn_npu {

namespace {
constexpr const char* kMergeOp = "cpattn::ascendc_merge_attn_states";

// Validate the arguments and fill the tiling (raises c10::Error with the reason).
MergeAttnStatesTiling plan_merge(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& out_lse) {
  TORCH_CHECK(!outs.empty() && outs.size() == lses.size(), kMergeOp, ": needs N >= 1 outs and as many lses; got ",
              outs.size(), " and ", lses.size());
  const at::Device dev = out.device();
  const int code = dtype_code(out.scalar_type());
  TORCH_CHECK(code >= 0, kMergeOp, ": out dtype must be float32, float16 or bfloat16; got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), kMergeOp, ": out must be a contiguous [rows, D] tensor");
  TORCH_CHECK(out_lse.scalar_type() == at::kFloat && out_lse.is_contiguous() && out_lse.numel() == out.size(0),
              kMergeOp, ": out_lse must be a contiguous float32 [rows] tensor");
  check_npu(out_lse, dev, kMergeOp, "out_lse");
  const int64_t rows = out.size(0), d = out.size(1);
  for (size_t i = 0; i < outs.size(); ++i) {
    check_npu(outs[i], dev, kMergeOp, "outs[i]");
    check_npu(lses[i], dev, kMergeOp, "lses[i]");
    TORCH_CHECK(outs[i].scalar_type() == out.scalar_type() && outs[i].numel() == rows * d, kMergeOp, ": outs[", i,
                "] must be ", out.scalar_type(), " with ", rows * d, " elements");
    TORCH_CHECK(lses[i].scalar_type() == at::kFloat && lses[i].numel() == rows, kMergeOp, ": lses[", i,
                "] must be float32 with ", rows, " elements");
  }
  MergeAttnStatesTiling t{};
  const std::string why = cpattn::ascendc::merge_attn_states_tiling(
      static_cast<uint64_t>(rows), u32(static_cast<int64_t>(outs.size()), kMergeOp, "N"), u32(d, kMergeOp, "D"),
      static_cast<uint32_t>(code), /*writeLse=*/true, vector_core_count(dev), &t);
  TORCH_CHECK(why.empty(), kMergeOp, ": ", why);
  return t;
}
}  // namespace

void merge_attn_states(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& out_lse) {
  const c10_npu::OptionalNPUGuard guard(out.device());
  const MergeAttnStatesTiling t = plan_merge(outs, lses, out, out_lse);
  if (out.size(0) == 0 || t.usedCores == 0) return;
  const at::Device dev = out.device();
  const size_t n = outs.size();
  std::vector<at::Tensor> keep{out, out_lse};
  std::vector<uint64_t> optr(n), lptr(n);
  for (size_t i = 0; i < n; ++i) {
    at::Tensor o = outs[i].is_contiguous() ? outs[i] : outs[i].contiguous();
    at::Tensor l = lses[i].is_contiguous() ? lses[i] : lses[i].contiguous();
    optr[i] = reinterpret_cast<uint64_t>(o.data_ptr());
    lptr[i] = reinterpret_cast<uint64_t>(l.data_ptr());
    keep.push_back(o);
    keep.push_back(l);
  }
  // [tiling | out addresses | lse addresses], one host-to-device copy
  const size_t table = sizeof(uint64_t) * n;
  std::vector<uint8_t> bytes = tiling_bytes(t, 2 * table);
  const size_t head = bytes.size() - 2 * table;
  std::memcpy(bytes.data() + head, optr.data(), table);
  std::memcpy(bytes.data() + head + table, lptr.data(), table);
  at::Tensor dev_bytes = to_device(bytes, dev);
  keep.push_back(dev_bytes);
  auto* base = static_cast<uint8_t*>(dev_bytes.data_ptr());
  void* o_ptr = out.data_ptr();
  void* l_ptr = out_lse.data_ptr();
  const uint32_t block_dim = t.usedCores;
  enqueue_launch("cpattn_merge_attn_states", dev, std::move(keep), [=](void* stream) {
    launch_merge_attn_states(block_dim, stream, base + head, base + head + table, o_ptr, l_ptr, base);
  });
}

std::string merge_attn_states_check(at::TensorList outs, at::TensorList lses, const at::Tensor& out,
                                    const at::Tensor& out_lse) {
  return why_not([&] { plan_merge(outs, lses, out, out_lse); });
}

}  // namespace cpattn_npu
