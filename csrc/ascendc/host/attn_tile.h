// Host side of the attention work-item tiling shared by paged_decode and varlen_prefill:
// buffer sizes of one work item and the search for the largest tile that fits the UB.
// Plain C++ (no CANN): used by the emulation binding and by the NPU binding alike.
#ifndef CPATTN_ASCENDC_HOST_ATTN_TILE_H
#define CPATTN_ASCENDC_HOST_ATTN_TILE_H

#include <cstdint>
#include <string>

#include "../kernels/attn_tile_tiling.h"

namespace cpattn_asc {

constexpr uint32_t kUbBytes = 192u * 1024u - 256u;  // Atlas A2 vector core UB less 256 B reserved
constexpr uint32_t kMaxRows = 128;     // query rows per work item (kernel's scalar arrays)
constexpr uint32_t kMaxKeyTile = 64;   // keys per tile: a score row is one float32 repeat
constexpr uint32_t kMaxHeadDim = 2040;  // q/k row stride in 32-byte blocks must fit a uint8 repeat stride
constexpr uint32_t kMaxTokTile = 16;   // query tokens per work item

enum DType : uint32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline uint32_t AlignUp(uint32_t x, uint32_t a) { return (x + a - 1) / a * a; }
inline uint32_t DTypeBytes(uint32_t dtype) { return dtype == kFloat32 ? 4u : 2u; }

// Fill `t` for the given tile shape and return its UB footprint (t.ubBytes).
uint32_t FillAttnTile(AttnTileTiling& t, uint32_t dtype, uint32_t tokTile, uint32_t headChunk,
                      uint32_t keyTile, uint32_t dqk, uint32_t dv, bool vFromK);

// The checks both attention kernels' tilings open with: a known dtype code, query heads a positive
// multiple of KV heads, positive head dims, at least one vector core. "" or why not.
std::string CheckAttnShape(uint32_t dtype, uint32_t hq, uint32_t hkv, uint32_t dqk, uint32_t dv,
                           uint32_t vectorCores);

// Choose tokTile (<= maxTok), headChunk (a divisor of group) and keyTile (<= maxKey) so that one
// work item fits the UB, preferring whole groups (K/V read once per KV head), then (tokensFirst)
// more query tokens with key tiles of at least 16, or (else) longer key tiles; then anything that
// fits. Returns "" on success, else why nothing fits (t then holds the smallest tile's footprint).
std::string ChooseAttnTile(AttnTileTiling& t, uint32_t dtype, uint32_t maxTok, uint32_t group,
                           uint32_t maxKey, uint32_t dqk, uint32_t dv, bool vFromK, bool tokensFirst);

}  // namespace cpattn_asc

#endif
