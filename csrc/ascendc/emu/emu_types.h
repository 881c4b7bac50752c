// cpattn AscendC CPU emulation: the 16-bit float types (half, bfloat16_t) on the host, and
// rounding of float to them in every RoundMode the vector Cast documents.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu {

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Round-to-nearest-even conversions (the hardware's default where precision is lost).
inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays (quiet) NaN
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return uint16_t(u >> 16);
}
inline float bf16_to_f32(uint16_t h) { return u2f(uint32_t(h) << 16); }

inline float f16_to_f32(uint16_t h) {
    uint32_t s = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return u2f(s | 0x7f800000u | (m << 13));
    if (e == 0) {
        if (!m) return u2f(s);
        float v = std::ldexp(float(m), -24);
        return s ? -v : v;
    }
    return u2f(s | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_f16_rne(float f) {
    uint32_t u = f2u(f);
    uint16_t s = uint16_t((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return uint16_t(s | 0x7e00);  // NaN
    if (a >= 0x477ff000u) return uint16_t(s | 0x7c00);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        float v = u2f(a) * 16777216.0f;  // scale by 2^24: units of the smallest subnormal
        float r = std::nearbyint(v);     // round-to-nearest-even (default FP environment)
        return uint16_t(s | uint16_t(r));
    }
    uint32_t e = (a >> 23) - 112, m = a & 0x7fffff;
    uint32_t h = (e << 10) | (m >> 13);
    uint32_t rest = m & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return uint16_t(s | h);
}

}  // namespace emu

// The AscendC 16-bit types (global names, as the kernels spell them).
struct half {
    uint16_t bits = 0;
    half() = default;
    half(float f) : bits(emu::f32_to_f16_rne(f)) {}
    half(double f) : half(float(f)) {}
    half(int v) : half(float(v)) {}
    operator float() const { return emu::f16_to_f32(bits); }
    static half from_bits(uint16_t b) { half h; h.bits = b; return h; }
};

struct bfloat16_t {
    uint16_t bits = 0;
    bfloat16_t() = default;
    bfloat16_t(float f) : bits(emu::f32_to_bf16_rne(f)) {}
    bfloat16_t(double f) : bfloat16_t(float(f)) {}
    bfloat16_t(int v) : bfloat16_t(float(v)) {}
    operator float() const { return emu::bf16_to_f32(bits); }
    static bfloat16_t from_bits(uint16_t b) { bfloat16_t h; h.bits = b; return h; }
};

namespace emu {

template <typename T> struct F16Traits;
template <> struct F16Traits<half> {
    static uint16_t rne(float f) { return f32_to_f16_rne(f); }
    static float to_f(uint16_t b) { return f16_to_f32(b); }
};
template <> struct F16Traits<bfloat16_t> {
    static uint16_t rne(float f) { return f32_to_bf16_rne(f); }
    static float to_f(uint16_t b) { return bf16_to_f32(b); }
};

// Neighbouring representable 16-bit values (sign-magnitude encoding).
inline uint16_t next_toward_inf_mag(uint16_t b) { return uint16_t(b + 1); }
inline uint16_t next_toward_zero_mag(uint16_t b) { return (b & 0x7fff) ? uint16_t(b - 1) : b; }

// mode: 0 none/rint (nearest even), 2 floor, 3 ceil, 4 round (half away from zero), 5 trunc, 6 odd
template <typename T>
uint16_t round_to(float f, int mode) {
    uint16_t n = F16Traits<T>::rne(f);
    float nf = F16Traits<T>::to_f(n);
    if (std::isnan(f) || nf == f || std::isinf(f) || mode == 0 || mode == 1) return n;
    // bracket f by the two representable values around it: lo (smaller magnitude), hi (larger)
    bool neg = std::signbit(f);
    uint16_t lo, hi;
    if (std::fabs(nf) < std::fabs(f)) { lo = n; hi = next_toward_inf_mag(n); }
    else { hi = n; lo = next_toward_zero_mag(n); }
    switch (mode) {
        case 2: return neg ? hi : lo;  // floor
        case 3: return neg ? lo : hi;  // ceil
        case 5: return lo;             // trunc
        case 4: {                      // round half away from zero
            double dl = std::fabs(double(f) - double(F16Traits<T>::to_f(lo)));
            double dh = std::fabs(double(F16Traits<T>::to_f(hi)) - double(f));
            return dh <= dl ? hi : lo;
        }
        case 6: return (lo & 1) ? lo : hi;  // von Neumann: the odd one
        default: return n;
    }
}

}  // namespace emu
