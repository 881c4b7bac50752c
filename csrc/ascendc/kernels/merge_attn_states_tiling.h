// Tiling of the merge_attn_states kernel: a plain struct that the host fills
// (csrc/ascendc/host/merge_attn_states_tiling.cpp) and the kernel reads from global memory.
// Only fixed-width fields, so host and device agree on the layout.
#pragma once

#include <stdint.h>

struct MergeAttnStatesTiling {
    uint64_t totalRows;      // T*H rows of the merge
    uint64_t rowsPerCore;    // rows of blocks 0..usedCores-2 (the last block takes the rest)
    uint32_t usedCores;      // block dim of the launch
    uint32_t numInputs;      // N partial results
    uint32_t headDim;        // D elements per row
    uint32_t headDimPad;     // D rounded up to 32 bytes of the data type (UB row pitch, elements)
    uint32_t dtype;          // 0 float32, 1 float16, 2 bfloat16 (inputs and output)
    uint32_t tileRows;       // rows per tile (<= 255: one vector repeat per row)
    uint32_t tileRowsPad;    // tileRows rounded up to 64 (LSE vectors: 256-byte multiples)
    uint32_t chunkInputs;    // LSE rows of this many inputs are held at once
    uint32_t writeLse;       // 1: write the merged LSE
    uint32_t ubBytes;        // UB the kernel asks InitBuffer for (checked <= budget on the host)
};
