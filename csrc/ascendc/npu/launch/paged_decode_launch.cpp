// bisheng-only translation unit: the paged_decode kernel and its launcher (see ../launch.h).
// Arguments go as plain uint8_t* (the host side of a launch; the kernel sees them as GM_ADDR).
#include "../../kernels/paged_decode.cpp"
#include "../launch.h"

namespace cpattn_npu {

void launch_paged_decode(uint32_t blockDim, void* stream, void* q, void* kCache, void* vCache, void* blockTable,
                         void* queryStartLoc, void* visibleLens, void* out, void* lse, void* tiling) {
  CPATTN_LAUNCH(paged_decode, blockDim, stream, static_cast<uint8_t*>(q), static_cast<uint8_t*>(kCache),
                static_cast<uint8_t*>(vCache), static_cast<uint8_t*>(blockTable), static_cast<uint8_t*>(queryStartLoc),
                static_cast<uint8_t*>(visibleLens), static_cast<uint8_t*>(out), static_cast<uint8_t*>(lse),
                static_cast<uint8_t*>(tiling));
}

}  // namespace cpattn_npu
