// bisheng-only translation unit: the varlen_prefill kernel and its launcher (see ../launch.h).
// Arguments go as plain uint8_t* (the host side of a launch; the kernel sees them as GM_ADDR).
#include "../../kernels/varlen_prefill.cpp"
#include "../launch.h"

namespace cpattn_npu {

void launch_varlen_prefill(uint32_t blockDim, void* stream, void* q, void* k, void* v, void* cuSeqlensQ,
                           void* cuSeqlensK, void* qPositions, void* kPositions, void* out, void* lse, void* tiling) {
  CPATTN_LAUNCH(varlen_prefill, blockDim, stream, static_cast<uint8_t*>(q), static_cast<uint8_t*>(k),
                static_cast<uint8_t*>(v), static_cast<uint8_t*>(cuSeqlensQ), static_cast<uint8_t*>(cuSeqlensK),
                static_cast<uint8_t*>(qPositions), static_cast<uint8_t*>(kPositions), static_cast<uint8_t*>(out),
                static_cast<uint8_t*>(lse), static_cast<uint8_t*>(tiling));
}

}  // namespace cpattn_npu
