// varlen_prefill: PCP's local attention kernel for Ascend (AscendC, vector unit), CANN 9.1 API.
//
// q [Tq, Hq, Dqk] against one block of keys k [Tk, Hkv, Dqk], v [Tk, Hkv, Dv] (token and head
// strides are tiling parameters, so K and V may be two views of one packed K|V buffer),
// packed sequences delimited by cu_seqlens_q/k [B + 1]; with `causal` query i sees the keys of its
// sequence with k_positions[j] <= q_positions[i] (int32 positions, any order). Writes
// out [Tq, Hq, Dv] (q's dtype) and lse [Tq, Hq] (float32, natural log); (0, -inf) for a query
// that sees no key. GQA: query head x reads KV head x / (Hq / Hkv); K/V are never repeated.
//
// Work split: one work item = (tile of tokTile query tokens of one sequence, KV head, chunk of
// that KV head's query heads), dealt round-robin over the cores; the item's rows stay in UB
// while its sequence's keys stream through in tiles of keyTile (double-buffered copies, the next
// visible tile's copy issued before the current one is computed). Under the causal mask a key
// tile whose smallest position exceeds the largest position of the item's queries is never
// copied or computed (fully masked tiles are skipped; positions are read by the scalar unit).
//
// This is the vector-unit version: scores are Mul + ReduceSum per (row, key) and P.V is one
// Axpy per (row, key), so it runs at vector speed; docs/ascendc.md says what a cube (Matmul)
// version changes. Not compiled with bisheng nor run on an NPU here: see docs/ascendc.md.
#include "kernel_operator.h"
#include "varlen_prefill_tiling.h"
#include "attn_tile_kernel.h"

namespace {

using namespace AscendC;
using cpattn_asc_dev::AttnTile;
using cpattn_asc_dev::CopyRowsIn;
using cpattn_asc_dev::CopyRowsOut;
using cpattn_asc_dev::kMaxKeyTile;
using cpattn_asc_dev::kMaxTokTile;
using cpattn_asc_dev::kPosMax;

template <typename T>
class VarlenPrefill {
 public:
  __aicore__ inline VarlenPrefill() {}

  __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuQ, GM_ADDR cuK, GM_ADDR qPos,
                              GM_ADDR kPos, GM_ADDR out, GM_ADDR lse, const VarlenPrefillTiling& t) {
    t_ = t;
    const AttnTileTiling& tt = t.tile;
    q_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(q), static_cast<uint64_t>(t.numTokensQ) * t.hq * tt.dqk);
    // the last token's last head ends at (Tk - 1) * strideT + (hkv - 1) * strideH + d
    const uint64_t kLen = t.numTokensK == 0 ? 0
        : static_cast<uint64_t>(t.numTokensK - 1) * t.kStrideT + static_cast<uint64_t>(t.hkv - 1) * t.kStrideH + tt.dqk;
    const uint64_t vLen = t.numTokensK == 0 ? 0
        : static_cast<uint64_t>(t.numTokensK - 1) * t.vStrideT + static_cast<uint64_t>(t.hkv - 1) * t.vStrideH + tt.dv;
    k_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(k), kLen);
    v_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(v), vLen);
    cuQ_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuQ), t.numSeqs + 1);
    cuK_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuK), t.numSeqs + 1);
    if (t.causal) {
      qPos_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(qPos), t.numTokensQ);
      kPos_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(kPos), t.numTokensK);
    }
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), static_cast<uint64_t>(t.numTokensQ) * t.hq * tt.dv);
    lse_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), static_cast<uint64_t>(t.numTokensQ) * t.hq);
    core_.Init(&pipe_, tt);
  }

  __aicore__ inline void Process() {
    const uint32_t perTile = t_.hkv * t_.numChunks;
    for (uint32_t item = GetBlockIdx(); item < t_.numItems; item += GetBlockNum()) {
      uint32_t b, q0;
      if (!QueryTile(item / perTile, b, q0)) continue;  // slot past the last real tile
      Item(b, q0, (item % perTile) / t_.numChunks, item % t_.numChunks);
    }
  }

 private:
  // The slot-th query tile in sequence order: sequence b, first row q0. False past the end.
  __aicore__ inline bool QueryTile(uint32_t slot, uint32_t& b, uint32_t& q0) {
    uint32_t seen = 0;
    for (b = 0; b < t_.numSeqs; ++b) {
      const uint32_t s = static_cast<uint32_t>(cuQ_.GetValue(b));
      const uint32_t e = static_cast<uint32_t>(cuQ_.GetValue(b + 1));
      const uint32_t n = (e - s + t_.tile.tokTile - 1) / t_.tile.tokTile;
      if (slot < seen + n) {
        q0 = s + (slot - seen) * t_.tile.tokTile;
        return true;
      }
      seen += n;
    }
    return false;
  }

  __aicore__ inline void Item(uint32_t b, uint32_t q0, uint32_t h, uint32_t c) {
    const AttnTileTiling& tt = t_.tile;
    const uint32_t qEnd = static_cast<uint32_t>(cuQ_.GetValue(b + 1));
    const uint32_t nTok = Min(tt.tokTile, qEnd - q0);
    const uint32_t head0 = h * t_.group + c * tt.headChunk;
    int32_t lim[kMaxTokTile];
    int32_t maxLim = 0;
    for (uint32_t i = 0; i < nTok; ++i) {
      lim[i] = t_.causal ? qPos_.GetValue(q0 + i) : kPosMax;
      if (i == 0 || lim[i] > maxLim) maxLim = lim[i];
    }
    core_.Begin(nTok);
    LocalTensor<T> qIn = core_.AllocQ();
    for (uint32_t i = 0; i < nTok; ++i)
      CopyRowsIn(qIn[i * tt.headChunk * tt.rowQK], q_[(static_cast<uint64_t>(q0 + i) * t_.hq + head0) * tt.dqk],
                 tt.headChunk, tt.dqk, tt.rowQK, 0);
    core_.LoadQ(qIn, t_.scale);

    const uint32_t k0 = static_cast<uint32_t>(cuK_.GetValue(b));
    const uint32_t k1 = static_cast<uint32_t>(cuK_.GetValue(b + 1));
    // positions of the current and the prefetched tile
    int32_t pos[2][kMaxKeyTile];
    uint32_t cur = NextTile(k0, k1, maxLim, pos[0]);
    uint32_t which = 0;
    if (cur < k1) Load(h, cur, Min(tt.keyTile, k1 - cur));
    while (cur < k1) {
      const uint32_t n = Min(tt.keyTile, k1 - cur);
      const uint32_t next = NextTile(cur + tt.keyTile, k1, maxLim, pos[which ^ 1]);
      if (next < k1) Load(h, next, Min(tt.keyTile, k1 - next));  // prefetch
      core_.Tile(n, pos[which], lim);
      cur = next;
      which ^= 1;
    }
    core_.Finish(false);
    LocalTensor<T> o = core_.DeQueOut();
    LocalTensor<float> l = core_.DeQueLse();
    for (uint32_t i = 0; i < nTok; ++i) {
      const uint64_t row = static_cast<uint64_t>(q0 + i) * t_.hq + head0;
      CopyRowsOut(out_[row * tt.dv], o[i * tt.headChunk * tt.rowV], tt.headChunk, tt.dv, tt.rowV);
      CopyRowsOut(lse_[row], l[i * tt.headChunkA], 1, tt.headChunk, tt.headChunkA);
    }
    core_.FreeOut(o, l);
  }

  // First key tile at or after `from` (tiles start at from, from + keyTile, ...) with a key the
  // item's queries can see; its positions go to pos. Returns k1 when there is none.
  __aicore__ inline uint32_t NextTile(uint32_t from, uint32_t k1, int32_t maxLim, int32_t* pos) {
    for (uint32_t s = from; s < k1; s += t_.tile.keyTile) {
      const uint32_t n = Min(t_.tile.keyTile, k1 - s);
      bool visible = false;
      for (uint32_t j = 0; j < n; ++j) {
        pos[j] = t_.causal ? kPos_.GetValue(s + j) : 0;
        visible = visible || pos[j] <= maxLim;
      }
      if (visible) return s;  // else the causal mask hides the whole tile: skip it
    }
    return k1;
  }

  __aicore__ inline void Load(uint32_t h, uint32_t s, uint32_t n) {
    const AttnTileTiling& tt = t_.tile;
    LocalTensor<T> kIn = core_.AllocK();
    CopyRowsIn(kIn, k_[static_cast<uint64_t>(s) * t_.kStrideT + static_cast<uint64_t>(h) * t_.kStrideH], n, tt.dqk,
               tt.rowQK, t_.kStrideT - tt.dqk);
    core_.EnQueK(kIn);
    LocalTensor<T> vIn = core_.AllocV();
    CopyRowsIn(vIn, v_[static_cast<uint64_t>(s) * t_.vStrideT + static_cast<uint64_t>(h) * t_.vStrideH], n, tt.dv,
               tt.rowV, t_.vStrideT - tt.dv);
    core_.EnQueV(vIn);
  }

  __aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }

  TPipe pipe_;
  VarlenPrefillTiling t_;
  AttnTile<T> core_;
  GlobalTensor<T> q_, k_, v_, out_;
  GlobalTensor<int32_t> cuQ_, cuK_, qPos_, kPos_;
  GlobalTensor<float> lse_;
};

template <typename T>
__aicore__ inline void Run(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuQ, GM_ADDR cuK, GM_ADDR qPos, GM_ADDR kPos,
                           GM_ADDR out, GM_ADDR lse, const VarlenPrefillTiling& t) {
  VarlenPrefill<T> op;
  op.Init(q, k, v, cuQ, cuK, qPos, kPos, out, lse, t);
  op.Process();
}

}  // namespace

extern "C" __global__ __aicore__ void varlen_prefill(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlensQ,
                                                     GM_ADDR cuSeqlensK, GM_ADDR qPositions, GM_ADDR kPositions,
                                                     GM_ADDR out, GM_ADDR lse, GM_ADDR tiling) {
  VarlenPrefillTiling t;
  cpattn_asc_dev::LoadTiling(tiling, t);
  if (t.tile.dtype == 0) {
    Run<float>(q, k, v, cuSeqlensQ, cuSeqlensK, qPositions, kPositions, out, lse, t);
  } else if (t.tile.dtype == 1) {
    Run<half>(q, k, v, cuSeqlensQ, cuSeqlensK, qPositions, kPositions, out, lse, t);
  } else {
    Run<bfloat16_t>(q, k, v, cuSeqlensQ, cuSeqlensK, qPositions, kPositions, out, lse, t);
  }
}
