// Kernel launchers of the AscendC backend: one per kernel, each defined in launch/<name>_launch.cpp,
// the only translation units that use the `<<<blockDim, nullptr, stream>>>` launch syntax. Those
// are compiled by CANN's bisheng (ascendc_library in ../CMakeLists.txt) together with the kernel
// source they include; everything else in this directory is plain C++ that g++ can check against
// torch_npu's shipped headers (make check-ascendc-host).
//
// Every pointer is a device (global memory) address; `tiling` points at the kernel's tiling
// struct (and, for the merge, the pointer tables after it) already copied to the device.
#ifndef CPATTN_ASCENDC_NPU_LAUNCH_H
#define CPATTN_ASCENDC_NPU_LAUNCH_H

#include <cstdint>

namespace cpattn_npu {

void launch_merge_attn_states(uint32_t blockDim, void* stream, void* outPtrs, void* lsePtrs, void* out,
                              void* outLse, void* tiling);

void launch_paged_decode(uint32_t blockDim, void* stream, void* q, void* kCache, void* vCache, void* blockTable,
                         void* queryStartLoc, void* visibleLens, void* out, void* lse, void* tiling);

void launch_varlen_prefill(uint32_t blockDim, void* stream, void* q, void* k, void* v, void* cuSeqlensQ,
                           void* cuSeqlensK, void* qPositions, void* kPositions, void* out, void* lse, void* tiling);

}  // namespace cpattn_npu

// How a launcher invokes a kernel. bisheng (the real build): the `<<<>>>` launch on `stream`.
// CPATTN_LAUNCH_AS_CALL (the host syntax check, against the emulation's kernel_operator.h): a
// plain call, so g++ checks the argument list against the kernel's signature; never run.
#if defined(CPATTN_LAUNCH_AS_CALL)
#define CPATTN_LAUNCH(kernel, blockDim, stream, ...) ((void)(blockDim), (void)(stream), kernel(__VA_ARGS__))
#else
#define CPATTN_LAUNCH(kernel, blockDim, stream, ...) kernel<<<blockDim, nullptr, stream>>>(__VA_ARGS__)
#endif

#endif
