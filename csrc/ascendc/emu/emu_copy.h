// cpattn AscendC CPU emulation: DataCopy and DataCopyPad between global memory and the UB.
#pragma once

#include "emu_tensor.h"

namespace AscendC {

struct DataCopyParams {
    DataCopyParams() {}
    DataCopyParams(uint16_t count, uint16_t len, uint16_t srcStrideIn, uint16_t dstStrideIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn) {}
    uint16_t blockCount = 1;
    uint16_t blockLen = 0;   // in 32-byte blocks
    uint16_t srcStride = 0;  // gap in 32-byte blocks
    uint16_t dstStride = 0;  // gap in 32-byte blocks
};

struct DataCopyExtParams {
    DataCopyExtParams() {}
    DataCopyExtParams(uint16_t count, uint32_t len, uint32_t srcStrideIn, uint32_t dstStrideIn, uint32_t rsvIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn) {}
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;   // bytes
    uint32_t srcStride = 0;  // gap: bytes on the GM side, 32-byte blocks on the UB side
    uint32_t dstStride = 0;  // gap: 32-byte blocks on the UB side, bytes on the GM side
    uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
    DataCopyPadExtParams() {}
    DataCopyPadExtParams(bool isPadValue, uint8_t leftPadValue, uint8_t rightPadValue, T padValue)
        : isPad(isPadValue), leftPadding(leftPadValue), rightPadding(rightPadValue), paddingValue(padValue) {}
    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    T paddingValue = T(0);
};

namespace detail {
template <typename T>
void local_operand(const LocalTensor<T>& t, size_t bytes, int pipe, bool write, const char* api) {
    t.valid(api);
    emu::check_align(t.emu_ptr(), api, "local operand");
    int b = emu::buffer_of(t.emu_ptr(), bytes ? bytes : 1, api);
    emu::check_state(b, pipe, write, api);
}
inline void check_pos(int buf, const char* api) {
    int pos = emu::core().bufs[buf].pos;
    if (pos != int(TPosition::VECIN) && pos != int(TPosition::VECOUT))
        emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": the local tensor must be VECIN or VECOUT on Atlas A2 (GM <-> VECCALC "
                                                     "is only on Ascend 950)"));
}

// The count form's checks (both directions): the byte count of `count` elements, a multiple of
// 32, within the local tensor of `localSize` elements.
inline size_t count_copy_bytes(const char* api, uint32_t count, size_t elemSize, size_t localSize) {
    const size_t bytes = size_t(count) * elemSize;
    if (bytes % emu::BLOCK)
        emu::fail(emu::rule::COPY_ALIGN, emu::cat(api, ": ", count, " elements = ", bytes,
                                                  " bytes, not a multiple of 32 (the NPU silently copies only ",
                                                  bytes / 32 * 32, "); use DataCopyPad"));
    if (count > localSize) emu::fail(emu::rule::UB_BOUNDS, emu::cat(api, ": ", count, " elements beyond the local tensor"));
    return bytes;
}
}  // namespace detail

// ---- DataCopy, count form: count * sizeof(T) must be a multiple of 32 bytes (the NPU rounds
// other lengths down silently; the emulation refuses them).
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
    const char* api = "DataCopy(GM->UB)";
    const size_t bytes = detail::count_copy_bytes(api, count, sizeof(T), dst.GetSize());
    detail::local_operand(dst, bytes, emu::P_MTE2, true, api);
    src.span(0, count, api);
    emu::issue(emu::P_MTE2);
    emu::gm_access(src.emu_ptr(), bytes, false, api, emu::P_MTE2);
    emu::ub_write(emu::P_MTE2, dst.emu_ptr(), bytes, api);
    std::memmove(dst.emu_ptr(), src.emu_ptr(), bytes);
}

template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    const char* api = "DataCopy(UB->GM)";
    const size_t bytes = detail::count_copy_bytes(api, count, sizeof(T), src.GetSize());
    detail::local_operand(src, bytes, emu::P_MTE3, false, api);
    dst.span(0, count, api);
    emu::issue(emu::P_MTE3);
    emu::gm_access(dst.emu_ptr(), bytes, true, api, emu::P_MTE3);
    emu::ub_read(emu::P_MTE3, src.emu_ptr(), bytes, api);
    std::memmove(dst.emu_ptr(), src.emu_ptr(), bytes);
}

// ---- DataCopy with DataCopyParams: lengths and gaps in 32-byte blocks on both sides.
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyParams& p) {
    const char* api = "DataCopy(GM->UB, DataCopyParams)";
    detail::local_operand(dst, 1, emu::P_MTE2, true, api);
    emu::issue(emu::P_MTE2);
    size_t len = size_t(p.blockLen) * 32;
    auto* s = reinterpret_cast<const uint8_t*>(src.emu_ptr());
    auto* d = reinterpret_cast<uint8_t*>(dst.emu_ptr());
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        const uint8_t* si = s + i * (len + size_t(p.srcStride) * 32);
        uint8_t* di = d + i * (len + size_t(p.dstStride) * 32);
        src.span((si - s) / sizeof(T), len / sizeof(T), api);
        emu::gm_access(si, len, false, api, emu::P_MTE2);
        emu::buffer_of(di, len ? len : 1, api);
        emu::ub_write(emu::P_MTE2, di, len, api);
        std::memmove(di, si, len);
    }
}

template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyParams& p) {
    const char* api = "DataCopy(UB->GM, DataCopyParams)";
    detail::local_operand(src, 1, emu::P_MTE3, false, api);
    emu::issue(emu::P_MTE3);
    size_t len = size_t(p.blockLen) * 32;
    auto* s = reinterpret_cast<const uint8_t*>(src.emu_ptr());
    auto* d = reinterpret_cast<uint8_t*>(dst.emu_ptr());
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        const uint8_t* si = s + i * (len + size_t(p.srcStride) * 32);
        uint8_t* di = d + i * (len + size_t(p.dstStride) * 32);
        emu::buffer_of(si, len ? len : 1, api);
        emu::ub_read(emu::P_MTE3, si, len, api);
        dst.span((di - d) / sizeof(T), len / sizeof(T), api);
        emu::gm_access(di, len, true, api, emu::P_MTE3);
        std::memmove(di, si, len);
    }
}

// ---- DataCopyPad GM -> UB. GM side: blockLen and srcStride in bytes. UB side: each block
// starts 32-byte aligned and occupies roundup(left + blockLen + right, 32) bytes, then a gap of
// dstStride 32-byte blocks. Padding: leftPadding/rightPadding elements of paddingValue (isPad)
// or of undefined data (!isPad: the emulation writes NaN-pattern bytes); the dummy bytes up to
// the 32-byte boundary repeat the block's first element when no padding is asked for, as the
// documentation describes, else they are padding too.
template <typename T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                 const DataCopyPadExtParams<T>& pad) {
    const char* api = "DataCopyPad(GM->UB)";
    dst.valid(api);
    if (p.blockCount > 4095) emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": blockCount ", p.blockCount, " > 4095"));
    if (p.blockLen > 2097151) emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": blockLen ", p.blockLen, " > 2097151"));
    if (p.blockLen % sizeof(T))
        emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": blockLen ", p.blockLen, " bytes is not a multiple of sizeof(T) = ",
                                                sizeof(T), " (blockLen counts bytes, not elements)"));
    if (pad.leftPadding * sizeof(T) > 32 || pad.rightPadding * sizeof(T) > 32)
        emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": leftPadding/rightPadding (", int(pad.leftPadding), "/",
                                                int(pad.rightPadding), " elements) exceed 32 bytes"));
    if (p.blockCount == 0 || p.blockLen == 0) return;  // a NOP on Atlas A2
    int b = emu::buffer_of(dst.emu_ptr(), 1, api);
    detail::check_pos(b, api);
    detail::local_operand(dst, 1, emu::P_MTE2, true, api);
    emu::issue(emu::P_MTE2);
    const size_t L = pad.leftPadding * sizeof(T), R = pad.rightPadding * sizeof(T);
    const size_t used = L + p.blockLen + R, span = (used + 31) / 32 * 32;
    auto* s = reinterpret_cast<const uint8_t*>(src.emu_ptr());
    auto* d = reinterpret_cast<uint8_t*>(dst.emu_ptr());
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        const uint8_t* si = s + size_t(i) * (p.blockLen + size_t(p.srcStride));
        uint8_t* di = d + size_t(i) * (span + size_t(p.dstStride) * 32);
        src.span((si - s) / sizeof(T), p.blockLen / sizeof(T), api);
        emu::gm_access(si, p.blockLen, false, api, emu::P_MTE2);
        emu::buffer_of(di, span, api);
        emu::ub_write(emu::P_MTE2, di, span, api);
        std::memmove(di + L, si, p.blockLen);
        T fill;
        bool poison = false;
        if (pad.leftPadding == 0 && pad.rightPadding == 0) std::memcpy(&fill, si, sizeof(T));
        else if (pad.isPad) fill = pad.paddingValue;
        else poison = true;
        for (size_t o = 0; o < span; o += sizeof(T)) {
            if (o >= L && o < L + p.blockLen) continue;
            if (poison) std::memset(di + o, 0xFF, sizeof(T));
            else std::memcpy(di + o, &fill, sizeof(T));
        }
    }
}

// ---- DataCopyPad UB -> GM: UB blocks start 32-byte aligned (srcStride: gap in 32-byte
// blocks after the rounded-up block), GM blocks are blockLen bytes apart plus dstStride bytes.
template <typename T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    const char* api = "DataCopyPad(UB->GM)";
    src.valid(api);
    if (p.blockCount > 4095) emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": blockCount ", p.blockCount, " > 4095"));
    if (p.blockLen > 2097151) emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": blockLen ", p.blockLen, " > 2097151"));
    if (p.blockLen % sizeof(T))
        emu::fail(emu::rule::COPY_PAD, emu::cat(api, ": blockLen ", p.blockLen, " bytes is not a multiple of sizeof(T) = ",
                                                sizeof(T), " (blockLen counts bytes, not elements)"));
    if (p.blockCount == 0 || p.blockLen == 0) return;
    int b = emu::buffer_of(src.emu_ptr(), 1, api);
    detail::check_pos(b, api);
    detail::local_operand(src, 1, emu::P_MTE3, false, api);
    emu::issue(emu::P_MTE3);
    const size_t span = (size_t(p.blockLen) + 31) / 32 * 32;
    auto* s = reinterpret_cast<const uint8_t*>(src.emu_ptr());
    auto* d = reinterpret_cast<uint8_t*>(dst.emu_ptr());
    for (uint32_t i = 0; i < p.blockCount; ++i) {
        const uint8_t* si = s + size_t(i) * (span + size_t(p.srcStride) * 32);
        uint8_t* di = d + size_t(i) * (p.blockLen + size_t(p.dstStride));
        emu::buffer_of(si, p.blockLen, api);
        emu::ub_read(emu::P_MTE3, si, p.blockLen, api);
        dst.span((di - d) / sizeof(T), p.blockLen / sizeof(T), api);
        emu::gm_access(di, p.blockLen, true, api, emu::P_MTE3);
        std::memmove(di, si, p.blockLen);
    }
}

}  // namespace AscendC
