// torch_npu binding of the paged_decode kernel: cpattn::ascendc_paged_decode on NPU (DCP's local
// kernel; the contract of the registry's paged_attention kernel, cpattn/backends/registry.py).
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
at::Tensor int32_on(const at::Tensor& t, const at::Device& dev) {
  return t.to(dev, at::kInt).contiguous();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const c10::optional<at::Tensor>& v_in,
                                                const at::Tensor& block_table, const at::Tensor& query_start_loc,
                                                const at::Tensor& visible_lens, double scale, int64_t v_head_dim,
                                                int64_t max_query_len, int64_t max_kv_len) {
  (void)max_query_len;
  (void)max_kv_len;
  const char* op = "cpattn::ascendc_paged_decode";
  const at::Device dev = q_in.device();
  const int code = dtype_code(q_in.scalar_type());
  TORCH_CHECK(code >= 0, op, ": q dtype must be float32, float16 or bfloat16; got ", q_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 4, op, ": q must be [T, Hq, Dqk] and k_cache [NB, bs, Hkv, Dqk]");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && k_in.size(3) == q_in.size(2), op,
              ": k_cache must have q's dtype and head dim");
  check_npu(k_in, dev, op, "k_cache");
  const bool v_from_k = !v_in.has_value();
  if (!v_from_k) {
    check_npu(*v_in, dev, op, "v_cache");
    TORCH_CHECK(v_in->dim() == 4 && v_in->scalar_type() == q_in.scalar_type() && v_in->size(0) == k_in.size(0) &&
                    v_in->size(1) == k_in.size(1) && v_in->size(2) == k_in.size(2) && v_in->size(3) == v_head_dim,
                op, ": v_cache must be [NB, bs, Hkv, v_head_dim] in q's dtype");
  }
  TORCH_CHECK(block_table.dim() == 2 && query_start_loc.dim() == 1 && visible_lens.dim() == 1 &&
                  query_start_loc.size(0) == block_table.size(0) + 1 && visible_lens.size(0) == q_in.size(0),
              op, ": block_table [B, MB], query_start_loc [B + 1] and visible_lens [T] expected");

  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor v = v_from_k ? k : v_in->contiguous();
  const at::Tensor table = int32_on(block_table, dev), qsl = int32_on(query_start_loc, dev),
                   vis = int32_on(visible_lens, dev);
  const int64_t T = q.size(0), hq = q.size(1);
  at::Tensor out = at::empty({T, hq, v_head_dim}, q.options());
  at::Tensor lse = at::empty({T, hq}, q.options().dtype(at::kFloat));

  cpattn_asc::PagedDecodeShape s{};
  s.dtype = static_cast<uint32_t>(code);
  s.numTokens = u32(T, op, "T");
  s.numReqs = u32(block_table.size(0), op, "B");
  s.hq = u32(hq, op, "Hq");
  s.hkv = u32(k.size(2), op, "Hkv");
  s.dqk = u32(q.size(2), op, "Dqk");
  s.dv = u32(v_head_dim, op, "Dv");
  s.numBlocks = u32(k.size(0), op, "NB");
  s.blockSize = u32(k.size(1), op, "block size");
  s.tableStride = u32(block_table.size(1), op, "MB");
  s.vFromK = v_from_k;
  s.scale = static_cast<float>(scale);
  PagedDecodeTiling t{};
  const std::string why = cpattn_asc::PagedDecodeTilingFor(s, vector_core_count(dev), t);
  TORCH_CHECK(why.empty(), op, ": ", why);
  if (T == 0 || t.blockDim == 0) return {out, lse};

  at::Tensor tiling = to_device(tiling_bytes(t), dev);
  const uint32_t block_dim = t.blockDim;
  void *pq = q.data_ptr(), *pk = k.data_ptr(), *pv = v.data_ptr(), *pt = table.data_ptr(), *pqsl = qsl.data_ptr(),
       *pvis = vis.data_ptr(), *po = out.data_ptr(), *pl = lse.data_ptr(), *pti = tiling.data_ptr();
  enqueue_launch("cpattn_paged_decode", dev, {q, k, v, table, qsl, vis, out, lse, tiling}, [=](void* stream) {
    launch_paged_decode(block_dim, stream, pq, pk, pv, pt, pqsl, pvis, po, pl, pti);
  });
  return {out, lse};
}

}  // namespace cpattn_npu
