// PrivateUse1 (NPU) implementations of the AscendC backend ops. The schemas are defined in
// cpattn/_library.py (the one module that touches torch.library on the Python side); loading this
// library (torch.ops.load_library, done by cpattn.backends.ascendc) adds the NPU kernels to them.
#include <torch/library.h>

#include "npu_ops.h"

TORCH_LIBRARY_IMPL(cpattn, PrivateUse1, m) {
  m.impl("ascendc_merge_attn_states", TORCH_FN(cpattn_npu::merge_attn_states));
  m.impl("ascendc_paged_decode", TORCH_FN(cpattn_npu::paged_decode));
  m.impl("ascendc_varlen_prefill", TORCH_FN(cpattn_npu::varlen_prefill));
  m.impl("ascendc_merge_attn_states_check", TORCH_FN(cpattn_npu::merge_attn_states_check));
  m.impl("ascendc_paged_decode_check", TORCH_FN(cpattn_npu::paged_decode_check));
  m.impl("ascendc_varlen_prefill_check", TORCH_FN(cpattn_npu::varlen_prefill_check));
}
