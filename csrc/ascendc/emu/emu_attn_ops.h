// cpattn AscendC CPU emulation: the vector instruction the attention kernels (paged_decode,
// varlen_prefill) need beyond the merge kernel's set: Axpy (count form).
//
// Clean-room code written from the public AscendC documentation (CANN 9.1); no Huawei header text.
// Same strictness as emu_vec.h: operands 32-byte aligned, every UB block read or written declared
// to the race checker on PIPE_V.
#pragma once

#include "emu_vec.h"

namespace AscendC {

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

}  // namespace AscendC
