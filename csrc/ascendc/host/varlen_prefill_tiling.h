// Host tiling of the varlen_prefill kernel (plain C++, no CANN): used by the emulation binding and
// by the NPU binding.
#ifndef CPATTN_ASCENDC_HOST_VARLEN_PREFILL_TILING_H
#define CPATTN_ASCENDC_HOST_VARLEN_PREFILL_TILING_H

#include <cstdint>
#include <string>

#include "attn_tile.h"
#include "../kernels/varlen_prefill_tiling.h"

namespace cpattn_asc {

struct VarlenPrefillShape {
  uint32_t dtype;  // DType of q, k, v and out
  uint32_t numTokensQ, numTokensK, numSeqs, hq, hkv, dqk, dv;
  uint32_t maxSeqQ;             // longest query sequence (bounds the tokens per work item)
  uint32_t kStrideT, kStrideH;  // elements between consecutive tokens / heads of k (channels: stride 1)
  uint32_t vStrideT, vStrideH;  // the same for v
  bool causal;
  float scale;
};

std::string VarlenPrefillTilingFor(const VarlenPrefillShape& s, uint32_t vectorCores, VarlenPrefillTiling& t);

}  // namespace cpattn_asc

#endif
