// torch_npu binding of the paged_decode kernel: cpattn::ascendc_paged_decode on NPU (DCP's local
// kernel; the contract of the registry's paged_attention kernel, cpattn/backends/registry.py),
// and cpattn::ascendc_paged_decode_check (why it cannot run those arguments; "" if it can).
//
// q [T, Hq, Dqk]; k_cache [NB, bs, Hkv, Dqk]; v_cache [NB, bs, Hkv, Dv] or None (MLA: V is the
// first v_head_dim channels of each K row); block_table [B, MB], query_start_loc [B + 1] and
// visible_lens [T] (any integer dtype; passed to the kernel as int32). Returns out [T, Hq, Dv]
// (q's dtype) and lse [T, Hq] float32. max_query_len/max_kv_len are not needed by this kernel
// (one query token per work item; keys walked up to each token's visible length).
#include "npu_ops.h"

#include "../host/paged_decode_tiling.h"
#include "launch.h"

namespace cpattn_npu {

namespace {
constexpr const char* kPagedOp = "cpattn::ascendc_paged_decode";

// Validate the arguments and fill the tiling (raises c10::Error with the reason).
PagedDecodeTiling plan_paged(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& v,
                       const at::Tensor& block_table, const at::Tensor& query_start_loc,
                       const at::Tensor& visible_lens, double scale, int64_t v_head_dim) {
  const at::Device dev = q.device();
  const int code = dtype_code(q.scalar_type());
  TORCH_CHECK(code >= 0, kPagedOp, ": q dtype must be float32, float16 or bfloat16; got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4, kPagedOp, ": q must be [T, Hq, Dqk] and k_cache [NB, bs, Hkv, Dqk]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && k.size(3) == q.size(2), kPagedOp,
              ": k_cache must have q's dtype and head dim");
  check_npu(k, dev, kPagedOp, "k_cache");
  if (v.has_value()) {
    check_npu(*v, dev, kPagedOp, "v_cache");
    TORCH_CHECK(v->dim() == 4 && v->scalar_type() == q.scalar_type() && v->size(0) == k.size(0) &&
                    v->size(1) == k.size(1) && v->size(2) == k.size(2) && v->size(3) == v_head_dim,
                kPagedOp, ": v_cache must be [NB, bs, Hkv, v_head_dim] in q's dtype");
  }
  TORCH_CHECK(block_table.dim() == 2 && query_start_loc.dim() == 1 && visible_lens.dim() == 1 &&
                  query_start_loc.size(0) == block_table.size(0) + 1 && visible_lens.size(0) == q.size(0),
              kPagedOp, ": block_table [B, MB], query_start_loc [B + 1] and visible_lens [T] expected");
  cpattn_asc::PagedDecodeShape s{};
  s.dtype = static_cast<uint32_t>(code);
  s.numTokens = u32(q.size(0), kPagedOp, "T");
  s.numReqs = u32(block_table.size(0), kPagedOp, "B");
  s.hq = u32(q.size(1), kPagedOp, "Hq");
  s.hkv = u32(k.size(2), kPagedOp, "Hkv");
  s.dqk = u32(q.size(2), kPagedOp, "Dqk");
  s.dv = u32(v_head_dim, kPagedOp, "Dv");
  s.numBlocks = u32(k.size(0), kPagedOp, "NB");
  s.blockSize = u32(k.size(1), kPagedOp, "block size");
  s.tableStride = u32(block_table.size(1), kPagedOp, "MB");
  s.vFromK = !v.has_value();
  s.scale = static_cast<float>(scale);
  PagedDecodeTiling t{};
  const std::string why = cpattn_asc::PagedDecodeTilingFor(s, vector_core_count(dev), t);
  TORCH_CHECK(why.empty(), kPagedOp, ": ", why);
  return t;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const c10::optional<at::Tensor>& v_in,
                                                const at::Tensor& block_table, const at::Tensor& query_start_loc,
                                                const at::Tensor& visible_lens, double scale, int64_t v_head_dim,
                                                int64_t max_query_len, int64_t max_kv_len) {
  (void)max_query_len;
  (void)max_kv_len;
  const c10_npu::OptionalNPUGuard guard(q_in.device());
  const PagedDecodeTiling t = plan_paged(q_in, k_in, v_in, block_table, query_start_loc, visible_lens, scale, v_head_dim);
  const at::Device dev = q_in.device();
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor v = v_in.has_value() ? v_in->contiguous() : k;
  at::Tensor out = at::empty({q.size(0), q.size(1), v_head_dim}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.size(0) == 0 || t.blockDim == 0) return {out, lse};

  const at::Tensor table = block_table.to(dev, at::kInt).contiguous();
  const at::Tensor qsl = query_start_loc.to(dev, at::kInt).contiguous();
  const at::Tensor vis = visible_lens.to(dev, at::kInt).contiguous();
  at::Tensor tiling = to_device(tiling_bytes(t), dev);
  const uint32_t block_dim = t.blockDim;
  void *pq = q.data_ptr(), *pk = k.data_ptr(), *pv = v.data_ptr(), *pt = table.data_ptr(), *pqsl = qsl.data_ptr(),
       *pvis = vis.data_ptr(), *po = out.data_ptr(), *pl = lse.data_ptr(), *pti = tiling.data_ptr();
  enqueue_launch("cpattn_paged_decode", dev, {q, k, v, table, qsl, vis, out, lse, tiling}, [=](void* stream) {
    launch_paged_decode(block_dim, stream, pq, pk, pv, pt, pqsl, pvis, po, pl, pti);
  });
  return {out, lse};
}

std::string paged_decode_check(const at::Tensor& q, const at::Tensor& k_cache,
                               const c10::optional<at::Tensor>& v_cache, const at::Tensor& block_table,
                               const at::Tensor& query_start_loc, const at::Tensor& visible_lens, double scale,
                               int64_t v_head_dim, int64_t max_query_len, int64_t max_kv_len) {
  (void)max_query_len;
  (void)max_kv_len;
  return why_not([&] { plan_paged(q, k_cache, v_cache, block_table, query_start_loc, visible_lens, scale, v_head_dim); });
}

}  // namespace cpattn_npu
