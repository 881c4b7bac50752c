// Host-side tiling of the merge_attn_states kernel; see merge_attn_states_tiling.h.
#include "merge_attn_states_tiling.h"

#include <algorithm>
#include <sstream>

namespace cpattn {
namespace ascendc {

namespace {
uint64_t r32(uint64_t b) { return (b + 31) / 32 * 32; }
uint32_t elem_bytes(uint32_t dtype) { return dtype == kFloat32 ? 4 : 2; }
uint32_t pad_dim(uint32_t d, uint32_t dtype) {
    const uint32_t per = 32 / elem_bytes(dtype);
    return (d + per - 1) / per * per;
}
}  // namespace

uint64_t merge_attn_states_ub_bytes(uint32_t headDim, uint32_t dtype, uint32_t tileRows, uint32_t chunkInputs) {
    const uint64_t sz = elem_bytes(dtype), dp = pad_dim(headDim, dtype);
    const uint64_t rp = (tileRows + 63) / 64 * 64, r8 = (tileRows + 7) / 8 * 8;
    const uint64_t tile = uint64_t(tileRows) * dp;
    uint64_t ub = 0;
    if (headDim > 0) {
        ub += 2 * r32(tile * sz);           // inQue: two input tiles
        ub += 2 * r32(tile * sz);           // outQue: two output tiles (float32: also the accumulator)
        if (sz != 4) ub += 2 * r32(tile * 4);  // castBuf + accBuf (float32 copies of 16-bit data)
        else ub += r32(tile * 4);              // compBuf: Kahan compensation of the float32 sum
        ub += r32(tile * 4);                // prodBuf: weighted input
        const uint64_t tile64 = (tile + 63) / 64 * 64;
        ub += r32(tile64 * 4) + r32(tile64 / 8);  // wfullBuf + emaskBuf: clearing empty inputs' rows
        ub += r32(2 * 64 * 4);              // minBuf: ReduceMin result and work area
    }
    ub += 2 * r32(uint64_t(chunkInputs) * rp * 4);  // lseQue: two LSE chunks
    ub += 2 * r32(rp * 4);                          // outLseQue
    ub += r32(5 * rp * 4);                          // statBuf: max, sum, two scratch, sum compensation
    ub += r32(rp / 8);                              // maskBuf: Compares bits
    ub += r32(r8 * 8 * 4);                          // brcBuf: one 32-byte block per row
    return ub;
}

std::string merge_attn_states_tiling(uint64_t rows, uint32_t numInputs, uint32_t headDim, uint32_t dtype, bool writeLse,
                                     uint32_t vectorCores, MergeAttnStatesTiling* out) {
    std::ostringstream why;
    if (numInputs < 1) return "needs at least one input";
    if (dtype > kBFloat16) return "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)";
    if (vectorCores < 1) return "needs at least one vector core";
    if (vectorCores > 65535) return "more vector cores than the 65535 blocks a launch may have";
    const uint32_t dp = pad_dim(headDim, dtype);
    if (dp / 8 > 255) {  // one row of float32 is the repeat stride of the broadcast Mul (8 bits, in 32-byte blocks)
        why << "head dim " << headDim << " (padded to " << dp << ") > 2040: a float32 row must fit the 8-bit repeat stride";
        return why.str();
    }
    if (uint64_t(headDim) * elem_bytes(dtype) > 2097151) return "row too long for DataCopyPad";
    const uint64_t budget = kUbBytes - kSelectReservedUb;
    const uint32_t chunk = std::min<uint32_t>(numInputs, 8);
    const uint64_t perCore = rows == 0 ? 0 : (rows + vectorCores - 1) / vectorCores;
    uint32_t tileRows = uint32_t(std::min<uint64_t>({255, std::max<uint64_t>(perCore, 1), 4095}));
    while (tileRows > 0 && merge_attn_states_ub_bytes(headDim, dtype, tileRows, chunk) > budget) --tileRows;
    if (tileRows == 0) {
        why << "head dim " << headDim << " does not fit one row in the " << kUbBytes << "-byte unified buffer";
        return why.str();
    }
    MergeAttnStatesTiling t{};
    t.totalRows = rows;
    t.rowsPerCore = perCore;
    t.usedCores = perCore ? uint32_t((rows + perCore - 1) / perCore) : 0;
    t.numInputs = numInputs;
    t.headDim = headDim;
    t.headDimPad = dp;
    t.dtype = dtype;
    t.tileRows = tileRows;
    t.tileRowsPad = (tileRows + 63) / 64 * 64;
    t.chunkInputs = chunk;
    t.writeLse = writeLse ? 1 : 0;
    t.ubBytes = uint32_t(merge_attn_states_ub_bytes(headDim, dtype, tileRows, chunk));
    *out = t;
    return "";
}

}  // namespace ascendc
}  // namespace cpattn
