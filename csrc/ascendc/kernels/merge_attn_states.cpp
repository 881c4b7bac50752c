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
// -FLT_MAX); s = sum_i exp(lse_i - m) (online over input chunks); w_i = exp(lse_i - m) / s;
// out = sum_i w_i * out_i; lse = m + ln(s). All inputs empty: s = 0, out = 0, lse = -inf.
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
        pipe->InitBuffer(statBuf_, 4 * rp_ * sizeof(float));
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
        AscendC::LocalTensor<float> inv = st[3 * rp_];
        AscendC::Duplicate(m, NEG_FLT_MAX, rp_);
        AscendC::Duplicate(s, 0.0f, rp_);
        AscendC::PipeBarrier<PIPE_V>();

        // Pass 1: running max and rescaled sum of exp over chunks of inputs.
        for (uint32_t c0 = 0; c0 < t_.numInputs; c0 += t_.chunkInputs) {
            const uint32_t nc = Chunk(c0);
            AscendC::LocalTensor<float> lse = LoadLse(c0, nc, row0, rows);
            AscendC::Adds(tmp, m, 0.0f, rp_);  // the old max
            for (uint32_t j = 0; j < nc; ++j) {
                AscendC::Max(m, m, lse[j * rp_], rp_);
                AscendC::PipeBarrier<PIPE_V>();
            }
            AscendC::Sub(tmp, tmp, m, rp_);
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Exp(tmp, tmp, rp_);
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Mul(s, s, tmp, rp_);
            AscendC::PipeBarrier<PIPE_V>();
            for (uint32_t j = 0; j < nc; ++j) {
                AscendC::Sub(lse[j * rp_], lse[j * rp_], m, rp_);
                AscendC::PipeBarrier<PIPE_V>();
                AscendC::Exp(lse[j * rp_], lse[j * rp_], rp_);
                AscendC::PipeBarrier<PIPE_V>();
                AscendC::Add(s, s, lse[j * rp_], rp_);
                AscendC::PipeBarrier<PIPE_V>();
            }
            lseQue_.FreeTensor(lse);
        }
        // inv = 1 / max(s, FLT_MIN): s >= 1 unless every input is empty (s = 0, weights 0)
        AscendC::Maxs(tmp, s, FLT_MIN_NORMAL, rp_);
        AscendC::Duplicate(inv, 1.0f, rp_);
        AscendC::PipeBarrier<PIPE_V>();
        AscendC::Div(inv, inv, tmp, rp_);
        AscendC::PipeBarrier<PIPE_V>();

        if (t_.headDim > 0) {
            Accumulate(row0, rows, m, inv);
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

    // Pass 2: out rows = sum_i w_i * out_i, weights broadcast along D by Brcb + block stride 0.
    __aicore__ inline void Accumulate(uint64_t row0, uint32_t rows, const AscendC::LocalTensor<float>& m,
                                      const AscendC::LocalTensor<float>& inv)
    {
        const uint32_t d = t_.headDim;
        const uint32_t elems = rows * dp_;
        AscendC::LocalTensor<T> y = outQue_.AllocTensor<T>();
        AscendC::LocalTensor<float> acc;
        if constexpr (sizeof(T) == sizeof(float)) {
            acc = y.template ReinterpretCast<float>();  // float32: accumulate in the output tile itself
        } else {
            acc = accBuf_.Get<float>();
        }
        AscendC::LocalTensor<float> prod = prodBuf_.Get<float>();
        AscendC::LocalTensor<float> brc = brcBuf_.Get<float>();
        const AscendC::DataCopyExtParams rowsCopy(static_cast<uint16_t>(rows), d * sizeof(T), 0, 0, 0);
        const AscendC::DataCopyPadExtParams<T> zeroPad(true, 0, static_cast<uint8_t>(dp_ - d), T(0));
        const uint8_t rowBlocks = static_cast<uint8_t>(dp_ * sizeof(float) / 32);
        const AscendC::BinaryRepeatParams bcast(1, 1, 0, rowBlocks, rowBlocks, 1);
        const AscendC::UnaryRepeatParams bcastUnary(1, 0, rowBlocks, 1);
        AscendC::LocalTensor<float> wfull = wfullBuf_.Get<float>();
        AscendC::LocalTensor<uint8_t> emask = emaskBuf_.Get<uint8_t>();
        bool first = true;
        for (uint32_t c0 = 0; c0 < t_.numInputs; c0 += t_.chunkInputs) {
            const uint32_t nc = Chunk(c0);
            AscendC::LocalTensor<float> w = LoadLse(c0, nc, row0, rows);
            for (uint32_t j = 0; j < nc; ++j) {
                AscendC::Sub(w[j * rp_], w[j * rp_], m, rp_);
                AscendC::PipeBarrier<PIPE_V>();
                AscendC::Exp(w[j * rp_], w[j * rp_], rp_);
                AscendC::PipeBarrier<PIPE_V>();
                AscendC::Mul(w[j * rp_], w[j * rp_], inv, rp_);
                AscendC::PipeBarrier<PIPE_V>();
            }
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
                AscendC::LocalTensor<float> target = first ? acc : prod;
                for (uint32_t k = 0; k < dp_; k += 64) {
                    const uint32_t lanes = dp_ - k < 64 ? dp_ - k : 64;
                    AscendC::Mul(target[k], xf[k], brc, lanes, rows, bcast);
                }
                AscendC::PipeBarrier<PIPE_V>();
                if (masked) {
                    AscendC::Select(target, emask, target, 0.0f, AscendC::SELMODE::VSEL_TENSOR_SCALAR_MODE, elems);
                    AscendC::PipeBarrier<PIPE_V>();
                }
                if (!first) {
                    AscendC::Add(acc, acc, prod, elems);
                    AscendC::PipeBarrier<PIPE_V>();
                }
                first = false;
                inQue_.FreeTensor(x);
            }
            lseQue_.FreeTensor(w);
        }
        if constexpr (sizeof(T) != sizeof(float)) {
            AscendC::Cast(y, acc, AscendC::RoundMode::CAST_RINT, elems);  // round to nearest even
        }
        outQue_.EnQue(y);
        y = outQue_.DeQue<T>();
        AscendC::DataCopyPad(outGm_[row0 * d], y, rowsCopy);
        outQue_.FreeTensor(y);
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
