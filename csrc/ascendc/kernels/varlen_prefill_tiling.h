// Tiling of the varlen_prefill kernel (filled by csrc/ascendc/host/varlen_prefill_tiling.cpp).
// Include after kernel_operator.h (device) or <cstdint> (host).
#ifndef CPATTN_ASCENDC_VARLEN_PREFILL_TILING_H
#define CPATTN_ASCENDC_VARLEN_PREFILL_TILING_H

#include "attn_tile_tiling.h"

struct VarlenPrefillTiling {
  AttnTileTiling tile;   // tokTile query tokens of one sequence per work item
  uint32_t numTokensQ;   // Tq
  uint32_t numTokensK;   // Tk
  uint32_t numSeqs;      // B (cu_seqlens_q/k have B + 1 entries)
  uint32_t hq, hkv, group;  // query heads, KV heads, hq / hkv
  uint32_t numChunks;    // group / tile.headChunk
  uint32_t causal;       // 1: key j visible to query i iff k_positions[j] <= q_positions[i]
  uint32_t kStrideT, kStrideH;  // elements between consecutive tokens / heads of k (unit channel stride)
  uint32_t vStrideT, vStrideH;  // the same for v
  uint32_t tileSlots;    // upper bound of query tiles: Tq / tokTile + B
  uint32_t numItems;     // tileSlots * hkv * numChunks
  uint32_t blockDim;     // cores launched
  float scale;
};

#endif
