// Host-side tiling of the merge_attn_states kernel (plain C++, no CANN): used by the CPU
// emulation binding and by the NPU binding alike.
#pragma once

#include <cstdint>
#include <string>

#include "../kernels/merge_attn_states_tiling.h"

namespace cpattn {
namespace ascendc {

constexpr uint32_t kUbBytes = 192 * 1024 - 256;   // usable unified buffer per vector core (Atlas A2)
constexpr uint32_t kSelectReservedUb = 8 * 1024;  // Compares/Select (modes 1, 2) reserve this much

// dtype codes of MergeAttnStatesTiling::dtype
enum MergeDtype : uint32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// UB bytes the kernel asks for with these tile sizes (the kernel's InitBuffer calls, each
// rounded up to 32 bytes).
uint64_t merge_attn_states_ub_bytes(uint32_t headDim, uint32_t dtype, uint32_t tileRows, uint32_t chunkInputs);

// Fill `out` for a merge of `numInputs` partials of `rows` rows of `headDim` elements over at most
// `vectorCores` vector cores. Returns "" on success, else why the kernel cannot run it (nothing
// else is written then).
std::string merge_attn_states_tiling(uint64_t rows, uint32_t numInputs, uint32_t headDim, uint32_t dtype, bool writeLse,
                                     uint32_t vectorCores, MergeAttnStatesTiling* out);

}  // namespace ascendc
}  // namespace cpattn
