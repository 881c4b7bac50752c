// Tiling of the paged_decode kernel (filled by csrc/ascendc/host/paged_decode_tiling.cpp).
// Include after kernel_operator.h (device) or <cstdint> (host).
#ifndef CPATTN_ASCENDC_PAGED_DECODE_TILING_H
#define CPATTN_ASCENDC_PAGED_DECODE_TILING_H

#include "attn_tile_tiling.h"

struct PagedDecodeTiling {
  AttnTileTiling tile;    // tokTile is 1: each query token has its own visible length
  uint32_t numTokens;     // T
  uint32_t numReqs;       // B (query_start_loc has B + 1 entries)
  uint32_t hq, hkv, group;  // query heads, KV heads, hq / hkv
  uint32_t numChunks;     // group / tile.headChunk
  uint32_t numBlocks;     // NB: cache blocks (block-table entries outside [0, NB) poison the row)
  uint32_t blockSize;     // bs: tokens per cache block
  uint32_t tableStride;   // MB: block-table entries per request
  uint32_t numItems;      // T * hkv * numChunks
  uint32_t blockDim;      // cores launched
  float scale;
};

#endif
