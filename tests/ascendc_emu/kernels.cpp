// Tiny AscendC kernels for the emulation's own tests (tests/test_ascendc_emulation.py): one
// that follows every rule, one per rule that breaks it, and a few that pin down documented
// semantics. Built with the system C++ compiler against csrc/ascendc/emu, without torch; run
// through emu_test_run (C ABI, loaded with ctypes). Every kernel takes x (read-only, floats) and
// y (writable, floats).
#include <map>
#include <string>

#include "kernel_operator.h"

using namespace AscendC;

#define KERNEL(NAME) extern "C" __global__ __aicore__ void NAME(GM_ADDR x, GM_ADDR y)

namespace {
GlobalTensor<float> gx(GM_ADDR x, uint64_t n = 1024) {
    GlobalTensor<float> g;
    g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(x), n);
    return g;
}
}  // namespace

// ---------------------------------------------------------------- follows the rules
// y[b*64 + i] = 2 * x[b*64 + i] + 1 for each block b: queues, barriers, flags, DataCopy.
KERNEL(good_kernel) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    TQue<TPosition::VECOUT, 2> out;
    TBuf<TPosition::VECCALC> tmp;
    pipe.InitBuffer(in, 2, 64 * sizeof(float));
    pipe.InitBuffer(out, 2, 64 * sizeof(float));
    pipe.InitBuffer(tmp, 64 * sizeof(float));
    const uint64_t off = GetBlockIdx() * 64;
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x)[off], 64);
    in.EnQue(a);
    a = in.DeQue<float>();
    LocalTensor<float> t = tmp.Get<float>();
    Muls(t, a, 2.0f, 64);
    PipeBarrier<PIPE_V>();
    LocalTensor<float> b = out.AllocTensor<float>();
    Adds(b, t, 1.0f, 64);
    out.EnQue(b);
    in.FreeTensor(a);
    b = out.DeQue<float>();
    DataCopy(gx(y)[off], b, 64);
    out.FreeTensor(b);
    // a scalar read of a vector result, with its flags
    Duplicate(t, 5.0f, 64);
    SetFlag<HardEvent::V_S>(EVENT_ID1);
    WaitFlag<HardEvent::V_S>(EVENT_ID1);
    if (t.GetValue(3) != 5.0f) emu::fail("test", "scalar read");
}

// ---------------------------------------------------------------- one per rule

KERNEL(ub_overflow) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    pipe.InitBuffer(in, 2, 100 * 1024);  // 200 KiB > 192 KiB - 256 B
}

KERNEL(ub_rounding) {  // fits only if sizes were not rounded up to 32 bytes
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, b;
    pipe.InitBuffer(a, 33);                   // takes 64
    pipe.InitBuffer(b, emu::UB_SIZE - 63);    // takes UB_SIZE - 32: 32 bytes too many
}

KERNEL(ub_misaligned) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(in, 1, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a[1], gx(x), 8);  // UB address 4 bytes past a 32-byte boundary
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
}

KERNEL(ub_out_of_buffer) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 64 * sizeof(float));
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 1.0f, 72);  // 8 elements past the buffer
}

KERNEL(datacopy_unaligned) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(in, 1, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 7);  // 28 bytes: the NPU would copy 0
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
}

KERNEL(datacopypad_elements_not_bytes) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(in, 1, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopyPad(a, gx(x), DataCopyExtParams(1, 6, 0, 0, 0), DataCopyPadExtParams<float>(false, 0, 0, 0.0f));  // 6 bytes
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
}

KERNEL(datacopypad_to_veccalc) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 256);
    LocalTensor<float> t = a.Get<float>();
    DataCopyPad(t, gx(x), DataCopyExtParams(1, 20, 0, 0, 0), DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
}

// Documented padding: blockCount 2 of 5 floats, GM gap 4 bytes, right padding 3 of value 9
// (isPad); then 2 blocks of 5 floats with no padding (dummy = the block's first element).
// y[0:32] = the UB image; y[64:75] = UB -> GM of rows 0 and 1 (5 floats each, GM gap 4 bytes).
KERNEL(datacopypad_semantics) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    pipe.InitBuffer(in, 1, 32 * sizeof(float));
    pipe.InitBuffer(out, 1, 32 * sizeof(float));
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopyPad(a, gx(x), DataCopyExtParams(2, 5 * sizeof(float), 4, 0, 0), DataCopyPadExtParams<float>(true, 0, 3, 9.0f));
    DataCopyPad(a[16], gx(x)[20], DataCopyExtParams(2, 5 * sizeof(float), 0, 0, 0), DataCopyPadExtParams<float>(true, 0, 0, 9.0f));
    in.EnQue(a);
    a = in.DeQue<float>();
    LocalTensor<float> d = out.AllocTensor<float>();
    Adds(d, a, 0.0f, 32);
    in.FreeTensor(a);
    out.EnQue(d);
    d = out.DeQue<float>();
    DataCopy(gx(y), d, 32);
    DataCopyPad(gx(y)[64], d, DataCopyExtParams(2, 5 * sizeof(float), 0, 4, 0));
    out.FreeTensor(d);
}

KERNEL(deque_without_enque) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    pipe.InitBuffer(in, 2, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 64);
    LocalTensor<float> b = in.DeQue<float>();
    in.FreeTensor(b);
}

KERNEL(double_free) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    pipe.InitBuffer(in, 2, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 64);
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
    in.FreeTensor(a);
}

KERNEL(free_before_enque) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    pipe.InitBuffer(in, 2, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    in.FreeTensor(a);
}

KERNEL(alloc_beyond_buffers) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    pipe.InitBuffer(in, 2, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    LocalTensor<float> b = in.AllocTensor<float>();
    LocalTensor<float> c = in.AllocTensor<float>();  // both buffers are in use
}

KERNEL(enque_beyond_depth) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(in, 2, 256);  // two buffers, depth 1
    LocalTensor<float> a = in.AllocTensor<float>();
    LocalTensor<float> b = in.AllocTensor<float>();
    in.EnQue(a);
    in.EnQue(b);
}

KERNEL(vector_reads_before_deque) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    TBuf<TPosition::VECCALC> tmp;
    pipe.InitBuffer(in, 2, 256);
    pipe.InitBuffer(tmp, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 64);
    LocalTensor<float> t = tmp.Get<float>();
    Adds(t, a, 1.0f, 64);  // the copy may still be in flight: EnQue/DeQue first
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
}

KERNEL(leaked_tensor) {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> in;
    pipe.InitBuffer(in, 2, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 64);
    in.EnQue(a);
    a = in.DeQue<float>();  // never freed
}

KERNEL(repeat_over_255) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 300 * 256);
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 0.0f, 300 * 64);
    PipeBarrier<PIPE_V>();
    int repeat = 300;
    Add(t, t, t, 64, repeat, BinaryRepeatParams(1, 1, 1, 8, 8, 8));
}

KERNEL(mask_over_lanes) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 1024);
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 0.0f, 256);
    PipeBarrier<PIPE_V>();
    Add(t, t, t, 65, 1, BinaryRepeatParams(1, 1, 1, 8, 8, 8));  // 64 float lanes per repeat
}

KERNEL(compares_count_unaligned) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, m;
    pipe.InitBuffer(a, 256);
    pipe.InitBuffer(m, 32);
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 0.0f, 64);
    PipeBarrier<PIPE_V>();
    LocalTensor<uint8_t> bits = m.Get<uint8_t>();
    Compares(bits, t, 0.0f, CMPMODE::LT, 40);  // 160 bytes: not a multiple of 256
}

KERNEL(cast_bf16_without_mode) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, b;
    pipe.InitBuffer(a, 256);
    pipe.InitBuffer(b, 256);
    LocalTensor<float> f = a.Get<float>();
    LocalTensor<bfloat16_t> h = b.Get<bfloat16_t>();
    Duplicate(f, 1.0f, 64);
    PipeBarrier<PIPE_V>();
    Cast(h, f, RoundMode::CAST_NONE, 64);  // float -> bfloat16 needs an explicit mode on A2
}

KERNEL(missing_pipe_barrier) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, b;
    pipe.InitBuffer(a, 256);
    pipe.InitBuffer(b, 256);
    LocalTensor<float> s = a.Get<float>(), d = b.Get<float>();
    Duplicate(s, 1.0f, 64);
    Adds(d, s, 1.0f, 64);  // reads what the previous vector instruction writes: PipeBarrier<PIPE_V>
}

KERNEL(missing_flag_mte2_v) {
    TPipe pipe;
    TBuf<TPosition::VECIN> a;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(a, 256);
    pipe.InitBuffer(b, 256);
    LocalTensor<float> s = a.Get<float>(), d = b.Get<float>();
    DataCopy(s, gx(x), 64);
    Adds(d, s, 1.0f, 64);  // needs SetFlag/WaitFlag<HardEvent::MTE2_V>
}

KERNEL(flag_mte2_v_ok) {
    TPipe pipe;
    TBuf<TPosition::VECIN> a;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(a, 256);
    pipe.InitBuffer(b, 256);
    LocalTensor<float> s = a.Get<float>(), d = b.Get<float>();
    DataCopy(s, gx(x), 64);
    TEventID e = GetTPipePtr()->FetchEventID(HardEvent::MTE2_V);
    SetFlag<HardEvent::MTE2_V>(e);
    WaitFlag<HardEvent::MTE2_V>(e);
    Adds(d, s, 1.0f, 64);
}

KERNEL(scalar_read_without_flag) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 256);
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 1.0f, 64);
    float v = t.GetValue(0);  // needs SetFlag/WaitFlag<HardEvent::V_S>
    (void)v;
}

KERNEL(set_flag_never_waited) {
    TPipe pipe;
    SetFlag<HardEvent::MTE2_V>(EVENT_ID0);
}

KERNEL(wait_flag_never_set) {
    TPipe pipe;
    WaitFlag<HardEvent::V_MTE3>(EVENT_ID2);
}

KERNEL(blocks_write_same_bytes) {  // every block writes y[0:64]
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> out;
    pipe.InitBuffer(out, 1, 256);
    LocalTensor<float> b = out.AllocTensor<float>();
    Duplicate(b, float(GetBlockIdx()), 64);
    out.EnQue(b);
    b = out.DeQue<float>();
    DataCopy(gx(y), b, 64);
    out.FreeTensor(b);
}

KERNEL(block_reads_what_another_writes) {  // block b writes y[b*64..], reads y[(b+1)*64..]
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    pipe.InitBuffer(in, 1, 256);
    pipe.InitBuffer(out, 1, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(y)[(GetBlockIdx() + 1) * 64], 64);
    in.EnQue(a);
    a = in.DeQue<float>();
    LocalTensor<float> b = out.AllocTensor<float>();
    Adds(b, a, 1.0f, 64);
    in.FreeTensor(a);
    out.EnQue(b);
    b = out.DeQue<float>();
    DataCopy(gx(y)[GetBlockIdx() * 64], b, 64);
    out.FreeTensor(b);
}

KERNEL(gm_out_of_bounds) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(in, 1, 256);
    LocalTensor<float> a = in.AllocTensor<float>();
    GlobalTensor<float> g;
    g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(x));  // no size: only the launch buffers bound it
    DataCopy(a, g[1024 - 8], 64);  // x holds 1024 floats
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
}

KERNEL(select_without_reserved_ub) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, m, rest;
    pipe.InitBuffer(a, 256);
    pipe.InitBuffer(m, 32);
    pipe.InitBuffer(rest, emu::UB_SIZE - 256 - 32 - 4096);  // leaves 4 KiB: Select needs 8
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 0.0f, 64);
    PipeBarrier<PIPE_V>();
    LocalTensor<uint8_t> bits = m.Get<uint8_t>();
    Compares(bits, t, 0.0f, CMPMODE::LT, 64);  // no reserved UB on A2
    PipeBarrier<PIPE_V>();
    Select(t, bits, t, 1.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, 64);  // reserves 8 KiB on A2
}

namespace {
// y[0:64] = 1 through a VECOUT queue (MTE3); returns after the copy is issued
template <class Q>
void write_y(TPipe& pipe, Q& out, GM_ADDR y, uint64_t at) {
    LocalTensor<float> b = out.template AllocTensor<float>();
    Duplicate(b, 1.0f, 64);
    out.EnQue(b);
    b = out.template DeQue<float>();
    DataCopy(gx(y)[at], b, 64);
    out.FreeTensor(b);
}
void read_y(TQue<TPosition::VECIN, 1>& in, GM_ADDR y) {
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(y), 64);
    in.EnQue(a);
    a = in.DeQue<float>();
    in.FreeTensor(a);
}
}  // namespace

KERNEL(gm_read_after_write_no_flag) {
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> out;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(out, 1, 256);
    pipe.InitBuffer(in, 1, 256);
    write_y(pipe, out, y, 0);
    read_y(in, y);  // MTE2 may read before MTE3 wrote
}

KERNEL(gm_read_after_write_flag_ok) {
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> out;
    TQue<TPosition::VECIN, 1> in;
    pipe.InitBuffer(out, 1, 256);
    pipe.InitBuffer(in, 1, 256);
    write_y(pipe, out, y, 0);
    SetFlag<HardEvent::MTE3_MTE2>(EVENT_ID0);
    WaitFlag<HardEvent::MTE3_MTE2>(EVENT_ID0);
    read_y(in, y);
}

KERNEL(gm_overlapping_writes_no_barrier) {
    TPipe pipe;
    TQue<TPosition::VECOUT, 2> out;  // two buffers: the second write does not wait for the first
    pipe.InitBuffer(out, 2, 256);
    write_y(pipe, out, y, 0);
    write_y(pipe, out, y, 32);  // overlaps y[32:64]: PipeBarrier<PIPE_MTE3> between them
}

KERNEL(gm_overlapping_writes_one_buffer_ok) {  // one buffer: FreeTensor/AllocTensor order them
    TPipe pipe;
    TQue<TPosition::VECOUT, 1> out;
    pipe.InitBuffer(out, 1, 256);
    write_y(pipe, out, y, 0);
    write_y(pipe, out, y, 32);
}

KERNEL(vector_partial_overlap) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 512);
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 1.0f, 128);
    PipeBarrier<PIPE_V>();
    Adds(t[8], t, 1.0f, 64);
}

KERNEL(level0_overlap_across_repeats) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a;
    pipe.InitBuffer(a, 1024);
    LocalTensor<float> t = a.Get<float>();
    Duplicate(t, 1.0f, 256);
    PipeBarrier<PIPE_V>();
    Adds(t[64], t, 1.0f, 64, 2, UnaryRepeatParams(1, 1, 8, 8));  // repeat 1 reads what repeat 0 writes
}

// ---------------------------------------------------------------- documented semantics

// y[0:64] = Cast(x[0:64] -> bfloat16, CAST_RINT) as float; y[64:128] the same to half;
// y[128:192] = float -> bfloat16 with CAST_TRUNC
KERNEL(cast_semantics) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    TBuf<TPosition::VECCALC> hb, bb;
    pipe.InitBuffer(in, 1, 256);
    pipe.InitBuffer(out, 1, 3 * 256);
    pipe.InitBuffer(hb, 128);
    pipe.InitBuffer(bb, 128);
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 64);
    in.EnQue(a);
    a = in.DeQue<float>();
    LocalTensor<bfloat16_t> b = bb.Get<bfloat16_t>();
    LocalTensor<half> h = hb.Get<half>();
    LocalTensor<float> o = out.AllocTensor<float>();
    Cast(b, a, RoundMode::CAST_RINT, 64);
    Cast(h, a, RoundMode::CAST_RINT, 64);
    PipeBarrier<PIPE_V>();
    Cast(o, b, RoundMode::CAST_NONE, 64);
    Cast(o[64], h, RoundMode::CAST_NONE, 64);
    PipeBarrier<PIPE_V>();
    Cast(b, a, RoundMode::CAST_TRUNC, 64);
    PipeBarrier<PIPE_V>();
    Cast(o[128], b, RoundMode::CAST_NONE, 64);
    in.FreeTensor(a);
    out.EnQue(o);
    o = out.DeQue<float>();
    DataCopy(gx(y), o, 192);
    out.FreeTensor(o);
}

// Level 0 with a broadcast operand: rows of 16 floats (2 blocks), 4 rows; Brcb puts w[r] in a
// block per row and Mul with src1 block stride 0 scales row r by x[64 + r]; only the first 12
// lanes of each row are enabled (mask 12), the rest of y stays 0.
KERNEL(broadcast_mul_semantics) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    TBuf<TPosition::VECCALC> wb;
    pipe.InitBuffer(in, 1, 128 * sizeof(float));
    pipe.InitBuffer(out, 1, 64 * sizeof(float));
    pipe.InitBuffer(wb, 64 * sizeof(float));
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 128);
    in.EnQue(a);
    a = in.DeQue<float>();
    LocalTensor<float> w = wb.Get<float>();
    Brcb(w, a[64], 1, BrcbRepeatParams(1, 8));
    LocalTensor<float> o = out.AllocTensor<float>();
    Duplicate(o, 0.0f, 64);
    PipeBarrier<PIPE_V>();
    Mul(o, a, w, 12, 4, BinaryRepeatParams(1, 1, 0, 2, 2, 1));
    in.FreeTensor(a);
    out.EnQue(o);
    o = out.DeQue<float>();
    DataCopy(gx(y), o, 64);
    out.FreeTensor(o);
}

// ReduceRepeat over 2 repeats of 64 floats: y[0:2] sums (binary tree), y[8:12] (max, index)
// pairs, y[16:18] min values only.
KERNEL(reduce_repeat_semantics) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    pipe.InitBuffer(in, 1, 128 * sizeof(float));
    pipe.InitBuffer(out, 1, 32 * sizeof(float));
    LocalTensor<float> a = in.AllocTensor<float>();
    DataCopy(a, gx(x), 128);
    in.EnQue(a);
    a = in.DeQue<float>();
    LocalTensor<float> o = out.AllocTensor<float>();
    Duplicate(o, 0.0f, 32);
    PipeBarrier<PIPE_V>();
    ReduceRepeat<ReduceType::SUM, float, float>(o, a, 64, 2, 1, 1, 8);
    ReduceRepeat<ReduceType::MAX, float, float>(o[8], a, 64, 2, 1, 1, 8);
    ReduceRepeat<ReduceType::MIN, float, float>(o[16], a, 64, 2, 1, 1, 8, ReduceOrder::ORDER_ONLY_VALUE);
    in.FreeTensor(a);
    out.EnQue(o);
    o = out.DeQue<float>();
    DataCopy(gx(y), o, 32);
    out.FreeTensor(o);
}

// y[b*8] = b for every block b: every block of the launch runs.
KERNEL(every_block_runs) {
    GlobalTensor<float> g = gx(y);
    g.SetValue(GetBlockIdx() * 8, float(GetBlockIdx()));
    if (GetBlockNum() < 1) emu::fail("test", "GetBlockNum");
}

// ---------------------------------------------------------------- runner (C ABI for ctypes)

typedef void (*KernelFn)(GM_ADDR, GM_ADDR);

static const std::map<std::string, KernelFn>& kernels() {
    static const std::map<std::string, KernelFn> k = {
#define K(N) {#N, N}
        K(good_kernel), K(ub_overflow), K(ub_rounding), K(ub_misaligned), K(ub_out_of_buffer), K(datacopy_unaligned),
        K(datacopypad_elements_not_bytes), K(datacopypad_to_veccalc), K(datacopypad_semantics), K(deque_without_enque),
        K(double_free), K(free_before_enque), K(alloc_beyond_buffers), K(enque_beyond_depth), K(vector_reads_before_deque),
        K(leaked_tensor), K(repeat_over_255), K(mask_over_lanes), K(compares_count_unaligned), K(cast_bf16_without_mode),
        K(missing_pipe_barrier), K(missing_flag_mte2_v), K(flag_mte2_v_ok), K(scalar_read_without_flag),
        K(set_flag_never_waited), K(wait_flag_never_set), K(blocks_write_same_bytes), K(block_reads_what_another_writes),
        K(gm_out_of_bounds), K(select_without_reserved_ub), K(cast_semantics), K(broadcast_mul_semantics),
        K(every_block_runs), K(reduce_repeat_semantics), K(gm_read_after_write_no_flag), K(gm_read_after_write_flag_ok),
        K(gm_overlapping_writes_no_barrier), K(gm_overlapping_writes_one_buffer_ok), K(vector_partial_overlap), K(level0_overlap_across_repeats),
#undef K
    };
    return k;
}

// Runs kernel `name` over `block_dim` blocks on x (nx floats, read-only) and y (ny floats).
// Returns 0 on success, 1 when an emulation rule broke (rule and message in rule/err), 2 for
// an unknown kernel or another exception.
extern "C" __attribute__((visibility("default"))) int emu_test_run(const char* name, int64_t block_dim, float* x,
                                                                   int64_t nx, float* y, int64_t ny, char* rule,
                                                                   int rule_len, char* err, int err_len) {
    auto put = [](char* dst, int len, const std::string& s) {
        std::snprintf(dst, size_t(len), "%s", s.c_str());
    };
    auto it = kernels().find(name);
    if (it == kernels().end()) {
        put(err, err_len, std::string("unknown test kernel ") + name);
        return 2;
    }
    try {
        std::vector<emu::Buffer> bufs = {{y, size_t(ny) * 4, "y", true}, {x, size_t(nx) * 4, "x", false}};
        KernelFn fn = it->second;
        emu::run_blocks(block_dim, bufs, [&] { fn(reinterpret_cast<GM_ADDR>(x), reinterpret_cast<GM_ADDR>(y)); });
    } catch (const emu::RuleError& e) {
        put(rule, rule_len, e.rule);
        put(err, err_len, e.what());
        return 1;
    } catch (const std::exception& e) {
        put(err, err_len, e.what());
        return 2;
    }
    return 0;
}

// The barrier/flag record of the last block of the last launch, one entry per line.
extern "C" __attribute__((visibility("default"))) int emu_test_log(char* out, int len) {
    std::string all;
    for (const auto& l : emu::core().log) all += l + "\n";
    std::snprintf(out, size_t(len), "%s", all.c_str());
    return int(emu::core().log.size());
}
