#include "attn_tile.h"

namespace cpattn_asc {

namespace {
uint32_t Ub32(uint32_t bytes) { return AlignUp(bytes, 32); }  // InitBuffer rounds up to 32 B
uint32_t RowElems(uint32_t d) { return AlignUp(d == 0 ? 1 : d, 16); }
}  // namespace

uint32_t FillAttnTile(AttnTileTiling& t, uint32_t dtype, uint32_t tokTile, uint32_t headChunk,
                      uint32_t keyTile, uint32_t dqk, uint32_t dv, bool vFromK) {
  const uint32_t sz = DTypeBytes(dtype);
  const bool cast = dtype != kFloat32;
  t.dtype = dtype;
  t.tokTile = tokTile;
  t.headChunk = headChunk;
  t.headChunkA = AlignUp(headChunk, 8);
  t.keyTile = keyTile;
  t.keyTileA = AlignUp(keyTile, 8);
  t.rows = tokTile * headChunk;
  t.slotRows = tokTile * t.headChunkA;
  t.dqk = dqk;
  t.dv = dv;
  t.rowQK = RowElems(dqk);
  t.rowV = RowElems(dv);
  t.vFromK = vFromK ? 1 : 0;
  t.qInBytes = Ub32(t.rows * t.rowQK * sz);
  t.qfBytes = Ub32(t.rows * t.rowQK * 4);
  t.kInBytes = Ub32(keyTile * t.rowQK * sz);
  t.kfBytes = cast ? Ub32(keyTile * t.rowQK * 4) : 0;
  t.vInBytes = vFromK ? 0 : Ub32(keyTile * t.rowV * sz);
  t.vfBytes = (vFromK || !cast) ? 0 : Ub32(keyTile * t.rowV * 4);
  t.prodBytes = Ub32(keyTile * t.rowQK * 4);
  t.sBytes = Ub32(t.rows * t.keyTileA * 4);
  t.mxBytes = Ub32(t.rows * 2 * 4);  // ReduceRepeat<MAX> writes [value, index] per row
  t.slotBytes = Ub32(t.slotRows * 4);
  t.accBytes = Ub32(t.rows * t.rowV * 4);
  t.outBytes = Ub32(t.rows * t.rowV * sz);
  // K/V input queues hold 2 tiles; 5 slot buffers: alpha, row sums, ln in, ln out, lse out.
  t.ubBytes = t.qInBytes + t.qfBytes + 2 * t.kInBytes + t.kfBytes + 2 * t.vInBytes + t.vfBytes +
              t.prodBytes + t.sBytes + t.mxBytes + 5 * t.slotBytes + t.accBytes +
              t.outBytes;
  return t.ubBytes;
}

std::string CheckAttnShape(uint32_t dtype, uint32_t hq, uint32_t hkv, uint32_t dqk, uint32_t dv,
                           uint32_t vectorCores) {
  if (dtype > kBFloat16) return "dtype code " + std::to_string(dtype) + " is not float32/float16/bfloat16";
  if (hkv == 0 || hq % hkv != 0) return "query heads must be a positive multiple of KV heads";
  if (dqk == 0 || dv == 0) return "head dims must be positive";
  if (vectorCores == 0) return "no vector cores";
  return "";
}

std::string ChooseAttnTile(AttnTileTiling& t, uint32_t dtype, uint32_t maxTok, uint32_t group,
                           uint32_t maxKey, uint32_t dqk, uint32_t dv, bool vFromK, bool tokensFirst) {
  if (group == 0) return "no query heads";
  if (dqk > kMaxHeadDim || dv > kMaxHeadDim)
    return "head dims above " + std::to_string(kMaxHeadDim) + " are not supported";
  if (maxTok == 0) maxTok = 1;
  if (maxTok > kMaxTokTile) maxTok = kMaxTokTile;
  if (maxKey == 0) maxKey = 1;
  if (maxKey > kMaxKeyTile) maxKey = kMaxKeyTile;
  // key tiles: maxKey, then powers of two below it down to 1
  uint32_t keys[16];
  uint32_t nKeys = 0;
  keys[nKeys++] = maxKey;
  for (uint32_t k = 64; k >= 1; k /= 2)
    if (k < maxKey) keys[nKeys++] = k;
  // token counts: maxTok, then halves
  uint32_t toks[8];
  uint32_t nToks = 0;
  for (uint32_t k = maxTok; k >= 1; k /= 2) toks[nToks++] = k;
  // head chunks: divisors of the group, largest first (so every chunk is full). Within a chunk
  // size: with tokensFirst, the most tokens with key tiles of at least 16 (K/V traffic falls with
  // the tokens per item), else the longest key tile; then everything else.
  for (uint32_t chunk = group; chunk >= 1; --chunk) {
    if (group % chunk != 0 || chunk > kMaxRows) continue;
    for (int pass = tokensFirst ? 0 : 1; pass < 2; ++pass) {
      for (uint32_t a = 0; a < (pass == 0 ? nToks : nKeys); ++a) {
        for (uint32_t b = 0; b < (pass == 0 ? nKeys : nToks); ++b) {
          const uint32_t tok = pass == 0 ? toks[a] : toks[b];
          const uint32_t key = pass == 0 ? keys[b] : keys[a];
          if (pass == 0 && key < 16 && key < maxKey) continue;
          if (tok * chunk > kMaxRows) continue;
          if (FillAttnTile(t, dtype, tok, chunk, key, dqk, dv, vFromK) <= kUbBytes) return "";
        }
      }
    }
  }
  FillAttnTile(t, dtype, 1, 1, 1, dqk, dv, vFromK);
  return "head dims " + std::to_string(dqk) + "/" + std::to_string(dv) + " need " +
         std::to_string(t.ubBytes) + " bytes of unified buffer for one query row and " +
         std::to_string(t.keyTile) + " keys; the budget is " + std::to_string(kUbBytes);
}

}  // namespace cpattn_asc
