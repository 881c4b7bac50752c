// merge_attn_states: the N-way merge of partial attention results, as an AscendC vector kernel.
//
// Written against the public AscendC API of CANN 9.1. It has NOT been compiled by bisheng nor
// run on an NPU: in this project it runs through the CPU emulation in csrc/ascendc/emu/, which
// checks the API rules the hardware does not (docs/ascendc.md).
//
// Inputs (global memory):
//   outPtrs  N uint64 addresses of the partial outputs, each [rows, D] contiguous, dtype T
//   lsePtrs  N uint64 addresses of the partial LSEs, each [rows] float32 (natural log)
//   out      [rows, D] T (may be the same address as input 0: each block reads every input's
//            rows of a tile before it writes them)
//   outLse   [rows] float32, written when tiling.writeLse
//   tiling   MergeAttnStatesTiling
// Maths, in float32 per row: a +inf or NaN LSE counts as empty (-inf); m = max(max_i lse_i,
// -FLT_MAX); s = sum_i exp(lse_i - m); w_i = exp(lse_i - m) / s; out = sum_i w_i * out_i;
// lse = m + ln(s). All inputs empty: s = 0, out = 0, lse = -inf. With more inputs than one LSE
// chunk holds, the LSE rows are read three times (max, sum, weights): cheap next to the rows.
#include "kernel_operator.h"
#include "merge_attn_states_tiling.h"

namespace {

constexpr int32_t BUFFER_NUM = 2;
constexpr float NEG_FLT_MAX = -3.40282346638528859812e+38f;
constexpr float FLT_MIN_NORMAL = 1.17549435082228750797e-38f;

template <typename T>
class MergeAttnStates {
public:
    __aicore__ inline void Init(GM_ADDR outPtrs, GM_ADDR lsePtrs, GM_ADDR out, GM_ADDR outLse,
                                const MergeAttnStatesTiling& t, AscendC::TPipe* pipe)
    {
        t_ = t;
        rp_ = t.tileRowsPad;
        dp_ = t.headDimPad;
        outTable_.SetGlobalBuffer(reinterpret_cast<__gm__ uint64_t*>(outPtrs), t.numInputs);
        lseTable_.SetGlobalBuffer(reinterpret_cast<__gm__ uint64_t*>(lsePtrs), t.numInputs);
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), t.totalRows * t.headDim);
        if (t.writeLse) {
            outLseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(outLse), t.totalRows);
        }
        const uint32_t tileElems = t.tileRows * dp_;
        if (t.headDim > 0) {
            pipe->InitBuffer(inQue_, BUFFER_NUM, tileElems * sizeof(T));
            pipe->InitBuffer(outQue_, BUFFER_NUM, tileElems * sizeof(T));
            if (sizeof(T) != sizeof(float)) {
                pipe->InitBuffer(castBuf_, tileElems * sizeof(float));
                pipe->InitBuffer(accBuf_, tileElems * sizeof(float));
            } else {
                pipe->InitBuffer(compBuf_, tileElems * sizeof(float));  // Kahan compensation of the float32 sum
            }
            pipe->InitBuffer(prodBuf_, tileElems * sizeof(float));
            // per-element weights and the "weight > 0" bits: an empty input's rows may hold NaN/inf
            const uint32_t tile64 = (tileElems + 63) / 64 * 64;
            pipe->InitBuffer(wfullBuf_, tile64 * sizeof(float));
            pipe->InitBuffer(emaskBuf_, tile64 / 8);
            pipe->InitBuffer(minBuf_, 2 * 64 * sizeof(float));
        }
        pipe->InitBuffer(lseQue_, BUFFER_NUM, t.chunkInputs * rp_ * sizeof(float));
        pipe->InitBuffer(outLseQue_, BUFFER_NUM, rp_ * sizeof(float));
        pipe->InitBuffer(statBuf_, 5 * rp_ * sizeof(float));
        pipe->InitBuffer(maskBuf_, rp_ / 8);
        pipe->InitBuffer(brcBuf_, (t.tileRows + 7) / 8 * 8 * 8 * sizeof(float));
    }

    __aicore__ inline void Process()
    {
        const uint64_t start = static_cast<uint64_t>(AscendC::GetBlockIdx()) * t_.rowsPerCore;
        uint64_t end = start + t_.rowsPerCore;
        if (end > t_.totalRows) {
            end = t_.totalRows;
        }
        for (uint64_t row0 = start; row0 < end; row0 += t_.tileRows) {
            const uint64_t left = end - row0;
            Tile(row0, left < t_.tileRows ? static_cast<uint32_t>(left) : t_.tileRows);
        }
    }

private:
    // LSE rows [row0, row0 + rows) of inputs [c0, c0 + nc), one input per rp_ floats, with
    // +inf and NaN replaced by -inf. Returned DeQue'd: free it with lseQue_.FreeTensor.
    __aicore__ inline AscendC::LocalTensor<float> LoadLse(uint32_t c0, uint32_t nc, uint64_t row0, uint32_t rows)
    {
        AscendC::LocalTensor<float> lse = lseQue_.AllocTensor<float>();
        AscendC::DataCopyExtParams copy(1, rows * sizeof(float), 0, 0, 0);
        AscendC::DataCopyPadExtParams<float> pad(false, 0, 0, 0.0f);
        for (uint32_t j = 0; j < nc; ++j) {
            AscendC::GlobalTensor<float> src;
            src.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lseTable_.GetValue(c0 + j)), t_.totalRows);
            AscendC::DataCopyPad(lse[j * rp_], src[row0], copy, pad);
        }
        lseQue_.EnQue(lse);
        lse = lseQue_.DeQue<float>();
        AscendC::LocalTensor<uint8_t> mask = maskBuf_.Get<uint8_t>();
        const float posInf = __builtin_huge_valf();
        for (uint32_t j = 0; j < nc; ++j) {
            // bit = lse < +inf: false for +inf and for NaN (an unordered compare)
            AscendC::Compares(mask, lse[j * rp_], posInf, AscendC::CMPMODE::LT, rp_);
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Select(lse[j * rp_], mask, lse[j * rp_], -posInf, AscendC::SELMODE::VSEL_TENSOR_SCALAR_MODE, rp_);
            AscendC::PipeBarrier<PIPE_V>();
        }
        return lse;
    }

    __aicore__ inline void Tile(uint64_t row0, uint32_t rows)
    {
        AscendC::LocalTensor<float> st = statBuf_.Get<float>();
        AscendC::LocalTensor<float> m = st;
        AscendC::LocalTensor<float> s = st[rp_];
        AscendC::LocalTensor<float> tmp = st[2 * rp_];
        AscendC::LocalTensor<float> den = st[3 * rp_];
        cs_ = st[4 * rp_];
        AscendC::Duplicate(m, NEG_FLT_MAX, rp_);
        AscendC::Duplicate(s, 0.0f, rp_);
        AscendC::Duplicate(cs_, 0.0f, rp_);
        AscendC::PipeBarrier<PIPE_V>();
        const bool oneChunk = t_.numInputs <= t_.chunkInputs;
        if (oneChunk) {
            // everything from one load of the LSE rows
            AscendC::LocalTensor<float> w = LoadLse(0, t_.numInputs, row0, rows);
            MaxInto(m, w, t_.numInputs);
            ExpSum(w, t_.numInputs, m, s, tmp, den);
            Denominator(s, den);
            Divide(w, t_.numInputs, den);
            if (t_.headDim > 0) {
                AccBegin();
                AccChunk(w, 0, t_.numInputs, row0, rows);
                AccEnd(row0, rows);
            }
            lseQue_.FreeTensor(w);
        } else {
            // the exact max first, then the sum with it (no rescaling of partial sums: the same
            // roundings as a plain float32 merge), then the weighted rows
            for (uint32_t c0 = 0; c0 < t_.numInputs; c0 += t_.chunkInputs) {
                AscendC::LocalTensor<float> w = LoadLse(c0, Chunk(c0), row0, rows);
                MaxInto(m, w, Chunk(c0));
                lseQue_.FreeTensor(w);
            }
            for (uint32_t c0 = 0; c0 < t_.numInputs; c0 += t_.chunkInputs) {
                AscendC::LocalTensor<float> w = LoadLse(c0, Chunk(c0), row0, rows);
                ExpSum(w, Chunk(c0), m, s, tmp, den);
                lseQue_.FreeTensor(w);
            }
            Denominator(s, den);
            if (t_.headDim > 0) {
                AccBegin();
                for (uint32_t c0 = 0; c0 < t_.numInputs; c0 += t_.chunkInputs) {
                    AscendC::LocalTensor<float> w = LoadLse(c0, Chunk(c0), row0, rows);
                    ExpSub(w, Chunk(c0), m);
                    Divide(w, Chunk(c0), den);
                    AccChunk(w, c0, Chunk(c0), row0, rows);
                    lseQue_.FreeTensor(w);
                }
                AccEnd(row0, rows);
            }
        }
        if (t_.writeLse) {
            AscendC::LocalTensor<float> o = outLseQue_.AllocTensor<float>();
            AscendC::Ln(tmp, s, rp_);  // ln(0) = -inf: the empty state's LSE
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Add(o, m, tmp, rp_);
            outLseQue_.EnQue(o);
            o = outLseQue_.DeQue<float>();
            AscendC::DataCopyPad(outLseGm_[row0], o, AscendC::DataCopyExtParams(1, rows * sizeof(float), 0, 0, 0));
            outLseQue_.FreeTensor(o);
        }
    }

    // m = max(m, lse_j) over the chunk's inputs
    __aicore__ inline void MaxInto(const AscendC::LocalTensor<float>& m, const AscendC::LocalTensor<float>& lse, uint32_t nc)
    {
        for (uint32_t j = 0; j < nc; ++j) {
            AscendC::Max(m, m, lse[j * rp_], rp_);
            AscendC::PipeBarrier<PIPE_V>();
        }
    }

    // lse_j = exp(lse_j - m)
    __aicore__ inline void ExpSub(const AscendC::LocalTensor<float>& lse, uint32_t nc, const AscendC::LocalTensor<float>& m)
    {
        for (uint32_t j = 0; j < nc; ++j) {
            AscendC::Sub(lse[j * rp_], lse[j * rp_], m, rp_);
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Exp(lse[j * rp_], lse[j * rp_], rp_);
            AscendC::PipeBarrier<PIPE_V>();
        }
    }

    // lse_j = exp(lse_j - m); s += lse_j in input order, Kahan-compensated (cs_): the sum's
    // rounding scales every weight of the row, so it is kept to about one ulp whatever N is.
    // y and t are scratch vectors.
    __aicore__ inline void ExpSum(const AscendC::LocalTensor<float>& lse, uint32_t nc, const AscendC::LocalTensor<float>& m,
                                  const AscendC::LocalTensor<float>& s, const AscendC::LocalTensor<float>& y,
                                  const AscendC::LocalTensor<float>& t)
    {
        ExpSub(lse, nc, m);
        for (uint32_t j = 0; j < nc; ++j) {
            AscendC::Sub(y, lse[j * rp_], cs_, rp_);  // y = e_j - c
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Add(t, s, y, rp_);  // t = s + y
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Sub(cs_, t, s, rp_);  // c = (t - s) - y
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Sub(cs_, cs_, y, rp_);
            AscendC::Muls(s, t, 1.0f, rp_);  // s = t
            AscendC::PipeBarrier<PIPE_V>();
        }
    }

    // den = max(s, FLT_MIN): s >= 1 unless every input is empty (s = 0: every weight 0, not NaN)
    __aicore__ inline void Denominator(const AscendC::LocalTensor<float>& s, const AscendC::LocalTensor<float>& den)
    {
        AscendC::Maxs(den, s, FLT_MIN_NORMAL, rp_);
        AscendC::PipeBarrier<PIPE_V>();
    }

    // w_j = w_j / den
    __aicore__ inline void Divide(const AscendC::LocalTensor<float>& w, uint32_t nc, const AscendC::LocalTensor<float>& den)
    {
        for (uint32_t j = 0; j < nc; ++j) {
            AscendC::Div(w[j * rp_], w[j * rp_], den, rp_);
            AscendC::PipeBarrier<PIPE_V>();
        }
    }

    // ---- the weighted sum of rows: out = sum_i w_i * out_i, weights broadcast along D by Brcb
    // and a block stride of 0

    __aicore__ inline void AccBegin()
    {
        y_ = outQue_.AllocTensor<T>();
        if constexpr (sizeof(T) == sizeof(float)) {
            acc_ = y_.template ReinterpretCast<float>();  // float32: accumulate in the output tile itself
            comp_ = compBuf_.Get<float>();
        } else {
            acc_ = accBuf_.Get<float>();
        }
        first_ = true;
    }

    __aicore__ inline void AccChunk(const AscendC::LocalTensor<float>& w, uint32_t c0, uint32_t nc, uint64_t row0,
                                    uint32_t rows)
    {
        const uint32_t d = t_.headDim;
        const uint32_t elems = rows * dp_;
        AscendC::LocalTensor<float> prod = prodBuf_.Get<float>();
        AscendC::LocalTensor<float> brc = brcBuf_.Get<float>();
        AscendC::LocalTensor<float> wfull = wfullBuf_.Get<float>();
        AscendC::LocalTensor<uint8_t> emask = emaskBuf_.Get<uint8_t>();
        const AscendC::DataCopyExtParams rowsCopy(static_cast<uint16_t>(rows), d * sizeof(T), 0, 0, 0);
        const AscendC::DataCopyPadExtParams<T> zeroPad(true, 0, static_cast<uint8_t>(dp_ - d), T(0));
        const uint8_t rowBlocks = static_cast<uint8_t>(dp_ * sizeof(float) / 32);
        const AscendC::BinaryRepeatParams bcast(1, 1, 0, rowBlocks, rowBlocks, 1);
        const AscendC::UnaryRepeatParams bcastUnary(1, 0, rowBlocks, 1);
        for (uint32_t j = 0; j < nc; ++j) {
            const bool masked = HasEmptyRow(w[j * rp_], rows);
            AscendC::Brcb(brc, w[j * rp_], static_cast<uint8_t>((rows + 7) / 8), AscendC::BrcbRepeatParams(1, 8));
            if (masked) {
                // 0 * NaN is NaN: rows of weight 0 (empty inputs) are cleared after the Mul
                AscendC::PipeBarrier<PIPE_V>();
                for (uint32_t k = 0; k < dp_; k += 64) {
                    const uint32_t lanes = dp_ - k < 64 ? dp_ - k : 64;
                    AscendC::Adds(wfull[k], brc, 0.0f, lanes, rows, bcastUnary);
                }
                AscendC::PipeBarrier<PIPE_V>();
                AscendC::Compares(emask, wfull, 0.0f, AscendC::CMPMODE::GT, (elems + 63) / 64 * 64);
            }
            AscendC::LocalTensor<T> x = inQue_.AllocTensor<T>();
            AscendC::GlobalTensor<T> src;
            src.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(outTable_.GetValue(c0 + j)), t_.totalRows * d);
            AscendC::DataCopyPad(x, src[row0 * d], rowsCopy, zeroPad);
            inQue_.EnQue(x);
            x = inQue_.DeQue<T>();
            AscendC::LocalTensor<float> xf;
            if constexpr (sizeof(T) == sizeof(float)) {
                xf = x.template ReinterpretCast<float>();
            } else {
                xf = castBuf_.Get<float>();
                AscendC::Cast(xf, x, AscendC::RoundMode::CAST_NONE, elems);
            }
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::LocalTensor<float> target = first_ ? acc_ : prod;
            for (uint32_t k = 0; k < dp_; k += 64) {
                const uint32_t lanes = dp_ - k < 64 ? dp_ - k : 64;
                AscendC::Mul(target[k], xf[k], brc, lanes, rows, bcast);
            }
            AscendC::PipeBarrier<PIPE_V>();
            if (masked) {
                AscendC::Select(target, emask, target, 0.0f, AscendC::SELMODE::VSEL_TENSOR_SCALAR_MODE, elems);
                AscendC::PipeBarrier<PIPE_V>();
            }
            if constexpr (sizeof(T) == sizeof(float)) {
                if (first_) {
                    AscendC::Duplicate(comp_, 0.0f, elems);
                    AscendC::PipeBarrier<PIPE_V>();
                } else {
                    // Kahan: a float32 output keeps about one ulp of error however many inputs
                    AscendC::Sub(prod, prod, comp_, elems);  // y = p - c
                    AscendC::PipeBarrier<PIPE_V>();
                    AscendC::Add(comp_, acc_, prod, elems);  // t = acc + y (into c's buffer)
                    AscendC::PipeBarrier<PIPE_V>();
                    AscendC::Sub(acc_, comp_, acc_, elems);  // t - acc
                    AscendC::PipeBarrier<PIPE_V>();
                    AscendC::Sub(acc_, acc_, prod, elems);  // c = (t - acc) - y
                    AscendC::PipeBarrier<PIPE_V>();
                    AscendC::LocalTensor<float> sum = comp_;  // the buffers trade roles
                    comp_ = acc_;
                    acc_ = sum;
                }
            } else if (!first_) {
                AscendC::Add(acc_, acc_, prod, elems);  // 16-bit outputs: the final rounding dominates
                AscendC::PipeBarrier<PIPE_V>();
            }
            first_ = false;
            inQue_.FreeTensor(x);
        }
    }

    __aicore__ inline void AccEnd(uint64_t row0, uint32_t rows)
    {
        const uint32_t d = t_.headDim;
        if constexpr (sizeof(T) != sizeof(float)) {
            AscendC::Cast(y_, acc_, AscendC::RoundMode::CAST_RINT, rows * dp_);  // round to nearest even
        } else {
            AscendC::LocalTensor<float> yf = y_.template ReinterpretCast<float>();
            if (acc_.GetPhyAddr() != yf.GetPhyAddr()) {
                AscendC::Muls(yf, acc_, 1.0f, rows * dp_);  // the sum ended in the other buffer (x * 1 keeps -0)
            }
        }
        outQue_.EnQue(y_);
        y_ = outQue_.DeQue<T>();
        AscendC::DataCopyPad(outGm_[row0 * d], y_, AscendC::DataCopyExtParams(static_cast<uint16_t>(rows), d * sizeof(T), 0, 0, 0));
        outQue_.FreeTensor(y_);
    }

    // Whether some of the first `rows` weights is 0 (one ReduceMin and a scalar read: the
    // masking it guards costs three more passes over the tile).
    __aicore__ inline bool HasEmptyRow(const AscendC::LocalTensor<float>& w, uint32_t rows)
    {
        AscendC::LocalTensor<float> mn = minBuf_.Get<float>();
        AscendC::ReduceMin(mn, w, mn[64], static_cast<int32_t>(rows));
        // event ids from the pipe, not hard-coded: the queues use some ids themselves
        const AscendC::TEventID vs = AscendC::GetTPipePtr()->FetchEventID(AscendC::HardEvent::V_S);
        AscendC::SetFlag<AscendC::HardEvent::V_S>(vs);
        AscendC::WaitFlag<AscendC::HardEvent::V_S>(vs);
        const bool empty = !(mn.GetValue(0) > 0.0f);
        const AscendC::TEventID sv = AscendC::GetTPipePtr()->FetchEventID(AscendC::HardEvent::S_V);
        AscendC::SetFlag<AscendC::HardEvent::S_V>(sv);
        AscendC::WaitFlag<AscendC::HardEvent::S_V>(sv);
        return empty;
    }

    __aicore__ inline uint32_t Chunk(uint32_t c0) const
    {
        const uint32_t left = t_.numInputs - c0;
        return left < t_.chunkInputs ? left : t_.chunkInputs;
    }

    MergeAttnStatesTiling t_;
    AscendC::LocalTensor<T> y_;        // the output tile being accumulated
    AscendC::LocalTensor<float> acc_;   // its float32 accumulator (for float32: y_ or compBuf_)
    AscendC::LocalTensor<float> comp_;  // float32: the Kahan compensation (the other of the two)
    AscendC::LocalTensor<float> cs_;    // Kahan compensation of the sum of weights
    bool first_ = true;
    uint32_t rp_ = 0;
    uint32_t dp_ = 0;
    AscendC::GlobalTensor<uint64_t> outTable_;
    AscendC::GlobalTensor<uint64_t> lseTable_;
    AscendC::GlobalTensor<T> outGm_;
    AscendC::GlobalTensor<float> outLseGm_;
    AscendC::TQue<AscendC::TPosition::VECIN, BUFFER_NUM> inQue_;
    AscendC::TQue<AscendC::TPosition::VECIN, BUFFER_NUM> lseQue_;
    AscendC::TQue<AscendC::TPosition::VECOUT, BUFFER_NUM> outQue_;
    AscendC::TQue<AscendC::TPosition::VECOUT, BUFFER_NUM> outLseQue_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> castBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> accBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> compBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> prodBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> statBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> maskBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> brcBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> wfullBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> emaskBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> minBuf_;
};

__aicore__ inline void ReadTiling(GM_ADDR tiling, MergeAttnStatesTiling& t)
{
    AscendC::GlobalTensor<uint32_t> src;
    src.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(tiling), sizeof(MergeAttnStatesTiling) / sizeof(uint32_t));
    uint32_t* dst = reinterpret_cast<uint32_t*>(&t);
    for (uint32_t i = 0; i < sizeof(MergeAttnStatesTiling) / sizeof(uint32_t); ++i) {
        dst[i] = src.GetValue(i);
    }
}

template <typename T>
__aicore__ inline void Run(GM_ADDR outPtrs, GM_ADDR lsePtrs, GM_ADDR out, GM_ADDR outLse, const MergeAttnStatesTiling& t)
{
    AscendC::TPipe pipe;
    MergeAttnStates<T> op;
    op.Init(outPtrs, lsePtrs, out, outLse, t, &pipe);
    op.Process();
}

}  // namespace

extern "C" __global__ __aicore__ void merge_attn_states(GM_ADDR outPtrs, GM_ADDR lsePtrs, GM_ADDR out, GM_ADDR outLse,
                                                        GM_ADDR tiling)
{
    MergeAttnStatesTiling t;
    ReadTiling(tiling, t);
    if (t.dtype == 0) {
        Run<float>(outPtrs, lsePtrs, out, outLse, t);
    } else if (t.dtype == 1) {
        Run<half>(outPtrs, lsePtrs, out, outLse, t);
    } else {
        Run<bfloat16_t>(outPtrs, lsePtrs, out, outLse, t);
    }
}
