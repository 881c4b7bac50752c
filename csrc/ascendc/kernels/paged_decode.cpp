// paged_decode: DCP's local attention kernel for Ascend (AscendC, vector unit), CANN 9.1 API.
//
// q [T, Hq, Dqk] against one rank's paged KV cache: k_cache [NB, bs, Hkv, Dqk] and
// v_cache [NB, bs, Hkv, Dv], or (vFromK) the MLA latent cache where V is the first Dv channels of
// each K row. Query token t (of request b, found in query_start_loc) sees the first
// visible_lens[t] keys of b's local sequence; key position p lives in cache block
// block_table[b, p / bs], slot p % bs. Writes out [T, Hq, Dv] (q's dtype) and lse [T, Hq]
// (float32, natural log); a token that sees no key gets exactly (0, -inf).
//
// Work split: one work item = (query token, KV head, chunk of that KV head's query heads); the
// chunk is the whole group unless the UB cannot hold it, so K/V are read once per group. Items are
// dealt round-robin over the launched cores (GetBlockIdx/GetBlockNum). Keys are walked in tiles
// of up to keyTile positions (several cache blocks per tile when blocks are short), each tile
// gathered by one DataCopyPad per cache block it touches; the next tile's copy is issued before
// the current tile is computed (double-buffered input queues). Block-table entries are read only
// for positions below visible_lens[t]; an entry outside [0, NB) makes the token's rows NaN.
//
// Inputs are int32: block_table [B, MB], query_start_loc [B + 1], visible_lens [T].
// Not compiled with bisheng nor run on an NPU here: see docs/ascendc.md.
#include "kernel_operator.h"
#include "paged_decode_tiling.h"
#include "attn_tile_kernel.h"

namespace {

using namespace AscendC;
using cpattn_asc_dev::AttnTile;
using cpattn_asc_dev::CopyRowsIn;
using cpattn_asc_dev::CopyRowsOut;

template <typename T>
class PagedDecode {
 public:
  __aicore__ inline PagedDecode() {}

  __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR table, GM_ADDR qsl, GM_ADDR vis,
                              GM_ADDR out, GM_ADDR lse, const PagedDecodeTiling& t) {
    t_ = t;
    const uint64_t cacheRows = static_cast<uint64_t>(t.numBlocks) * t.blockSize * t.hkv;
    q_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(q), static_cast<uint64_t>(t.numTokens) * t.hq * t.tile.dqk);
    k_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(k), cacheRows * t.tile.dqk);
    if (!t.tile.vFromK) v_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(v), cacheRows * t.tile.dv);
    table_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(table),
                           static_cast<uint64_t>(t.numReqs) * t.tableStride);
    qsl_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(qsl), t.numReqs + 1);
    vis_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(vis), t.numTokens);
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), static_cast<uint64_t>(t.numTokens) * t.hq * t.tile.dv);
    lse_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), static_cast<uint64_t>(t.numTokens) * t.hq);
    core_.Init(&pipe_, t.tile);
  }

  __aicore__ inline void Process() {
    const uint32_t perToken = t_.hkv * t_.numChunks;
    for (uint32_t item = GetBlockIdx(); item < t_.numItems; item += GetBlockNum()) {
      const uint32_t tok = item / perToken;
      const uint32_t h = (item % perToken) / t_.numChunks;
      const uint32_t c = item % t_.numChunks;
      Item(tok, h, c);
    }
  }

 private:
  // request of token `tok`: the last b with query_start_loc[b] <= tok
  __aicore__ inline uint32_t Request(uint32_t tok) {
    uint32_t lo = 0, hi = t_.numReqs;  // answer in [lo, hi)
    while (hi - lo > 1) {
      const uint32_t mid = (lo + hi) / 2;
      if (static_cast<uint32_t>(qsl_.GetValue(mid)) <= tok) lo = mid; else hi = mid;
    }
    return lo;
  }

  __aicore__ inline void Item(uint32_t tok, uint32_t h, uint32_t c) {
    const AttnTileTiling& tt = t_.tile;
    const uint32_t b = Request(tok);
    int32_t visI = vis_.GetValue(tok);
    uint32_t nVis = visI > 0 ? static_cast<uint32_t>(visI) : 0u;
    // every block-table entry the token will use, checked before any copy
    bool poison = static_cast<uint64_t>(nVis) > static_cast<uint64_t>(t_.tableStride) * t_.blockSize;
    if (!poison) {
      const uint32_t nBlk = (nVis + t_.blockSize - 1) / t_.blockSize;
      for (uint32_t i = 0; i < nBlk; ++i) {
        const int32_t blk = table_.GetValue(static_cast<uint64_t>(b) * t_.tableStride + i);
        if (blk < 0 || static_cast<uint32_t>(blk) >= t_.numBlocks) poison = true;
      }
    }
    if (poison) nVis = 0;
    const uint32_t head0 = h * t_.group + c * tt.headChunk;
    core_.Begin(1);
    LocalTensor<T> qIn = core_.AllocQ();
    CopyRowsIn(qIn, q_[(static_cast<uint64_t>(tok) * t_.hq + head0) * tt.dqk], tt.headChunk, tt.dqk, tt.rowQK, 0);
    core_.LoadQ(qIn, t_.scale);

    int32_t lim[1] = {static_cast<int32_t>(nVis) - 1};
    int32_t kpos[cpattn_asc_dev::kMaxKeyTile];
    if (nVis > 0) Load(b, h, 0, Min(tt.keyTile, nVis));
    for (uint32_t p0 = 0; p0 < nVis; p0 += tt.keyTile) {
      const uint32_t n = Min(tt.keyTile, nVis - p0);
      const uint32_t next = p0 + tt.keyTile;
      if (next < nVis) Load(b, h, next, Min(tt.keyTile, nVis - next));  // prefetch
      for (uint32_t j = 0; j < n; ++j) kpos[j] = static_cast<int32_t>(p0 + j);
      core_.Tile(n, kpos, lim);
    }
    core_.Finish(poison);
    LocalTensor<T> o = core_.DeQueOut();
    LocalTensor<float> l = core_.DeQueLse();
    CopyRowsOut(out_[(static_cast<uint64_t>(tok) * t_.hq + head0) * tt.dv], o, tt.headChunk, tt.dv, tt.rowV);
    CopyRowsOut(lse_[static_cast<uint64_t>(tok) * t_.hq + head0], l, 1, tt.headChunk, tt.headChunkA);
    core_.FreeOut(o, l);
  }

  // keys [p0, p0 + n) of request b, KV head h: one DataCopyPad per cache block touched
  __aicore__ inline void Load(uint32_t b, uint32_t h, uint32_t p0, uint32_t n) {
    const AttnTileTiling& tt = t_.tile;
    LocalTensor<T> kIn = core_.AllocK();
    LocalTensor<T> vIn;
    if (!tt.vFromK) vIn = core_.AllocV();
    for (uint32_t j = 0; j < n;) {
      const uint32_t pos = p0 + j;
      const uint32_t slot = pos % t_.blockSize;
      const uint32_t seg = Min(t_.blockSize - slot, n - j);
      const uint64_t blk = static_cast<uint64_t>(table_.GetValue(static_cast<uint64_t>(b) * t_.tableStride + pos / t_.blockSize));
      const uint64_t row = (blk * t_.blockSize + slot) * t_.hkv + h;  // cache row of (pos, h)
      CopyRowsIn(kIn[j * tt.rowQK], k_[row * tt.dqk], seg, tt.dqk, tt.rowQK,
                 static_cast<uint64_t>(t_.hkv - 1) * tt.dqk);
      if (!tt.vFromK)
        CopyRowsIn(vIn[j * tt.rowV], v_[row * tt.dv], seg, tt.dv, tt.rowV, static_cast<uint64_t>(t_.hkv - 1) * tt.dv);
      j += seg;
    }
    core_.EnQueK(kIn);
    if (!tt.vFromK) core_.EnQueV(vIn);
  }

  __aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }

  TPipe pipe_;
  PagedDecodeTiling t_;
  AttnTile<T> core_;
  GlobalTensor<T> q_, k_, v_, out_;
  GlobalTensor<int32_t> table_, qsl_, vis_;
  GlobalTensor<float> lse_;
};

template <typename T>
__aicore__ inline void Run(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR table, GM_ADDR qsl, GM_ADDR vis, GM_ADDR out,
                           GM_ADDR lse, const PagedDecodeTiling& t) {
  PagedDecode<T> op;
  op.Init(q, k, v, table, qsl, vis, out, lse, t);
  op.Process();
}

}  // namespace

extern "C" __global__ __aicore__ void paged_decode(GM_ADDR q, GM_ADDR kCache, GM_ADDR vCache, GM_ADDR blockTable,
                                                   GM_ADDR queryStartLoc, GM_ADDR visibleLens, GM_ADDR out,
                                                   GM_ADDR lse, GM_ADDR tiling) {
  PagedDecodeTiling t;
  cpattn_asc_dev::LoadTiling(tiling, t);
  if (t.tile.dtype == 0) {
    Run<float>(q, kCache, vCache, blockTable, queryStartLoc, visibleLens, out, lse, t);
  } else if (t.tile.dtype == 1) {
    Run<half>(q, kCache, vCache, blockTable, queryStartLoc, visibleLens, out, lse, t);
  } else {
    Run<bfloat16_t>(q, kCache, vCache, blockTable, queryStartLoc, visibleLens, out, lse, t);
  }
}
