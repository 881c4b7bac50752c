#include "paged_decode_tiling.h"

namespace cpattn_asc {

std::string PagedDecodeTilingFor(const PagedDecodeShape& s, uint32_t vectorCores, PagedDecodeTiling& t) {
  t = PagedDecodeTiling{};
  std::string bad = CheckAttnShape(s.dtype, s.hq, s.hkv, s.dqk, s.dv, vectorCores);
  if (!bad.empty()) return bad;
  if (s.vFromK && s.dv > s.dqk) return "MLA value dim exceeds the latent K row";
  if (s.blockSize == 0) return "block size must be positive";
  if (s.numReqs == 0) return "no requests";
  const uint32_t group = s.hq / s.hkv;
  // tokTile 1 (each token has its own visible length); key tiles up to 64 positions
  std::string why = ChooseAttnTile(t.tile, s.dtype, 1, group, kMaxKeyTile, s.dqk, s.dv, s.vFromK, false);
  if (!why.empty()) return "paged_decode: " + why;
  t.numTokens = s.numTokens;
  t.numReqs = s.numReqs;
  t.hq = s.hq;
  t.hkv = s.hkv;
  t.group = group;
  t.numChunks = group / t.tile.headChunk;
  t.numBlocks = s.numBlocks;
  t.blockSize = s.blockSize;
  t.tableStride = s.tableStride;
  const uint64_t items = static_cast<uint64_t>(s.numTokens) * s.hkv * t.numChunks;
  if (items > 0xffffffffull) return "paged_decode: too many work items for 32-bit indices";
  t.numItems = static_cast<uint32_t>(items);
  t.blockDim = t.numItems == 0 ? 0 : (t.numItems < vectorCores ? t.numItems : vectorCores);
  t.scale = s.scale;
  return "";
}

}  // namespace cpattn_asc
