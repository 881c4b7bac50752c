// The NPU implementations of the cpattn::ascendc_* ops and their *_check companions (schemas in cpattn/_library.py),
// registered for PrivateUse1 in register_npu.cpp.
#ifndef CPATTN_ASCENDC_NPU_OPS_H
#define CPATTN_ASCENDC_NPU_OPS_H

#include <tuple>

#include "npu_common.h"

namespace cpattn_npu {

void merge_attn_states(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& out_lse);
std::string merge_attn_states_check(at::TensorList outs, at::TensorList lses, const at::Tensor& out,
                                    const at::Tensor& out_lse);

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                const c10::optional<at::Tensor>& v_cache,
                                                const at::Tensor& block_table, const at::Tensor& query_start_loc,
                                                const at::Tensor& visible_lens, double scale, int64_t v_head_dim,
                                                int64_t max_query_len, int64_t max_kv_len);
std::string paged_decode_check(const at::Tensor& q, const at::Tensor& k_cache, const c10::optional<at::Tensor>& v_cache,
                               const at::Tensor& block_table, const at::Tensor& query_start_loc,
                               const at::Tensor& visible_lens, double scale, int64_t v_head_dim,
                               int64_t max_query_len, int64_t max_kv_len);

std::tuple<at::Tensor, at::Tensor> varlen_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                  const c10::optional<at::Tensor>& q_positions,
                                                  const c10::optional<at::Tensor>& k_positions, bool causal,
                                                  double scale);
std::string varlen_prefill_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 const c10::optional<at::Tensor>& q_positions,
                                 const c10::optional<at::Tensor>& k_positions, bool causal, double scale);

}  // namespace cpattn_npu

#endif
