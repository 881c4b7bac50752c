// cpattn AscendC CPU emulation: the header the kernels include instead of CANN's.
//
// A clean-room subset of the public AscendC API (CANN 9.1 names), written by the cpattn
// developers from the public documentation; no Huawei header text. It runs kernels on host
// memory and is strict where the hardware is silent (see docs/ascendc.md, "The emulation").
#pragma once

#include "emu_tensor.h"
#include "emu_copy.h"
#include "emu_vec.h"
#include "emu_attn_ops.h"  // Axpy, ReduceRepeat: the attention kernels (paged_decode, varlen_prefill)
