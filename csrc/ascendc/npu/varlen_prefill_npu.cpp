// torch_npu binding of the varlen_prefill kernel: cpattn::ascendc_varlen_prefill on NPU (PCP's
// local kernel; the contract of the registry's attention kernel, cpattn/backends/registry.py),
// and cpattn::ascendc_varlen_prefill_check (why it cannot run those arguments; "" if it can).
//
// q [Tq, Hq, Dqk]; k [Tk, Hkv, Dqk] and v [Tk, Hkv, Dv] with unit stride on the last dim and any
// token and head strides (the ring's packed K|V views are read in place; other layouts are
// copied); cu_seqlens_q/k [B + 1]; with `causal`, q_positions [Tq] and k_positions [Tk] (the
// Python backend fills the defaults). Index tensors go to the kernel as int32. Returns
// out [Tq, Hq, Dv] (q's dtype) and lse [Tq, Hq] float32.
#include "npu_ops.h"

#include "../host/varlen_prefill_tiling.h"
#include "launch.h"

namespace cpattn_npu {

namespace {
constexpr const char* kVarlenOp = "cpattn::ascendc_varlen_prefill";

// k or v can be read in place: unit channel stride, head and token strides that do not overlap
// (the host tiling checks the head strides again); otherwise the binding copies it.
bool in_place(const at::Tensor& x) {
  const bool unit = x.size(2) <= 1 || x.stride(2) == 1;
  const bool heads = x.size(1) <= 1 || x.stride(1) >= x.size(2);
  const bool tokens = x.size(0) <= 1 || x.stride(0) >= (x.size(1) <= 1 ? x.size(2) : x.stride(1) * x.size(1));
  return unit && heads && tokens;
}

// (token stride, head stride) the kernel sees for k or v
std::pair<int64_t, int64_t> kernel_strides(const at::Tensor& x) {
  if (in_place(x)) return {x.stride(0), x.stride(1)};
  return {x.size(1) * x.size(2), x.size(2)};
}

// longest query sequence, from host values when cu_seqlens_q is on the CPU (else Tq: a looser
// bound on the tokens per work item, without a device-to-host copy)
int64_t max_seq(const at::Tensor& cu, int64_t tq) {
  if (!cu.device().is_cpu() || cu.numel() < 2) return tq;
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  int64_t m = 0;
  for (int64_t i = 0; i + 1 < c.numel(); ++i) m = std::max(m, p[i + 1] - p[i]);
  return m;
}

// Validate the arguments and fill the tiling (raises c10::Error with the reason).
VarlenPrefillTiling plan_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         const c10::optional<at::Tensor>& q_positions, const c10::optional<at::Tensor>& k_positions,
                         bool causal, double scale) {
  const at::Device dev = q.device();
  const int code = dtype_code(q.scalar_type());
  TORCH_CHECK(code >= 0, kVarlenOp, ": q dtype must be float32, float16 or bfloat16; got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, kVarlenOp, ": q, k and v must be 3-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kVarlenOp,
              ": q, k and v must share one dtype");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == q.size(2), kVarlenOp,
              ": k [Tk, Hkv, Dqk] and v [Tk, Hkv, Dv] must match q's Dqk and each other");
  check_npu(k, dev, kVarlenOp, "k");
  check_npu(v, dev, kVarlenOp, "v");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_k.dim() == 1 && cu_seqlens_q.numel() == cu_seqlens_k.numel() &&
                  cu_seqlens_q.numel() >= 2,
              kVarlenOp, ": cu_seqlens_q and cu_seqlens_k must both be [B + 1] with B >= 1");
  if (causal) {
    TORCH_CHECK(q_positions.has_value() && k_positions.has_value(), kVarlenOp,
                ": causal attention needs q_positions and k_positions");
    TORCH_CHECK(q_positions->numel() == q.size(0) && k_positions->numel() == k.size(0), kVarlenOp,
                ": q_positions must be [Tq] and k_positions [Tk]");
  }
  const auto [kt, kh] = kernel_strides(k);
  const auto [vt, vh] = kernel_strides(v);
  cpattn_asc::VarlenPrefillShape s{};
  s.dtype = static_cast<uint32_t>(code);
  s.numTokensQ = u32(q.size(0), kVarlenOp, "Tq");
  s.numTokensK = u32(k.size(0), kVarlenOp, "Tk");
  s.numSeqs = u32(cu_seqlens_q.numel() - 1, kVarlenOp, "B");
  s.hq = u32(q.size(1), kVarlenOp, "Hq");
  s.hkv = u32(k.size(1), kVarlenOp, "Hkv");
  s.dqk = u32(q.size(2), kVarlenOp, "Dqk");
  s.dv = u32(v.size(2), kVarlenOp, "Dv");
  s.maxSeqQ = u32(max_seq(cu_seqlens_q, q.size(0)), kVarlenOp, "longest query sequence");
  s.kStrideT = u32(kt, kVarlenOp, "k token stride");
  s.kStrideH = u32(kh, kVarlenOp, "k head stride");
  s.vStrideT = u32(vt, kVarlenOp, "v token stride");
  s.vStrideH = u32(vh, kVarlenOp, "v head stride");
  s.causal = causal;
  s.scale = static_cast<float>(scale);
  VarlenPrefillTiling t{};
  const std::string why = cpattn_asc::VarlenPrefillTilingFor(s, vector_core_count(dev), t);
  TORCH_CHECK(why.empty(), kVarlenOp, ": ", why);
  return t;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_prefill(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& cu_seqlens_k,
                                                  const c10::optional<at::Tensor>& q_positions,
                                                  const c10::optional<at::Tensor>& k_positions, bool causal,
                                                  double scale) {
  const at::Device dev = q_in.device();
  const c10_npu::OptionalNPUGuard guard(dev);
  TORCH_CHECK(q_in.dim() == 3 && v_in.dim() == 3, kVarlenOp, ": q, k and v must be 3-D");
  at::Tensor out = at::empty({q_in.size(0), q_in.size(1), v_in.size(2)}, q_in.options());
  at::Tensor lse = at::empty({q_in.size(0), q_in.size(1)}, q_in.options().dtype(at::kFloat));
  if (q_in.size(0) == 0) return {out, lse};
  const VarlenPrefillTiling t =
      plan_varlen(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, causal, scale);
  if (t.blockDim == 0) return {out, lse};

  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = in_place(k_in) ? k_in : k_in.contiguous(), v = in_place(v_in) ? v_in : v_in.contiguous();
  const at::Tensor cuq = cu_seqlens_q.to(dev, at::kInt).contiguous(), cuk = cu_seqlens_k.to(dev, at::kInt).contiguous();
  at::Tensor tiling = to_device(tiling_bytes(t), dev);
  std::vector<at::Tensor> keep{q, k, v, cuq, cuk, out, lse, tiling};
  void *pqp = nullptr, *pkp = nullptr;
  if (causal) {
    keep.push_back(q_positions->to(dev, at::kInt).contiguous());
    keep.push_back(k_positions->to(dev, at::kInt).contiguous());
    pqp = keep[keep.size() - 2].data_ptr();
    pkp = keep.back().data_ptr();
  }
  const uint32_t block_dim = t.blockDim;
  void *pq = q.data_ptr(), *pk = k.data_ptr(), *pv = v.data_ptr(), *pcq = cuq.data_ptr(), *pck = cuk.data_ptr(),
       *po = out.data_ptr(), *pl = lse.data_ptr(), *pti = tiling.data_ptr();
  enqueue_launch("cpattn_varlen_prefill", dev, std::move(keep), [=](void* stream) {
    launch_varlen_prefill(block_dim, stream, pq, pk, pv, pcq, pck, pqp, pkp, po, pl, pti);
  });
  return {out, lse};
}

std::string varlen_prefill_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 const c10::optional<at::Tensor>& q_positions,
                                 const c10::optional<at::Tensor>& k_positions, bool causal, double scale) {
  if (q.dim() == 3 && v.dim() == 3 && q.size(0) == 0) return "";
  return why_not([&] { plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, causal, scale); });
}

}  // namespace cpattn_npu
