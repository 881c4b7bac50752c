// bisheng-only translation unit: the merge_attn_states kernel and its launcher (see ../launch.h).
// Arguments go as plain uint8_t* (the host side of a launch; the kernel sees them as GM_ADDR).
#include "../../kernels/merge_attn_states.cpp"
#include "../launch.h"

namespace cpattn_npu {

void launch_merge_attn_states(uint32_t blockDim, void* stream, void* outPtrs, void* lsePtrs, void* out,
                              void* outLse, void* tiling) {
  CPATTN_LAUNCH(merge_attn_states, blockDim, stream, static_cast<uint8_t*>(outPtrs), static_cast<uint8_t*>(lsePtrs),
                static_cast<uint8_t*>(out), static_cast<uint8_t*>(outLse), static_cast<uint8_t*>(tiling));
}

}  // namespace cpattn_npu
