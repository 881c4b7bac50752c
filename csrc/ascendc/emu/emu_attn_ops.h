// cpattn AscendC CPU emulation: the vector instructions the attention kernels (paged_decode,
// varlen_prefill) need beyond the merge kernel's set: Axpy (count form) and ReduceRepeat (level 0).
//
// Clean-room code written from the public AscendC documentation (CANN 9.1); no Huawei header text.
// Same strictness as emu_vec.h: operands 32-byte aligned, repeatTime <= 255, continuous masks in
// 1..lanes, every UB block read or written declared to the race checker on PIPE_V.
#pragma once

#include "emu_vec.h"

namespace AscendC {

enum class ReduceType { NONE = -1, SUM = 0, MAX, MIN };
enum class ReduceOrder : uint8_t { ORDER_VALUE_INDEX = 0, ORDER_INDEX_VALUE, ORDER_ONLY_VALUE, ORDER_ONLY_INDEX };

// ---- Axpy, count form: dst[i] = src[i] * scalar + dst[i]. Only T == U (half or float) is
// emulated (the mixed half -> float form is not used). The product and the sum are each rounded
// to T (not fused).
template <typename T, typename U>
void Axpy(const LocalTensor<T>& dst, const LocalTensor<U>& src, const U& scalarValue, const int32_t& count) {
    static_assert(std::is_same<T, U>::value, "Axpy: only dst and src of one type are emulated");
    static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value, "Axpy: half or float");
    using N = detail::Num<T>;
    const typename N::C s = N::get(T(scalarValue));
    detail::count_op<T, T, 2>("Axpy", dst, {&src, &dst}, count, [s](const std::array<T, 2>& v) {
        const T prod = N::put(N::get(v[0]) * s);
        return N::put(N::get(prod) + N::get(v[1]));
    });
}

// ---- ReduceRepeat (level 0, continuous mask): for each repeat r, reduce the `mask` enabled
// lanes of src (lane l at element (r * srcRepStride + (l / epb) * srcBlkStride) * epb + l % epb,
// epb = 32 / sizeof(T)) and write the result to dst at r * dstRepStride units:
//   SUM: one element per unit (the sum: a pairwise tree over the lanes, as in ReduceSum);
//   MAX/MIN: ORDER_VALUE_INDEX / ORDER_INDEX_VALUE write [value, index] pairs (unit: 2 elements,
//   the index as uint32_t bits in the T slot, the first lane holding the extreme), ORDER_ONLY_VALUE
//   writes the value alone (unit: 1 element). ORDER_ONLY_INDEX is not emulated.
// NaN in a MAX/MIN repeat gives NaN (the NPU's NaN behaviour is not documented: do not rely on it).
template <ReduceType reduceType, typename T, typename U, bool isSetMask = true>
void ReduceRepeat(const LocalTensor<T>& dst, const LocalTensor<U>& src, const int32_t mask, const int32_t repeatTime,
                  const int32_t dstRepStride, const int32_t srcBlkStride, const int32_t srcRepStride,
                  ReduceOrder order = ReduceOrder::ORDER_VALUE_INDEX) {
    const char* api = "ReduceRepeat";
    static_assert(std::is_same<T, U>::value, "ReduceRepeat: dst and src types must match on Atlas A2");
    static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value, "ReduceRepeat: half or float on Atlas A2");
    static_assert(reduceType != ReduceType::NONE, "ReduceRepeat: reduceType NONE");
    using C = typename detail::Num<T>::C;
    detail::check_repeat(detail::RepeatTimes(repeatTime), api);
    if (repeatTime == 0) return;  // a NOP on Atlas A2
    if (dstRepStride < 0 || dstRepStride > 65535 || srcBlkStride < 0 || srcBlkStride > 65535 || srcRepStride < 0 ||
        srcRepStride > 65535)
        emu::fail(emu::rule::USAGE, emu::cat(api, ": strides must lie in 0..65535"));
    const bool sum = reduceType == ReduceType::SUM;
    if (!sum && order == ReduceOrder::ORDER_ONLY_INDEX)
        emu::fail(emu::rule::USAGE, emu::cat(api, ": ORDER_ONLY_INDEX is not emulated"));
    const bool pair = !sum && order != ReduceOrder::ORDER_ONLY_VALUE;
    const detail::Lanes lanes = detail::lanes_count<T>(uint64_t(mask), api);
    auto si = detail::lane_index<T>(lanes, repeatTime, detail::Stride{uint32_t(srcBlkStride), uint32_t(srcRepStride)});
    src.valid(api);
    dst.valid(api);
    emu::check_align(src.emu_ptr(), api, "source");
    // destination: SUM/ONLY_VALUE elements need element alignment, pairs 2-element alignment
    const uint32_t doff = emu::core().off(dst.emu_ptr());
    if (doff % (pair ? 2 * sizeof(T) : sizeof(T)))
        emu::fail(emu::rule::UB_ALIGN, emu::cat(api, ": destination at UB offset ", doff, " not aligned to ",
                                                pair ? 2 * sizeof(T) : sizeof(T), " bytes"));
    std::vector<uint64_t> di;
    const uint32_t unit = pair ? 2 : 1;
    for (int32_t r = 0; r < repeatTime; ++r)
        for (uint32_t k = 0; k < unit; ++k) di.push_back(uint64_t(r) * dstRepStride * unit + k);
    auto sblocks = detail::touched(src, si, api);
    auto dblocks = detail::touched(dst, di, api);
    emu::check_state(emu::buffer_of(src.emu_ptr(), 1, api), emu::P_V, false, api);
    emu::check_state(emu::buffer_of(dst.emu_ptr(), 1, api), emu::P_V, true, api);
    emu::issue(emu::P_V);
    emu::ub_read_blocks(emu::P_V, sblocks, api);
    emu::ub_write_blocks(emu::P_V, dblocks, api);
    const size_t per = lanes.on.size();
    std::vector<T> out(di.size());
    for (int32_t r = 0; r < repeatTime; ++r) {
        std::vector<C> v(per);
        for (size_t l = 0; l < per; ++l) v[l] = detail::Num<T>::get(src.emu_ptr()[si[size_t(r) * per + l]]);
        if (sum) {
            out[r] = detail::Num<T>::put(detail::tree<T>(v, [](C a, C b) { return a + b; }));
            continue;
        }
        const bool mx = reduceType == ReduceType::MAX;
        uint32_t at = 0;
        C best = v[0];
        for (size_t l = 1; l < per; ++l) {
            if (best != best) break;
            if (v[l] != v[l] || (mx ? v[l] > best : v[l] < best)) { best = v[l]; at = uint32_t(l); }
        }
        T val = detail::Num<T>::put(best), idx;
        std::memset(&idx, 0, sizeof(T));
        std::memcpy(&idx, &at, std::min(sizeof(T), sizeof(at)));
        if (!pair) out[r] = val;
        else if (order == ReduceOrder::ORDER_VALUE_INDEX) { out[2 * r] = val; out[2 * r + 1] = idx; }
        else { out[2 * r] = idx; out[2 * r + 1] = val; }
    }
    for (size_t j = 0; j < di.size(); ++j) dst.emu_ptr()[di[j]] = out[j];
}

}  // namespace AscendC
