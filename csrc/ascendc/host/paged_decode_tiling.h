// Host tiling of the paged_decode kernel (plain C++, no CANN): used by the emulation binding and
// by the NPU binding.
#ifndef CPATTN_ASCENDC_HOST_PAGED_DECODE_TILING_H
#define CPATTN_ASCENDC_HOST_PAGED_DECODE_TILING_H

#include <cstdint>
#include <string>

#include "attn_tile.h"
#include "../kernels/paged_decode_tiling.h"

namespace cpattn_asc {

struct PagedDecodeShape {
  uint32_t dtype;        // DType of q, the caches and out
  uint32_t numTokens, numReqs, hq, hkv, dqk, dv;
  uint32_t numBlocks, blockSize, tableStride;
  bool vFromK;           // MLA: V = first dv channels of the K rows (then dv <= dqk, hkv == 1 typical)
  float scale;
};

// Fill `t` (work split over `vectorCores` cores). Returns "" on success, else why the kernel
// cannot run this shape (the caller raises it).
std::string PagedDecodeTilingFor(const PagedDecodeShape& s, uint32_t vectorCores, PagedDecodeTiling& t);

}  // namespace cpattn_asc

#endif
