// Tiling of one attention work item, shared by the paged_decode and varlen_prefill kernels and
// filled on the host by MakeAttnTile (csrc/ascendc/host/attn_tile.cpp).
//
// Plain struct of 32-bit fields: the host writes it into a device buffer and the kernel copies it
// word by word from global memory. Include it after kernel_operator.h (device) or <cstdint> (host);
// it includes nothing itself, so the kernel sources include only kernel_operator.h and the
// project's own headers.
//
// A work item holds R = tokTile * headChunk query rows (row r = i * headChunk + g: token i of the
// item, query head g of the item's chunk of one KV head's group) and walks its keys in tiles of
// keyTile rows. Every matrix row in the unified buffer (UB) starts on a 32-byte boundary: row
// lengths are padded to 16 elements (32 B in 16-bit types, 64 B in float32), so a cast of a
// whole padded matrix between 16-bit and float32 keeps every row aligned. Per-row scalars live in
// "slots": token i's rows start at slot i * headChunkA (headChunk rounded up to 8), so each
// token's run of float32 slots starts 32-byte aligned.
#ifndef CPATTN_ASCENDC_ATTN_TILE_TILING_H
#define CPATTN_ASCENDC_ATTN_TILE_TILING_H

struct AttnTileTiling {
  uint32_t dtype;       // 0 float32, 1 float16, 2 bfloat16 (q, k, v and out)
  uint32_t tokTile;     // query tokens per work item
  uint32_t headChunk;   // query heads per work item (all of one KV head's group, or a chunk of it)
  uint32_t headChunkA;  // headChunk rounded up to 8
  uint32_t keyTile;     // keys per tile (<= 64: one float32 vector repeat per key row)
  uint32_t keyTileA;    // keyTile rounded up to 8: score row length
  uint32_t rows;        // tokTile * headChunk
  uint32_t slotRows;    // tokTile * headChunkA
  uint32_t dqk, dv;     // head dims
  uint32_t rowQK;       // padded q/k row (elements), a multiple of 16
  uint32_t rowV;        // padded v/out row (elements), a multiple of 16
  uint32_t vFromK;      // 1: V is the first dv channels of the K rows (MLA latent cache)
  // UB bytes of each buffer (each a multiple of 32; 0 = buffer not used); K and V input queues
  // hold two tiles each (double buffering).
  uint32_t qInBytes, qfBytes, kInBytes, kfBytes, vInBytes, vfBytes, prodBytes, sBytes, mxBytes,
      slotBytes, accBytes, outBytes;
  uint32_t ubBytes;     // their sum: checked against 192 KiB - 256 B on the host
};

#endif
