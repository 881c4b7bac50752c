#include "varlen_prefill_tiling.h"

namespace cpattn_asc {

std::string VarlenPrefillTilingFor(const VarlenPrefillShape& s, uint32_t vectorCores, VarlenPrefillTiling& t) {
  t = VarlenPrefillTiling{};
  std::string bad = CheckAttnShape(s.dtype, s.hq, s.hkv, s.dqk, s.dv, vectorCores);
  if (!bad.empty()) return bad;
  if (s.numSeqs == 0) return "no sequences";
  if (s.hkv > 1 && (s.kStrideH < s.dqk || s.vStrideH < s.dv)) return "k/v head strides overlap their channels";
  const uint32_t group = s.hq / s.hkv;
  // Query tokens per item: up to 16 (K/V are read once per item, so more tokens = less traffic);
  // key tiles up to 64 (one vector repeat per score row).
  std::string why = ChooseAttnTile(t.tile, s.dtype, s.maxSeqQ == 0 ? 1 : s.maxSeqQ, group, kMaxKeyTile, s.dqk, s.dv, false, true);
  if (!why.empty()) return "varlen_prefill: " + why;
  t.numTokensQ = s.numTokensQ;
  t.numTokensK = s.numTokensK;
  t.numSeqs = s.numSeqs;
  t.hq = s.hq;
  t.hkv = s.hkv;
  t.group = group;
  t.numChunks = group / t.tile.headChunk;
  t.causal = s.causal ? 1 : 0;
  t.kStrideT = s.kStrideT;
  t.kStrideH = s.kStrideH;
  t.vStrideT = s.vStrideT;
  t.vStrideH = s.vStrideH;
  // each sequence wastes at most one partial tile: Tq / tokTile + B slots cover every real tile
  const uint64_t slots = static_cast<uint64_t>(s.numTokensQ) / t.tile.tokTile + s.numSeqs;
  const uint64_t items = slots * s.hkv * t.numChunks;
  if (items > 0xffffffffull) return "varlen_prefill: too many work items for 32-bit indices";
  t.tileSlots = static_cast<uint32_t>(slots);
  t.numItems = static_cast<uint32_t>(items);
  t.blockDim = t.numItems == 0 ? 0 : (t.numItems < vectorCores ? t.numItems : vectorCores);
  t.scale = s.scale;
  return "";
}

}  // namespace cpattn_asc
