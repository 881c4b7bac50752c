// Device-side core shared by the paged_decode and varlen_prefill kernels: one work item's
// online softmax over key tiles, on the vector unit, in float32.
//
// Include after kernel_operator.h and attn_tile_tiling.h. Written against the public AscendC API
// of CANN 9.1; it includes nothing itself (see docs/ascendc.md for what was and was not verified).
//
// A work item holds `rows` query rows (row r = i * headChunk + g: token i, query head g of the
// chunk), scaled by `scale` once when loaded. For each key tile (n <= keyTile <= 64 keys, each with
// a position) a token admits the keys with kpos[j] <= lim[i], and for its rows:
//   s[r, 0:n] = q[r] . k[0:n]       per 64-channel chunk one Mul over the n key rows (the q chunk
//                                    broadcast by a zero repeat stride), the chunks folded by Add,
//                                    then one ReduceRepeat<SUM> writes the n scores of the row
//   hidden (r, j) -> -inf            scalar writes, only in tiles the mask cuts
//   m_new = max(m, max_j s[r, j])    one ReduceRepeat<MAX> for all rows of the tile
//   p = exp(s - m_new)               Adds per row, one Exp over the tile (hidden: exp(-inf) = 0)
//   l = l * exp(m - m_new) + sum p   one Exp for all row shifts, one ReduceRepeat<SUM> for all rows
//   acc = acc * exp(m - m_new) + sum_j p[r, j] v[j]   Muls per row, one Axpy per visible (row, key)
// and at the end out = acc / l, lse = m + ln(l), or exactly (0, -inf) for a row that saw no key.
// Scalars (m, l, counts) live in the scalar unit; values cross between the vector and scalar
// units through UB with V_S / S_V flags around every hand-over, and dependent vector
// instructions are separated by PipeBarrier<PIPE_V>.
#ifndef CPATTN_ASCENDC_ATTN_TILE_KERNEL_H
#define CPATTN_ASCENDC_ATTN_TILE_KERNEL_H

namespace cpattn_asc_dev {

constexpr uint32_t kMaxRows = 128;     // = cpattn_asc::kMaxRows (host tiling refuses more)
constexpr uint32_t kMaxKeyTile = 64;   // = cpattn_asc::kMaxKeyTile: one vector repeat of float32
constexpr uint32_t kMaxTokTile = 16;   // = cpattn_asc::kMaxTokTile
constexpr int32_t kPosMax = 0x7fffffff;

__aicore__ inline float BitsToFloat(uint32_t bits) {
  union {
    uint32_t u;
    float f;
  } x;
  x.u = bits;
  return x.f;
}
__aicore__ inline float NegInf() { return BitsToFloat(0xff800000u); }
__aicore__ inline float QuietNaN() { return BitsToFloat(0x7fc00000u); }

template <typename T>
struct IsFloat32 {
  static constexpr bool value = false;
};
template <>
struct IsFloat32<float> {
  static constexpr bool value = true;
};

// Copy the tiling struct (32-bit fields only) from global memory.
template <typename S>
__aicore__ inline void LoadTiling(GM_ADDR src, S& dst) {
  __gm__ uint32_t* s = reinterpret_cast<__gm__ uint32_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(&dst);
  for (uint32_t i = 0; i < sizeof(S) / sizeof(uint32_t); ++i) d[i] = s[i];
}

// `n` rows of `d` elements from global memory into UB rows of `rowElems` elements; consecutive
// source rows are `gmGapElems` elements apart after each row's end.
template <typename T>
__aicore__ inline void CopyRowsIn(const AscendC::LocalTensor<T>& dst, const AscendC::GlobalTensor<T>& src,
                                  uint32_t n, uint32_t d, uint32_t rowElems, uint64_t gmGapElems) {
  const uint32_t len = d * sizeof(T);
  const uint32_t padded = (len + 31) / 32 * 32;
  AscendC::DataCopyExtParams p(static_cast<uint16_t>(n), len, static_cast<uint32_t>(gmGapElems * sizeof(T)),
                               (rowElems * sizeof(T) - padded) / 32, 0);
  AscendC::DataCopyPadExtParams<T> pad;
  AscendC::DataCopyPad(dst, src, p, pad);
}

// `n` UB rows of `rowElems` elements (the first `d` used) to contiguous rows of `d` in global memory.
template <typename T>
__aicore__ inline void CopyRowsOut(const AscendC::GlobalTensor<T>& dst, const AscendC::LocalTensor<T>& src,
                                   uint32_t n, uint32_t d, uint32_t rowElems) {
  const uint32_t len = d * sizeof(T);
  const uint32_t padded = (len + 31) / 32 * 32;
  AscendC::DataCopyExtParams p(static_cast<uint16_t>(n), len, (rowElems * sizeof(T) - padded) / 32, 0, 0);
  AscendC::DataCopyPad(dst, src, p);
}

template <typename T>
class AttnTile {
 public:
  __aicore__ inline AttnTile() {}

  __aicore__ inline void Init(AscendC::TPipe* pipe, const AttnTileTiling& t) {
    pipe_ = pipe;
    t_ = t;
    pipe->InitBuffer(qInQ_, 1, t.qInBytes);
    pipe->InitBuffer(kInQ_, 2, t.kInBytes);
    if (t.vInBytes) pipe->InitBuffer(vInQ_, 2, t.vInBytes);
    pipe->InitBuffer(outQ_, 1, t.outBytes);
    pipe->InitBuffer(lseQ_, 1, t.slotBytes);
    pipe->InitBuffer(qfB_, t.qfBytes);
    if (t.kfBytes) pipe->InitBuffer(kfB_, t.kfBytes);
    if (t.vfBytes) pipe->InitBuffer(vfB_, t.vfBytes);
    pipe->InitBuffer(prodB_, t.prodBytes);
    pipe->InitBuffer(sB_, t.sBytes);
    pipe->InitBuffer(mxB_, t.mxBytes);
    pipe->InitBuffer(alphaB_, t.slotBytes);
    pipe->InitBuffer(rsB_, t.slotBytes);
    pipe->InitBuffer(lnInB_, t.slotBytes);
    pipe->InitBuffer(lnOutB_, t.slotBytes);
    pipe->InitBuffer(accB_, t.accBytes);
    qF_ = qfB_.Get<float>();
    prod_ = prodB_.Get<float>();
    s_ = sB_.Get<float>();
    mx_ = mxB_.Get<float>();
    alpha_ = alphaB_.Get<float>();
    rs_ = rsB_.Get<float>();
    lnIn_ = lnInB_.Get<float>();
    lnOut_ = lnOutB_.Get<float>();
    acc_ = accB_.Get<float>();
  }

  // ---- one work item: Begin, LoadQ (caller fills the tensor from AllocQ), tiles, Finish
  __aicore__ inline void Begin(uint32_t nTok) {
    nTok_ = nTok;
    nRows_ = nTok * t_.headChunk;
    for (uint32_t r = 0; r < nRows_; ++r) {
      m_[r] = NegInf();
      l_[r] = 0.0f;
      cnt_[r] = 0;
    }
    AscendC::Duplicate(acc_, 0.0f, static_cast<int32_t>(t_.rows * t_.rowV));
    AscendC::PipeBarrier<PIPE_V>();
  }
  __aicore__ inline AscendC::LocalTensor<T> AllocQ() { return qInQ_.template AllocTensor<T>(); }
  __aicore__ inline void LoadQ(AscendC::LocalTensor<T>& qIn, float scale) {
    qInQ_.EnQue(qIn);
    AscendC::LocalTensor<T> q = qInQ_.template DeQue<T>();
    const int32_t count = static_cast<int32_t>(nRows_ * t_.rowQK);
    if constexpr (IsFloat32<T>::value) {
      AscendC::Muls(qF_, q, scale, count);
    } else {
      AscendC::Cast(qF_, q, AscendC::RoundMode::CAST_NONE, count);
      AscendC::PipeBarrier<PIPE_V>();
      AscendC::Muls(qF_, qF_, scale, count);
    }
    AscendC::PipeBarrier<PIPE_V>();
    qInQ_.FreeTensor(q);
  }
  __aicore__ inline AscendC::LocalTensor<T> AllocK() { return kInQ_.template AllocTensor<T>(); }
  __aicore__ inline AscendC::LocalTensor<T> AllocV() { return vInQ_.template AllocTensor<T>(); }
  __aicore__ inline void EnQueK(AscendC::LocalTensor<T>& k) { kInQ_.EnQue(k); }
  __aicore__ inline void EnQueV(AscendC::LocalTensor<T>& v) { vInQ_.EnQue(v); }

  // Fold the key tile enqueued first (n keys at positions kpos[0..n)) into the item's rows;
  // token i admits the keys with kpos[j] <= lim[i].
  __aicore__ inline void Tile(uint32_t n, const int32_t* kpos, const int32_t* lim) {
    const uint32_t hc = t_.headChunk, kA = t_.keyTileA, rq = t_.rowQK, rv = t_.rowV;
    AscendC::LocalTensor<T> kIn = kInQ_.template DeQue<T>();
    AscendC::LocalTensor<float> kF;
    if constexpr (IsFloat32<T>::value) {
      kF = kIn;
    } else {
      kF = kfB_.Get<float>();
      AscendC::Cast(kF, kIn, AscendC::RoundMode::CAST_NONE, static_cast<int32_t>(n * rq));
    }
    AscendC::LocalTensor<T> vIn;
    AscendC::LocalTensor<float> vF = kF;
    uint32_t vStride = rq;
    if (!t_.vFromK) {
      vIn = vInQ_.template DeQue<T>();
      vStride = rv;
      if constexpr (IsFloat32<T>::value) {
        vF = vIn;
      } else {
        vF = vfB_.Get<float>();
        AscendC::Cast(vF, vIn, AscendC::RoundMode::CAST_NONE, static_cast<int32_t>(n * rv));
      }
    }
    AscendC::Duplicate(s_, NegInf(), static_cast<int32_t>(t_.rows * kA));
    AscendC::PipeBarrier<PIPE_V>();

    // scores of the rows of tokens that see a key of the tile; other rows stay -inf
    const uint32_t dqk = t_.dqk;
    const uint32_t chunks = (dqk + 63) / 64;
    const uint8_t rqBlk = static_cast<uint8_t>(rq / 8);  // float32 row stride in 32-byte blocks
    bool anyVisible = false, anyHidden = false;
    for (uint32_t i = 0; i < nTok_; ++i) {
      uint32_t nVis = 0;
      for (uint32_t j = 0; j < n; ++j) nVis += kpos[j] <= lim[i] ? 1u : 0u;
      if (nVis == 0) continue;
      anyVisible = true;
      anyHidden = anyHidden || nVis < n;
      for (uint32_t g = 0; g < hc; ++g) {
        const uint32_t r = i * hc + g;
        for (uint32_t c = 0; c < chunks; ++c) {  // prod[j, chunk c] = k[j, chunk c] * q[r, chunk c]
          const uint64_t mask = dqk - c * 64 < 64 ? dqk - c * 64 : 64;
          AscendC::Mul(prod_[c * 64], kF[c * 64], qF_[r * rq + c * 64], mask, static_cast<uint8_t>(n),
                       AscendC::BinaryRepeatParams(1, 1, 1, rqBlk, rqBlk, 0));
        }
        AscendC::PipeBarrier<PIPE_V>();
        for (uint32_t c = 1; c < chunks; ++c) {  // fold the chunks into the first 64 channels
          const uint64_t mask = dqk - c * 64 < 64 ? dqk - c * 64 : 64;
          AscendC::Add(prod_, prod_, prod_[c * 64], mask, static_cast<uint8_t>(n),
                       AscendC::BinaryRepeatParams(1, 1, 1, rqBlk, rqBlk, rqBlk));
          AscendC::PipeBarrier<PIPE_V>();
        }
        AscendC::ReduceRepeat<AscendC::ReduceType::SUM, float, float>(
            s_[r * kA], prod_, static_cast<int32_t>(dqk < 64 ? dqk : 64), static_cast<int32_t>(n), 1, 1, rqBlk);
        AscendC::PipeBarrier<PIPE_V>();
        cnt_[r] += nVis;
      }
    }
    if (anyHidden) {  // the mask cuts this tile: hide (row, key) pairs one by one
      SyncVS();
      for (uint32_t i = 0; i < nTok_; ++i)
        for (uint32_t j = 0; j < n; ++j)
          if (kpos[j] > lim[i])
            for (uint32_t g = 0; g < hc; ++g) s_.SetValue((i * hc + g) * kA + j, NegInf());
      SyncSV();
    }
    if (anyVisible) Fold(n, kpos, lim, vF, vStride);
    kInQ_.FreeTensor(kIn);
    if (!t_.vFromK) vInQ_.FreeTensor(vIn);
  }

  // Results of the item into the output queues (caller: DeQueOut/DeQueLse, copy out, FreeOut).
  // poison: the item read an invalid block-table entry; its rows become NaN. So does a row that
  // saw keys whose scores were all -inf (l = 0 after a key: an inf input).
  __aicore__ inline void Finish(bool poison) {
    const uint32_t rv = t_.rowV;
    bool empty[kMaxRows], bad[kMaxRows];
    SyncVS();  // the previous item's vector reads of lnIn_ are done
    for (uint32_t r = 0; r < nRows_; ++r) {
      // a row that saw keys but holds no weight: every visible score was -inf (an inf in q or
      // a key): poisoned, never mistaken for a row with no key
      bad[r] = poison || (cnt_[r] > 0 && l_[r] == 0.0f);
      empty[r] = !bad[r] && cnt_[r] == 0;
      lnIn_.SetValue(r, (empty[r] || bad[r]) ? 1.0f : l_[r]);
    }
    SyncSV();
    AscendC::Ln(lnOut_, lnIn_, static_cast<int32_t>(nRows_));
    AscendC::PipeBarrier<PIPE_V>();
    SyncVS();
    for (uint32_t r = 0; r < nRows_; ++r) {
      float lse;
      if (bad[r]) {
        lse = QuietNaN();
        AscendC::Duplicate(acc_[r * rv], QuietNaN(), static_cast<int32_t>(t_.dv));
      } else if (empty[r]) {
        lse = NegInf();
        AscendC::Duplicate(acc_[r * rv], 0.0f, static_cast<int32_t>(t_.dv));
      } else {
        lse = m_[r] + lnOut_.GetValue(r);
        AscendC::Muls(acc_[r * rv], acc_[r * rv], 1.0f / l_[r], static_cast<int32_t>(t_.dv));
      }
      lnIn_.SetValue(Slot(r), lse);  // Ln is done (V_S above): lnIn_ now stages the LSE
    }
    SyncSV();
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::LocalTensor<T> o = outQ_.template AllocTensor<T>();
    AscendC::LocalTensor<float> l = lseQ_.template AllocTensor<float>();
    const int32_t count = static_cast<int32_t>(nRows_ * rv);
    if constexpr (IsFloat32<T>::value) {
      AscendC::Adds(o, acc_, 0.0f, count);
    } else {
      AscendC::Cast(o, acc_, AscendC::RoundMode::CAST_RINT, count);
    }
    AscendC::Adds(l, lnIn_, 0.0f, static_cast<int32_t>(nTok_ * t_.headChunkA));
    outQ_.EnQue(o);
    lseQ_.EnQue(l);
  }
  __aicore__ inline AscendC::LocalTensor<T> DeQueOut() { return outQ_.template DeQue<T>(); }
  __aicore__ inline AscendC::LocalTensor<float> DeQueLse() { return lseQ_.template DeQue<float>(); }
  __aicore__ inline void FreeOut(AscendC::LocalTensor<T>& o, AscendC::LocalTensor<float>& l) {
    outQ_.FreeTensor(o);
    lseQ_.FreeTensor(l);
  }
  __aicore__ inline uint32_t Slot(uint32_t r) const {
    return (r / t_.headChunk) * t_.headChunkA + r % t_.headChunk;
  }

 private:
  __aicore__ inline void SyncVS() {
    int32_t e = static_cast<int32_t>(pipe_->FetchEventID(AscendC::HardEvent::V_S));
    AscendC::SetFlag<AscendC::HardEvent::V_S>(e);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(e);
  }
  __aicore__ inline void SyncSV() {
    int32_t e = static_cast<int32_t>(pipe_->FetchEventID(AscendC::HardEvent::S_V));
    AscendC::SetFlag<AscendC::HardEvent::S_V>(e);
    AscendC::WaitFlag<AscendC::HardEvent::S_V>(e);
  }

  // online-softmax update of the rows with the tile's scores in s_
  __aicore__ inline void Fold(uint32_t n, const int32_t* kpos, const int32_t* lim,
                              const AscendC::LocalTensor<float>& vF, uint32_t vStride) {
    const uint32_t hc = t_.headChunk, kA = t_.keyTileA, rv = t_.rowV;
    float negShift[kMaxRows];
    const uint8_t kBlk = static_cast<uint8_t>(kA / 8);
    // row maxima of the tile, [value, index] pairs: the max of row r at mx_[2 r]
    AscendC::ReduceRepeat<AscendC::ReduceType::MAX, float, float>(mx_, s_, static_cast<int32_t>(n),
                                                                  static_cast<int32_t>(nRows_), 1, 1, kBlk);
    AscendC::PipeBarrier<PIPE_V>();
    SyncVS();
    for (uint32_t r = 0; r < nRows_; ++r) {
      const float mOld = m_[r];
      const float mx = mx_.GetValue(2 * r);
      const float mNew = mx > mOld ? mx : mOld;
      const float shift = mNew == NegInf() ? 0.0f : mNew;  // no key yet: exp(-inf - 0) = 0
      m_[r] = mNew;
      negShift[r] = -shift;
      alpha_.SetValue(r, mOld - shift);
    }
    SyncSV();
    for (uint32_t r = 0; r < nRows_; ++r)
      AscendC::Adds(s_[r * kA], s_[r * kA], negShift[r], static_cast<int32_t>(n));
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::Exp(s_, s_, static_cast<int32_t>(nRows_ * kA));  // hidden scores: exp(-inf) = 0
    AscendC::Exp(alpha_, alpha_, static_cast<int32_t>(nRows_));
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::ReduceRepeat<AscendC::ReduceType::SUM, float, float>(rs_, s_, static_cast<int32_t>(n),
                                                                  static_cast<int32_t>(nRows_), 1, 1, kBlk);
    AscendC::PipeBarrier<PIPE_V>();
    SyncVS();
    for (uint32_t r = 0; r < nRows_; ++r) {
      const float a = alpha_.GetValue(r);
      l_[r] = l_[r] * a + rs_.GetValue(r);
      AscendC::Muls(acc_[r * rv], acc_[r * rv], a, static_cast<int32_t>(t_.dv));
    }
    AscendC::PipeBarrier<PIPE_V>();
    for (uint32_t j = 0; j < n; ++j) {
      bool any = false;
      for (uint32_t i = 0; i < nTok_; ++i) {
        if (kpos[j] > lim[i]) continue;
        any = true;
        for (uint32_t g = 0; g < hc; ++g) {
          const uint32_t r = i * hc + g;
          const float p = s_.GetValue(r * kA + j);
          AscendC::Axpy(acc_[r * rv], vF[j * vStride], p, static_cast<int32_t>(t_.dv));
        }
      }
      if (any) AscendC::PipeBarrier<PIPE_V>();  // the next key accumulates into the same rows
    }
    SyncSV();  // the next tile's vector writes to s_ come after these scalar reads
  }

  AscendC::TPipe* pipe_ = nullptr;
  AttnTileTiling t_;
  uint32_t nTok_ = 0, nRows_ = 0;
  float m_[kMaxRows];
  float l_[kMaxRows];
  uint32_t cnt_[kMaxRows];
  AscendC::TQue<AscendC::TPosition::VECIN, 1> qInQ_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> kInQ_, vInQ_;
  AscendC::TQue<AscendC::TPosition::VECOUT, 1> outQ_, lseQ_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> qfB_, kfB_, vfB_, prodB_, sB_, mxB_, alphaB_, rsB_,
      lnInB_, lnOutB_, accB_;
  AscendC::LocalTensor<float> qF_, prod_, s_, mx_, alpha_, rs_, lnIn_, lnOut_, acc_;
};

}  // namespace cpattn_asc_dev

#endif
