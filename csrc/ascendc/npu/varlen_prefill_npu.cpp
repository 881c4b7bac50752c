// torch_npu binding of the varlen_prefill kernel: cpattn::ascendc_varlen_prefill on NPU (PCP's
// local kernel; the contract of the registry's attention kernel, cpattn/backends/registry.py).
//
// q [Tq, Hq, Dqk]; k [Tk, Hkv, Dqk] and v [Tk, Hkv, Dv] with unit stride on the last dim and heads
// adjacent within a token (any token stride: the ring's packed K|V views are used as they are
// when Hkv is 1; otherwise copied); cu_seqlens_q/k [B + 1]; with `causal`, q_positions [Tq] and
// k_positions [Tk] (the Python backend fills the defaults). Index tensors go to the kernel as
// int32. Returns out [Tq, Hq, Dv] (q's dtype) and lse [Tq, Hq] float32.
#include "npu_ops.h"

#include "../host/varlen_prefill_tiling.h"
#include "launch.h"

namespace cpattn_npu {

namespace {
// k or v as the kernel reads it: last dim and heads dense, any token stride
at::Tensor token_strided(const at::Tensor& x) {
  const bool ok = x.size(2) <= 1 || x.stride(2) == 1;
  const bool heads = x.size(1) <= 1 || x.stride(1) == x.size(2);
  return ok && heads && x.stride(0) >= x.size(1) * x.size(2) ? x : x.contiguous();
}

// longest query sequence, from host values when cu_seqlens_q is on the CPU (else Tq: a looser
// bound on the tokens per work item, no device-to-host copy)
int64_t max_seq(const at::Tensor& cu, int64_t tq) {
  if (!cu.device().is_cpu() || cu.numel() < 2) return tq;
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  int64_t m = 0;
  for (int64_t i = 0; i + 1 < c.numel(); ++i) m = std::max(m, p[i + 1] - p[i]);
  return m;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_prefill(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& cu_seqlens_k,
                                                  const c10::optional<at::Tensor>& q_positions,
                                                  const c10::optional<at::Tensor>& k_positions, bool causal,
                                                  double scale) {
  const char* op = "cpattn::ascendc_varlen_prefill";
  const at::Device dev = q_in.device();
  const int code = dtype_code(q_in.scalar_type());
  TORCH_CHECK(code >= 0, op, ": q dtype must be float32, float16 or bfloat16; got ", q_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3, op, ": q, k and v must be 3-D");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), op,
              ": q, k and v must share one dtype");
  TORCH_CHECK(k_in.size(0) == v_in.size(0) && k_in.size(1) == v_in.size(1) && k_in.size(2) == q_in.size(2), op,
              ": k [Tk, Hkv, Dqk] and v [Tk, Hkv, Dv] must match q's Dqk and each other");
  check_npu(k_in, dev, op, "k");
  check_npu(v_in, dev, op, "v");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_k.dim() == 1 && cu_seqlens_q.numel() == cu_seqlens_k.numel(),
              op, ": cu_seqlens_q and cu_seqlens_k must both be [B + 1]");
  TORCH_CHECK(!causal || (q_positions.has_value() && k_positions.has_value()), op,
              ": causal attention needs q_positions and k_positions");

  const at::Tensor q = q_in.contiguous(), k = token_strided(k_in), v = token_strided(v_in);
  const int64_t tq = q.size(0), hq = q.size(1), dv = v.size(2);
  at::Tensor out = at::empty({tq, hq, dv}, q.options());
  at::Tensor lse = at::empty({tq, hq}, q.options().dtype(at::kFloat));
  if (tq == 0) return {out, lse};

  cpattn_asc::VarlenPrefillShape s{};
  s.dtype = static_cast<uint32_t>(code);
  s.numTokensQ = u32(tq, op, "Tq");
  s.numTokensK = u32(k.size(0), op, "Tk");
  s.numSeqs = u32(cu_seqlens_q.numel() - 1, op, "B");
  s.hq = u32(hq, op, "Hq");
  s.hkv = u32(k.size(1), op, "Hkv");
  s.dqk = u32(q.size(2), op, "Dqk");
  s.dv = u32(dv, op, "Dv");
  s.maxSeqQ = u32(max_seq(cu_seqlens_q, tq), op, "longest query sequence");
  s.kStrideT = u32(k.stride(0), op, "k token stride");
  s.vStrideT = u32(v.stride(0), op, "v token stride");
  s.causal = causal;
  s.scale = static_cast<float>(scale);
  VarlenPrefillTiling t{};
  const std::string why = cpattn_asc::VarlenPrefillTilingFor(s, vector_core_count(dev), t);
  TORCH_CHECK(why.empty(), op, ": ", why);
  if (t.blockDim == 0) return {out, lse};

  const at::Tensor cuq = cu_seqlens_q.to(dev, at::kInt).contiguous(), cuk = cu_seqlens_k.to(dev, at::kInt).contiguous();
  at::Tensor qp, kp;
  if (causal) {
    TORCH_CHECK(q_positions->numel() == tq && k_positions->numel() == k.size(0), op,
                ": q_positions must be [Tq] and k_positions [Tk]");
    qp = q_positions->to(dev, at::kInt).contiguous();
    kp = k_positions->to(dev, at::kInt).contiguous();
  }
  at::Tensor tiling = to_device(tiling_bytes(t), dev);
  std::vector<at::Tensor> keep{q, k, v, cuq, cuk, out, lse, tiling};
  if (causal) {
    keep.push_back(qp);
    keep.push_back(kp);
  }
  const uint32_t block_dim = t.blockDim;
  void *pq = q.data_ptr(), *pk = k.data_ptr(), *pv = v.data_ptr(), *pcq = cuq.data_ptr(), *pck = cuk.data_ptr(),
       *pqp = causal ? qp.data_ptr() : nullptr, *pkp = causal ? kp.data_ptr() : nullptr, *po = out.data_ptr(),
       *pl = lse.data_ptr(), *pti = tiling.data_ptr();
  enqueue_launch("cpattn_varlen_prefill", dev, std::move(keep), [=](void* stream) {
    launch_varlen_prefill(block_dim, stream, pq, pk, pv, pcq, pck, pqp, pkp, po, pl, pti);
  });
  return {out, lse};
}

}  // namespace cpattn_npu
