// cpattn AscendC CPU emulation: vector instructions (PIPE_V).
//
// Two forms, as documented: the count form ("first count elements", level 2) and the
// mask/repeat form (level 0): each repeat covers 256 bytes = 8 data blocks of 32 bytes; lane l
// of repeat r of an operand with block stride B and repeat stride R (both in 32-byte blocks)
// is element (r*R + (l / epb)*B)*epb + l % epb, epb = 32 / sizeof(T). A block stride of 0
// broadcasts one block. repeatTime must be <= 255 (the NPU's field is 8 bits: a larger value
// wraps silently there; here it is an error). Arithmetic on half/bfloat16_t is done in float
// and rounded to nearest even; Exp and Ln use the host libm (the NPU's differ by about an ulp).
#pragma once

#include <cfloat>
#include <unordered_map>

#include "emu_tensor.h"

namespace AscendC {

enum class RoundMode { CAST_NONE = 0, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD, CAST_HYBRID };
enum class CMPMODE : uint8_t { LT = 0, GT, EQ, LE, GE, NE };
enum class SELMODE : uint8_t { VSEL_CMPMASK_SPR = 0, VSEL_TENSOR_SCALAR_MODE, VSEL_TENSOR_TENSOR_MODE };

struct BinaryRepeatParams {
    BinaryRepeatParams() {}
    BinaryRepeatParams(uint8_t dstBlkStrideIn, uint8_t src0BlkStrideIn, uint8_t src1BlkStrideIn, uint8_t dstRepStrideIn,
                       uint8_t src0RepStrideIn, uint8_t src1RepStrideIn)
        : dstBlkStride(dstBlkStrideIn), src0BlkStride(src0BlkStrideIn), src1BlkStride(src1BlkStrideIn),
          dstRepStride(dstRepStrideIn), src0RepStride(src0RepStrideIn), src1RepStride(src1RepStrideIn) {}
    uint32_t blockNumber = 8;
    uint8_t dstBlkStride = 1, src0BlkStride = 1, src1BlkStride = 1;
    uint8_t dstRepStride = 8, src0RepStride = 8, src1RepStride = 8;
    bool repeatStrideMode = false, strideSizeMode = false;
};

struct UnaryRepeatParams {
    UnaryRepeatParams() {}
    UnaryRepeatParams(uint16_t dstBlkStrideIn, uint16_t srcBlkStrideIn, uint8_t dstRepStrideIn, uint8_t srcRepStrideIn)
        : dstBlkStride(dstBlkStrideIn), srcBlkStride(srcBlkStrideIn), dstRepStride(dstRepStrideIn),
          srcRepStride(srcRepStrideIn) {}
    uint32_t blockNumber = 8;
    uint16_t dstBlkStride = 1, srcBlkStride = 1;
    uint8_t dstRepStride = 8, srcRepStride = 8;
    bool repeatStrideMode = false, strideSizeMode = false, halfBlock = false;
};

struct BrcbRepeatParams {
    BrcbRepeatParams() {}
    BrcbRepeatParams(uint16_t dstBlkStrideIn, uint16_t dstRepStrideIn) : dstRepStride(dstRepStrideIn), dstBlkStride(dstBlkStrideIn) {}
    uint32_t blockNumber = 8;
    uint16_t dstRepStride = 8;
    uint16_t dstBlkStride = 1;
};

namespace detail {

// The 8-bit repeatTime field, range-checked (the NPU wraps silently).
struct RepeatTimes {
    int64_t v;
    RepeatTimes(int64_t x) : v(x) {}
};

template <typename T> struct Num { using C = float; static C get(T v) { return float(v); } static T put(C c) { return T(c); } };
template <> struct Num<int32_t> { using C = int64_t; static C get(int32_t v) { return v; } static int32_t put(C c) { return int32_t(c); } };
template <> struct Num<int16_t> { using C = int64_t; static C get(int16_t v) { return v; } static int16_t put(C c) { return int16_t(c); } };
template <> struct Num<uint16_t> { using C = int64_t; static C get(uint16_t v) { return v; } static uint16_t put(C c) { return uint16_t(c); } };
template <> struct Num<uint32_t> { using C = int64_t; static C get(uint32_t v) { return v; } static uint32_t put(C c) { return uint32_t(c); } };

template <typename T>
void v_operand(const LocalTensor<T>& t, uint64_t count, bool write, const char* api) {
    t.valid(api);
    emu::check_align(t.emu_ptr(), api, write ? "destination" : "source");
    if (count > t.GetSize())
        emu::fail(emu::rule::UB_BOUNDS, emu::cat(api, ": ", count, " elements beyond the tensor's ", t.GetSize()));
    int b = emu::buffer_of(t.emu_ptr(), count ? count * sizeof(T) : 1, api);
    emu::check_state(b, emu::P_V, write, api);
}

inline void check_count(int64_t count, const char* api) {
    if (count < 0) emu::fail(emu::rule::USAGE, emu::cat(api, ": negative count ", count));
}

// Lanes of one repeat enabled by a mask.
struct Lanes {
    std::vector<int> on;
};
template <typename T>
Lanes lanes_count(uint64_t mask, const char* api) {
    const uint64_t lanes = 256 / sizeof(T);
    if (mask < 1 || mask > lanes)
        emu::fail(emu::rule::MASK, emu::cat(api, ": continuous mask ", mask, " outside 1..", lanes, " for ", sizeof(T) * 8,
                                            "-bit elements"));
    Lanes l;
    for (uint64_t i = 0; i < mask; ++i) l.on.push_back(int(i));
    return l;
}
template <typename T>
Lanes lanes_bits(const uint64_t mask[], const char* api) {
    const int lanes = 256 / sizeof(T);
    Lanes l;
    for (int i = 0; i < lanes; ++i)
        if ((mask[i / 64] >> (i % 64)) & 1) l.on.push_back(i);
    if (lanes <= 64 && mask[1] != 0)
        emu::fail(emu::rule::MASK, emu::cat(api, ": mask[1] must be 0 for ", sizeof(T) * 8, "-bit elements"));
    if (l.on.empty()) emu::fail(emu::rule::MASK, emu::cat(api, ": bitwise mask selects no lane"));
    return l;
}

struct Stride {
    uint32_t blk, rep;
};

// Element indices of every enabled lane of every repeat, for one operand.
template <typename T>
std::vector<uint64_t> lane_index(const Lanes& l, int64_t repeat, Stride s) {
    const uint32_t epb = 32 / sizeof(T);
    std::vector<uint64_t> idx;
    idx.reserve(size_t(repeat) * l.on.size());
    for (int64_t r = 0; r < repeat; ++r)
        for (int lane : l.on) idx.push_back((uint64_t(r) * s.rep + uint64_t(lane / epb) * s.blk) * epb + lane % epb);
    return idx;
}

template <typename T>
std::vector<uint32_t> touched(const LocalTensor<T>& t, const std::vector<uint64_t>& idx, const char* api) {
    auto& c = emu::core();
    uint32_t base = c.off(t.emu_ptr());
    uint64_t mx = 0;
    for (uint64_t i : idx) mx = std::max(mx, i);
    std::vector<uint32_t> blocks;
    if (idx.empty()) return blocks;
    if (mx >= t.GetSize())
        emu::fail(emu::rule::UB_BOUNDS, emu::cat(api, ": repeat/stride pattern reaches element ", mx, " beyond the tensor's ",
                                                 t.GetSize()));
    emu::buffer_of(t.emu_ptr(), (mx + 1) * sizeof(T), api);
    const uint32_t lo = base / emu::BLOCK, hi = uint32_t((base + (mx + 1) * sizeof(T) - 1) / emu::BLOCK);
    std::vector<char> seen(hi - lo + 1, 0);
    for (uint64_t i : idx) seen[(base + i * sizeof(T)) / emu::BLOCK - lo] = 1;
    for (uint32_t b = lo; b <= hi; ++b)
        if (seen[b - lo]) blocks.push_back(b);
    return blocks;
}

inline void check_repeat(const RepeatTimes& r, const char* api) {
    if (r.v < 0 || r.v > 255)
        emu::fail(emu::rule::REPEAT, emu::cat(api, ": repeatTime ", r.v, " outside 0..255 (an 8-bit field on the NPU)"));
}

// Source and destination may be the same memory or disjoint, never partly overlapping.
inline void check_overlap(const char* api, const void* d, size_t dbytes, const void* s, size_t sbytes) {
    auto* a = static_cast<const uint8_t*>(d);
    auto* b = static_cast<const uint8_t*>(s);
    if (a < b + sbytes && b < a + dbytes && (a != b || dbytes != sbytes))
        emu::fail(emu::rule::OVERLAP, emu::cat(api, ": source and destination overlap partly (UB offsets ", emu::core().off(b),
                                               " and ", emu::core().off(a), "); only identical or disjoint operands are allowed"));
}

// dst[i] = f(src_k[i]...) over count elements
template <typename TD, typename TS, size_t K, typename F>
void count_op(const char* api, const LocalTensor<TD>& dst, std::array<const LocalTensor<TS>*, K> src, int64_t count, F f) {
    check_count(count, api);
    if (count == 0) return;
    for (auto* s : src) v_operand(*s, count, false, api);
    v_operand(dst, count, true, api);
    for (auto* s : src) check_overlap(api, dst.emu_ptr(), count * sizeof(TD), s->emu_ptr(), count * sizeof(TS));
    emu::issue(emu::P_V);
    for (auto* s : src) emu::ub_read(emu::P_V, s->emu_ptr(), count * sizeof(TS), api);
    emu::ub_write(emu::P_V, dst.emu_ptr(), count * sizeof(TD), api);
    std::vector<TD> out(count);
    std::array<TS, K> a;
    for (int64_t i = 0; i < count; ++i) {
        for (size_t k = 0; k < K; ++k) a[k] = src[k]->emu_ptr()[i];
        out[i] = f(a);
    }
    std::memcpy(dst.emu_ptr(), out.data(), count * sizeof(TD));
}

// level 0: K sources, each with its strides
template <typename T, size_t K, typename F>
void repeat_op(const char* api, const LocalTensor<T>& dst, Stride ds, std::array<const LocalTensor<T>*, K> src,
               std::array<Stride, K> ss, const Lanes& lanes, const RepeatTimes& rep, F f) {
    check_repeat(rep, api);
    if (rep.v == 0) return;
    dst.valid(api);
    emu::check_align(dst.emu_ptr(), api, "destination");
    auto di = lane_index<T>(lanes, rep.v, ds);
    std::array<std::vector<uint64_t>, K> si;
    std::vector<uint32_t> dblocks = touched(dst, di, api);
    std::array<std::vector<uint32_t>, K> sblocks;
    for (size_t k = 0; k < K; ++k) {
        src[k]->valid(api);
        emu::check_align(src[k]->emu_ptr(), api, "source");
        si[k] = lane_index<T>(lanes, rep.v, ss[k]);
        sblocks[k] = touched(*src[k], si[k], api);
        emu::check_state(emu::buffer_of(src[k]->emu_ptr(), 1, api), emu::P_V, false, api);
    }
    emu::check_state(emu::buffer_of(dst.emu_ptr(), 1, api), emu::P_V, true, api);
    // overlap, as documented for level 0: within a repeat a source lane and the destination lane
    // are the same address or disjoint; no repeat may read what an earlier repeat wrote
    const size_t per = lanes.on.size();
    for (size_t k = 0; k < K; ++k) {
        std::unordered_map<const T*, std::pair<int64_t, size_t>> last;  // address -> (latest repeat, lane)
        for (size_t j = 0; j < si[k].size(); ++j) {
            const T* a = src[k]->emu_ptr() + si[k][j];
            auto it = last.find(a);
            if (it == last.end() || int64_t(j / per) >= it->second.first) last[a] = {int64_t(j / per), j % per};
        }
        for (size_t j = 0; j < di.size(); ++j) {
            auto it = last.find(dst.emu_ptr() + di[j]);
            if (it == last.end()) continue;
            const int64_t r = int64_t(j / per);
            if (it->second.first > r || (it->second.first == r && it->second.second != j % per))
                emu::fail(emu::rule::OVERLAP, emu::cat(api, ": the destination of repeat ", r, " overlaps a source element read ",
                                                       it->second.first > r ? "by a later repeat" : "by another lane",
                                                       " (only 100% overlap within a repeat is allowed)"));
        }
    }
    emu::issue(emu::P_V);
    for (size_t k = 0; k < K; ++k) emu::ub_read_blocks(emu::P_V, sblocks[k], api);
    emu::ub_write_blocks(emu::P_V, dblocks, api);
    std::vector<T> out(di.size());
    std::array<T, K> a;
    for (size_t j = 0; j < di.size(); ++j) {
        for (size_t k = 0; k < K; ++k) a[k] = src[k]->emu_ptr()[si[k][j]];
        out[j] = f(a);
    }
    for (size_t j = 0; j < di.size(); ++j) dst.emu_ptr()[di[j]] = out[j];
}

template <typename T>
bool isnan_(typename Num<T>::C v) { return v != v; }

}  // namespace detail

// ---------------------------------------------------------------- binary ops

#define EMU_BINARY(NAME, EXPR)                                                                                          \
    template <typename T>                                                                                               \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, const int32_t& count) { \
        using N = detail::Num<T>;                                                                                       \
        detail::count_op<T, T, 2>(#NAME, dst, {&src0, &src1}, count, [](const std::array<T, 2>& v) {                    \
            typename N::C a = N::get(v[0]), b = N::get(v[1]);                                                           \
            return N::put(EXPR);                                                                                        \
        });                                                                                                             \
    }                                                                                                                   \
    template <typename T, bool isSetMask = true>                                                                        \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, uint64_t mask,        \
              detail::RepeatTimes repeatTime, const BinaryRepeatParams& p) {                                            \
        using N = detail::Num<T>;                                                                                       \
        detail::repeat_op<T, 2>(#NAME, dst, {p.dstBlkStride, p.dstRepStride}, {&src0, &src1},                          \
                                {detail::Stride{p.src0BlkStride, p.src0RepStride}, {p.src1BlkStride, p.src1RepStride}}, \
                                detail::lanes_count<T>(mask, #NAME), repeatTime, [](const std::array<T, 2>& v) {       \
                                    typename N::C a = N::get(v[0]), b = N::get(v[1]);                                   \
                                    return N::put(EXPR);                                                                \
                                });                                                                                     \
    }                                                                                                                   \
    template <typename T, bool isSetMask = true>                                                                        \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, const uint64_t mask[], \
              detail::RepeatTimes repeatTime, const BinaryRepeatParams& p) {                                            \
        using N = detail::Num<T>;                                                                                       \
        detail::repeat_op<T, 2>(#NAME, dst, {p.dstBlkStride, p.dstRepStride}, {&src0, &src1},                          \
                                {detail::Stride{p.src0BlkStride, p.src0RepStride}, {p.src1BlkStride, p.src1RepStride}}, \
                                detail::lanes_bits<T>(mask, #NAME), repeatTime, [](const std::array<T, 2>& v) {        \
                                    typename N::C a = N::get(v[0]), b = N::get(v[1]);                                   \
                                    return N::put(EXPR);                                                                \
                                });                                                                                     \
    }

// Max/Min: NaN in, NaN out (the NPU's NaN behaviour is not documented; do not rely on it).
EMU_BINARY(Add, a + b)
EMU_BINARY(Sub, a - b)
EMU_BINARY(Mul, a * b)
EMU_BINARY(Div, a / b)
EMU_BINARY(Max, (a != a || b != b) ? (a != a ? a : b) : (a > b ? a : b))
EMU_BINARY(Min, (a != a || b != b) ? (a != a ? a : b) : (a < b ? a : b))
#undef EMU_BINARY

// ---------------------------------------------------------------- unary and vector-scalar ops

#define EMU_UNARY(NAME, EXPR)                                                                                         \
    template <typename T>                                                                                             \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& count) {                          \
        using N = detail::Num<T>;                                                                                     \
        detail::count_op<T, T, 1>(#NAME, dst, {&src}, count, [](const std::array<T, 1>& v) {                          \
            typename N::C a = N::get(v[0]);                                                                           \
            return N::put(EXPR);                                                                                      \
        });                                                                                                           \
    }                                                                                                                 \
    template <typename T, bool isSetMask = true>                                                                      \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint64_t mask, detail::RepeatTimes repeatTime,   \
              const UnaryRepeatParams& p) {                                                                           \
        using N = detail::Num<T>;                                                                                     \
        detail::repeat_op<T, 1>(#NAME, dst, {p.dstBlkStride, p.dstRepStride}, {&src},                                \
                                {detail::Stride{p.srcBlkStride, p.srcRepStride}}, detail::lanes_count<T>(mask, #NAME), \
                                repeatTime, [](const std::array<T, 1>& v) {                                          \
                                    typename N::C a = N::get(v[0]);                                                   \
                                    return N::put(EXPR);                                                              \
                                });                                                                                   \
    }

EMU_UNARY(Exp, std::exp(a))
EMU_UNARY(Ln, std::log(a))
EMU_UNARY(Abs, std::fabs(a))
EMU_UNARY(Sqrt, std::sqrt(a))
EMU_UNARY(Reciprocal, 1.0f / a)
EMU_UNARY(Relu, a > 0 ? a : 0 * a)
#undef EMU_UNARY

#define EMU_SCALAR(NAME, EXPR)                                                                                        \
    template <typename T, typename U>                                                                                 \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const U& scalar, const int32_t& count) {         \
        using N = detail::Num<T>;                                                                                     \
        typename N::C b = N::get(T(scalar));                                                                          \
        detail::count_op<T, T, 1>(#NAME, dst, {&src}, count, [b](const std::array<T, 1>& v) {                         \
            typename N::C a = N::get(v[0]);                                                                           \
            return N::put(EXPR);                                                                                      \
        });                                                                                                           \
    }                                                                                                                 \
    template <typename T, typename U, bool isSetMask = true>                                                          \
    void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const U& scalar, uint64_t mask,                  \
              detail::RepeatTimes repeatTime, const UnaryRepeatParams& p) {                                           \
        using N = detail::Num<T>;                                                                                     \
        typename N::C b = N::get(T(scalar));                                                                          \
        detail::repeat_op<T, 1>(#NAME, dst, {p.dstBlkStride, p.dstRepStride}, {&src},                                \
                                {detail::Stride{p.srcBlkStride, p.srcRepStride}}, detail::lanes_count<T>(mask, #NAME), \
                                repeatTime, [b](const std::array<T, 1>& v) {                                         \
                                    typename N::C a = N::get(v[0]);                                                   \
                                    return N::put(EXPR);                                                              \
                                });                                                                                   \
    }

EMU_SCALAR(Adds, a + b)
EMU_SCALAR(Muls, a * b)
EMU_SCALAR(Maxs, (a != a || b != b) ? (a != a ? a : b) : (a > b ? a : b))
EMU_SCALAR(Mins, (a != a || b != b) ? (a != a ? a : b) : (a < b ? a : b))
#undef EMU_SCALAR

// ---------------------------------------------------------------- Duplicate

template <typename T>
void Duplicate(const LocalTensor<T>& dst, const T& scalar, const int32_t& count) {
    detail::count_op<T, T, 0>("Duplicate", dst, {}, count, [scalar](const std::array<T, 0>&) { return scalar; });
}
template <typename T, bool isSetMask = true>
void Duplicate(const LocalTensor<T>& dst, const T& scalar, uint64_t mask, detail::RepeatTimes repeatTime,
               uint16_t dstBlockStride, uint8_t dstRepeatStride) {
    detail::repeat_op<T, 0>("Duplicate", dst, {dstBlockStride, dstRepeatStride}, {}, {},
                            detail::lanes_count<T>(mask, "Duplicate"), repeatTime,
                            [scalar](const std::array<T, 0>&) { return scalar; });
}

// ---------------------------------------------------------------- Cast (count form)

namespace detail {
template <typename D, typename S> struct CastRule { static constexpr bool ok = false; };
inline const char* round_name(RoundMode m) {
    static const char* n[] = {"CAST_NONE", "CAST_RINT", "CAST_FLOOR", "CAST_CEIL", "CAST_ROUND", "CAST_TRUNC", "CAST_ODD", "CAST_HYBRID"};
    return n[int(m)];
}
// Supported (src, dst, mode) on Atlas A2, from the Cast documentation's table.
template <typename D, typename S>
bool cast_allowed(RoundMode m) {
    const bool none = m == RoundMode::CAST_NONE;
    const bool exact = std::is_same<D, S>::value;
    if (exact) return none;
    if (std::is_same<S, half>::value && std::is_same<D, float>::value) return none;
    if (std::is_same<S, bfloat16_t>::value && std::is_same<D, float>::value) return none;
    if (std::is_same<S, float>::value && std::is_same<D, half>::value) return m != RoundMode::CAST_HYBRID;
    if (std::is_same<S, float>::value && std::is_same<D, bfloat16_t>::value)
        return m != RoundMode::CAST_NONE && m != RoundMode::CAST_ODD && m != RoundMode::CAST_HYBRID;
    if (std::is_same<S, float>::value && std::is_same<D, int32_t>::value)
        return m != RoundMode::CAST_NONE && m != RoundMode::CAST_ODD && m != RoundMode::CAST_HYBRID;
    if (std::is_same<S, int32_t>::value && std::is_same<D, float>::value)
        return m != RoundMode::CAST_ODD && m != RoundMode::CAST_HYBRID;
    return false;
}
template <typename D, typename S>
D cast_one(S s, RoundMode m) {
    int mode = int(m);  // 0 none, 1 rint, 2 floor, 3 ceil, 4 round, 5 trunc, 6 odd
    if constexpr (std::is_same<D, half>::value) return half::from_bits(emu::round_to<half>(float(s), mode));
    else if constexpr (std::is_same<D, bfloat16_t>::value) return bfloat16_t::from_bits(emu::round_to<bfloat16_t>(float(s), mode));
    else if constexpr (std::is_same<D, int32_t>::value) {
        float f = float(s);
        double r = mode == 2 ? std::floor(f) : mode == 3 ? std::ceil(f) : mode == 4 ? std::round(f)
                 : mode == 5 ? std::trunc(f) : std::nearbyint(f);
        if (r != r) return 0;
        return int32_t(std::max(-2147483648.0, std::min(2147483647.0, r)));
    } else if constexpr (std::is_same<D, float>::value) return float(s);
    else return D(s);
}
}  // namespace detail

template <typename D, typename S>
void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, const RoundMode& round_mode, const uint32_t& count) {
    if (!detail::cast_allowed<D, S>(round_mode))
        emu::fail(emu::rule::CAST_MODE, emu::cat("Cast: ", detail::round_name(round_mode), " is not supported from ",
                                                 sizeof(S) * 8, "-bit to ", sizeof(D) * 8,
                                                 "-bit type here (float->bfloat16_t needs an explicit mode, e.g. CAST_RINT)"));
    RoundMode m = round_mode;
    detail::count_op<D, S, 1>("Cast", dst, {&src}, count, [m](const std::array<S, 1>& v) { return detail::cast_one<D, S>(v[0], m); });
}

// ---------------------------------------------------------------- Brcb

template <typename T>
void Brcb(const LocalTensor<T>& dst, const LocalTensor<T>& src, const uint8_t repeatTime, const BrcbRepeatParams& p) {
    const char* api = "Brcb";
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "Brcb: 16- or 32-bit types");
    if (repeatTime == 0) return;
    if (p.dstBlkStride == 0) emu::fail(emu::rule::USAGE, "Brcb: dstBlkStride 0 is undefined behaviour");
    const uint32_t epb = 32 / sizeof(T);
    detail::v_operand(src, uint64_t(repeatTime) * 8, false, api);
    dst.valid(api);
    emu::check_align(dst.emu_ptr(), api, "destination");
    std::vector<uint64_t> di;
    for (uint32_t r = 0; r < repeatTime; ++r)
        for (uint32_t j = 0; j < 8; ++j)
            for (uint32_t e = 0; e < epb; ++e) di.push_back((uint64_t(r) * p.dstRepStride + uint64_t(j) * p.dstBlkStride) * epb + e);
    auto dblocks = detail::touched(dst, di, api);
    emu::check_state(emu::buffer_of(dst.emu_ptr(), 1, api), emu::P_V, true, api);
    const uint8_t* s0 = reinterpret_cast<const uint8_t*>(src.emu_ptr());
    const uint8_t* s1 = s0 + repeatTime * 8 * sizeof(T);
    for (uint64_t i : di) {
        auto* q = reinterpret_cast<const uint8_t*>(dst.emu_ptr() + i);
        if (q < s1 && q + sizeof(T) > s0) emu::fail(emu::rule::USAGE, "Brcb: source and destination overlap (not supported)");
    }
    emu::issue(emu::P_V);
    emu::ub_read(emu::P_V, src.emu_ptr(), repeatTime * 8 * sizeof(T), api);
    emu::ub_write_blocks(emu::P_V, dblocks, api);
    std::vector<T> vals(src.emu_ptr(), src.emu_ptr() + repeatTime * 8);
    size_t k = 0;
    for (uint32_t r = 0; r < repeatTime; ++r)
        for (uint32_t j = 0; j < 8; ++j, ++k)
            for (uint32_t e = 0; e < epb; ++e) dst.emu_ptr()[(uint64_t(r) * p.dstRepStride + uint64_t(j) * p.dstBlkStride) * epb + e] = vals[k];
}

// ---------------------------------------------------------------- compare / select

namespace detail {
// Select (modes 1 and 2) keeps 8 KiB of UB for itself on Atlas A2/A3 (its documentation), so
// InitBuffer may hand out at most UB_SIZE - 8 KiB in a kernel that uses it.
inline void reserved_ub(const char* api) {
    auto& c = emu::core();
    if (c.used + emu::SELECT_RESERVED > emu::UB_SIZE)
        emu::fail(emu::rule::RESERVED_UB, emu::cat(api, " needs 8 KiB of reserved unified buffer on Atlas A2, but InitBuffer "
                                                        "handed out ", c.used, " of ", emu::UB_SIZE, " bytes"));
}
template <typename T>
bool cmp(T a, T b, CMPMODE m) {
    float x = float(a), y = float(b);  // NaN compares false except NE
    switch (m) {
        case CMPMODE::LT: return x < y;
        case CMPMODE::GT: return x > y;
        case CMPMODE::EQ: return x == y;
        case CMPMODE::LE: return x <= y;
        case CMPMODE::GE: return x >= y;
        default: return !(x == y);
    }
}
}  // namespace detail

// Bit i of dst (little-endian bytes) = src0[i] <cmp> scalar; count * sizeof(T) must be a
// multiple of 256 bytes (the NPU drops the rest silently).
template <typename T, typename U>
void Compares(const LocalTensor<U>& dst, const LocalTensor<T>& src0, const T src1Scalar, CMPMODE cmpMode, uint32_t count) {
    const char* api = "Compares";
    static_assert(sizeof(U) == 1, "Compares: dst is uint8_t");
    if ((uint64_t(count) * sizeof(T)) % 256)
        emu::fail(emu::rule::COUNT_ALIGN, emu::cat(api, ": count ", count, " elements = ", count * sizeof(T),
                                                   " bytes, not a multiple of 256 (the NPU ignores the tail)"));
    detail::v_operand(src0, count, false, api);
    detail::v_operand(dst, (count + 7) / 8, true, api);
    detail::check_overlap(api, dst.emu_ptr(), (count + 7) / 8, src0.emu_ptr(), count * sizeof(T));
    emu::issue(emu::P_V);
    emu::ub_read(emu::P_V, src0.emu_ptr(), count * sizeof(T), api);
    emu::ub_write(emu::P_V, dst.emu_ptr(), (count + 7) / 8, api);
    auto* d = reinterpret_cast<uint8_t*>(dst.emu_ptr());
    std::memset(d, 0, (count + 7) / 8);
    for (uint32_t i = 0; i < count; ++i)
        if (detail::cmp(src0.emu_ptr()[i], src1Scalar, cmpMode)) d[i / 8] |= uint8_t(1u << (i % 8));
}

// Mode 1: dst[i] = bit i of selMask ? src0[i] : scalar.
template <typename T, typename U>
void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0, T src1, SELMODE selMode,
            uint32_t count) {
    const char* api = "Select";
    if (selMode != SELMODE::VSEL_TENSOR_SCALAR_MODE)
        emu::fail(emu::rule::USAGE, "Select(tensor, scalar): selMode must be VSEL_TENSOR_SCALAR_MODE");
    detail::reserved_ub(api);
    uint32_t mbytes = (count + 7) / 8;
    detail::v_operand(selMask.template ReinterpretCast<uint8_t>(), mbytes, false, api);
    detail::v_operand(src0, count, false, api);
    detail::v_operand(dst, count, true, api);
    detail::check_overlap(api, dst.emu_ptr(), count * sizeof(T), src0.emu_ptr(), count * sizeof(T));
    detail::check_overlap(api, dst.emu_ptr(), count * sizeof(T), selMask.emu_ptr(), mbytes);
    emu::issue(emu::P_V);
    emu::ub_read(emu::P_V, selMask.emu_ptr(), mbytes, api);
    emu::ub_read(emu::P_V, src0.emu_ptr(), count * sizeof(T), api);
    emu::ub_write(emu::P_V, dst.emu_ptr(), count * sizeof(T), api);
    auto* m = reinterpret_cast<const uint8_t*>(selMask.emu_ptr());
    std::vector<T> out(count);
    for (uint32_t i = 0; i < count; ++i) out[i] = ((m[i / 8] >> (i % 8)) & 1) ? src0.emu_ptr()[i] : src1;
    std::memcpy(dst.emu_ptr(), out.data(), count * sizeof(T));
}

// Mode 2: dst[i] = bit i ? src0[i] : src1[i].
template <typename T, typename U>
void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0, const LocalTensor<T>& src1,
            SELMODE selMode, uint32_t count) {
    const char* api = "Select";
    if (selMode != SELMODE::VSEL_TENSOR_TENSOR_MODE)
        emu::fail(emu::rule::USAGE, "Select(tensor, tensor): only VSEL_TENSOR_TENSOR_MODE is emulated");
    detail::reserved_ub(api);
    uint32_t mbytes = (count + 7) / 8;
    detail::v_operand(selMask.template ReinterpretCast<uint8_t>(), mbytes, false, api);
    detail::v_operand(src0, count, false, api);
    detail::v_operand(src1, count, false, api);
    detail::v_operand(dst, count, true, api);
    emu::issue(emu::P_V);
    emu::ub_read(emu::P_V, selMask.emu_ptr(), mbytes, api);
    emu::ub_read(emu::P_V, src0.emu_ptr(), count * sizeof(T), api);
    emu::ub_read(emu::P_V, src1.emu_ptr(), count * sizeof(T), api);
    emu::ub_write(emu::P_V, dst.emu_ptr(), count * sizeof(T), api);
    auto* m = reinterpret_cast<const uint8_t*>(selMask.emu_ptr());
    std::vector<T> out(count);
    for (uint32_t i = 0; i < count; ++i) out[i] = ((m[i / 8] >> (i % 8)) & 1) ? src0.emu_ptr()[i] : src1.emu_ptr()[i];
    std::memcpy(dst.emu_ptr(), out.data(), count * sizeof(T));
}

// ---------------------------------------------------------------- reductions (count form)
// The order: per 256-byte repeat a pairwise tree over its lanes, then the same over the
// per-repeat results, until one value is left. The documentation fixes only that partial
// results are formed per repeat; the in-repeat order on the NPU is not documented.

namespace detail {
template <typename T, typename F>
typename Num<T>::C tree(std::vector<typename Num<T>::C> v, F f) {
    using C = typename Num<T>::C;
    const size_t lanes = 256 / sizeof(T);
    while (v.size() > 1) {
        std::vector<C> next;
        for (size_t r = 0; r < v.size(); r += lanes) {
            std::vector<C> w(v.begin() + r, v.begin() + std::min(v.size(), r + lanes));
            while (w.size() > 1) {
                std::vector<C> h;
                for (size_t i = 0; i + 1 < w.size(); i += 2) h.push_back(Num<T>::get(Num<T>::put(f(w[i], w[i + 1]))));
                if (w.size() % 2) h.push_back(w.back());
                w.swap(h);
            }
            next.push_back(w[0]);
        }
        v.swap(next);
    }
    return v[0];
}
template <typename T, typename F>
void reduce(const char* api, const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work, int32_t count,
            F f, bool index, bool is_max) {
    check_count(count, api);
    if (count == 0) emu::fail(emu::rule::USAGE, emu::cat(api, ": count 0"));
    v_operand(src, count, false, api);
    v_operand(dst, index ? 2 : 1, true, api);
    // sharedTmpBuffer size, as documented: the first round's (value, index) pairs rounded up to
    // 32 bytes; with the index kept, each further round's output is added.
    const uint64_t per_rep = 256 / sizeof(T), per_blk = 32 / sizeof(T);
    auto up = [](uint64_t a, uint64_t b) { return (a + b - 1) / b * b; };
    uint64_t out1 = (uint64_t(count) + per_rep - 1) / per_rep * 2, need = up(out1, per_blk);
    if (index && out1 > 2) {
        uint64_t out2 = (out1 + per_rep - 1) / per_rep * 2;
        need = up(out1, per_blk) + up(out2, per_blk);
        if (out2 > 2) need += up((out2 + per_rep - 1) / per_rep * 2, per_blk);
    }
    if (work.GetSize() < need)
        emu::fail(emu::rule::UB_BOUNDS, emu::cat(api, ": sharedTmpBuffer holds ", work.GetSize(), " elements, ", need,
                                                 " needed for count ", count));
    v_operand(work, need, true, api);
    emu::issue(emu::P_V);
    emu::ub_read(emu::P_V, src.emu_ptr(), count * sizeof(T), api);
    emu::ub_write(emu::P_V, work.emu_ptr(), need * sizeof(T), api);
    emu::ub_write(emu::P_V, dst.emu_ptr(), (index ? 2 : 1) * sizeof(T), api);
    std::vector<typename Num<T>::C> v(count);
    for (int32_t i = 0; i < count; ++i) v[i] = Num<T>::get(src.emu_ptr()[i]);
    auto r = tree<T>(v, f);
    dst.emu_ptr()[0] = Num<T>::put(r);
    if (index) {
        uint32_t at = 0;
        for (int32_t i = 0; i < count; ++i)
            if (v[i] == r) { at = uint32_t(i); break; }
        (void)is_max;
        std::memcpy(dst.emu_ptr() + 1, &at, std::min(sizeof(T), sizeof(at)));
    }
}
}  // namespace detail

template <typename T>
void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& sharedTmpBuffer, const int32_t count) {
    using C = typename detail::Num<T>::C;
    detail::reduce("ReduceSum", dst, src, sharedTmpBuffer, count, [](C a, C b) { return a + b; }, false, false);
}
template <typename T>
void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& sharedTmpBuffer, const int32_t count,
               bool calIndex = 0) {
    using C = typename detail::Num<T>::C;
    detail::reduce("ReduceMax", dst, src, sharedTmpBuffer, count, [](C a, C b) { return (a != a) ? a : (b != b) ? b : (a > b ? a : b); },
                   calIndex, true);
}
template <typename T>
void ReduceMin(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& sharedTmpBuffer, const int32_t count,
               bool calIndex = 0) {
    using C = typename detail::Num<T>::C;
    detail::reduce("ReduceMin", dst, src, sharedTmpBuffer, count, [](C a, C b) { return (a != a) ? a : (b != b) ? b : (a < b ? a : b); },
                   calIndex, false);
}

// ---------------------------------------------------------------- ReduceRepeat (9.1's name for WholeReduce*)
// One result per repeat: SUM by the documented binary tree over adjacent lanes; MAX/MIN with the
// in-repeat index of the first extreme lane, stored as `order` says. dst needs only element
// alignment; dstRepStride counts results (value, index or the pair).

enum class ReduceType { NONE = -1, SUM = 0, MAX, MIN };
enum class ReduceOrder : uint8_t { ORDER_VALUE_INDEX = 0, ORDER_INDEX_VALUE, ORDER_ONLY_VALUE, ORDER_ONLY_INDEX };

template <ReduceType reduceType, typename T, typename U, bool isSetMask = true>
void ReduceRepeat(const LocalTensor<T>& dst, const LocalTensor<U>& src, const int32_t mask, const int32_t repeatTime,
                  const int32_t dstRepStride, const int32_t srcBlkStride, const int32_t srcRepStride,
                  ReduceOrder order = ReduceOrder::ORDER_VALUE_INDEX) {
    const char* api = "ReduceRepeat";
    static_assert(sizeof(T) == sizeof(U), "ReduceRepeat: dst and src of one width");
    using N = detail::Num<U>;
    using C = typename N::C;
    detail::check_repeat(detail::RepeatTimes(repeatTime), api);
    if (mask == 0 || repeatTime == 0) return;  // a NOP on Atlas A2/A3
    if (dstRepStride < 0 || srcBlkStride < 0 || srcRepStride < 0 || dstRepStride > 65535 || srcBlkStride > 65535 ||
        srcRepStride > 65535)
        emu::fail(emu::rule::USAGE, "ReduceRepeat: strides outside 0..65535");
    detail::Lanes lanes = detail::lanes_count<U>(uint64_t(mask), api);
    src.valid(api);
    dst.valid(api);
    emu::check_align(src.emu_ptr(), api, "source");
    const bool pair = reduceType != ReduceType::SUM && (order == ReduceOrder::ORDER_VALUE_INDEX || order == ReduceOrder::ORDER_INDEX_VALUE);
    const uint32_t unit = pair ? 2 : 1;  // elements of T per result
    if (emu::core().off(dst.emu_ptr()) % (unit * sizeof(T)))
        emu::fail(emu::rule::UB_ALIGN, emu::cat(api, ": destination not aligned to its ", unit * sizeof(T), "-byte results"));
    auto si = detail::lane_index<U>(lanes, repeatTime, detail::Stride{uint32_t(srcBlkStride), uint32_t(srcRepStride)});
    auto sblocks = detail::touched(src, si, api);
    const uint64_t dlast = uint64_t(repeatTime - 1) * dstRepStride * unit + unit;
    if (dlast > dst.GetSize()) emu::fail(emu::rule::UB_BOUNDS, emu::cat(api, ": results reach beyond the destination"));
    int db = emu::buffer_of(dst.emu_ptr(), dlast * sizeof(T), api);
    emu::check_state(emu::buffer_of(src.emu_ptr(), 1, api), emu::P_V, false, api);
    emu::check_state(db, emu::P_V, true, api);
    emu::issue(emu::P_V);
    emu::ub_read_blocks(emu::P_V, sblocks, api);
    std::vector<T> res(size_t(repeatTime) * unit);
    const size_t per = lanes.on.size();
    for (int32_t r = 0; r < repeatTime; ++r) {
        std::vector<C> v(per);
        for (size_t j = 0; j < per; ++j) v[j] = N::get(src.emu_ptr()[si[r * per + j]]);
        C val;
        uint32_t at = 0;
        if (reduceType == ReduceType::SUM) {
            while (v.size() > 1) {  // adjacent pairs, level by level
                std::vector<C> h;
                for (size_t i = 0; i + 1 < v.size(); i += 2) h.push_back(N::get(N::put(v[i] + v[i + 1])));
                if (v.size() % 2) h.push_back(v.back());
                v.swap(h);
            }
            val = v[0];
        } else {
            val = v[0];
            for (size_t j = 1; j < per; ++j) {
                bool better = reduceType == ReduceType::MAX ? v[j] > val : v[j] < val;
                if (v[j] != v[j] && val == val) better = true;  // NaN wins (undocumented on the NPU)
                if (better) { val = v[j]; at = uint32_t(lanes.on[j]); }
            }
            if (at == 0) at = uint32_t(lanes.on[0]);
        }
        T value = T(N::put(val)), index;
        std::memset(&index, 0, sizeof(T));
        std::memcpy(&index, &at, std::min(sizeof(T), sizeof(at)));
        T* out = &res[size_t(r) * unit];
        switch (pair ? order : (reduceType == ReduceType::SUM ? ReduceOrder::ORDER_ONLY_VALUE : order)) {
            case ReduceOrder::ORDER_VALUE_INDEX: out[0] = value; out[1] = index; break;
            case ReduceOrder::ORDER_INDEX_VALUE: out[0] = index; out[1] = value; break;
            case ReduceOrder::ORDER_ONLY_INDEX: out[0] = index; break;
            default: out[0] = value;
        }
    }
    for (int32_t r = 0; r < repeatTime; ++r) {
        T* d = dst.emu_ptr() + uint64_t(r) * dstRepStride * unit;
        emu::ub_write(emu::P_V, d, unit * sizeof(T), api);
        std::memcpy(d, &res[size_t(r) * unit], unit * sizeof(T));
    }
}

}  // namespace AscendC
