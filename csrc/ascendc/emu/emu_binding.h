// cpattn AscendC CPU emulation: how a kernel's Python binding registers itself.
//
// One file per kernel, csrc/ascendc/emu/bind_<kernel>.cpp, defines a function that adds the
// kernel's Python entry points to the module and registers it with CPATTN_EMU_BINDING; the
// build compiles every bind_*.cpp, kernels/*.cpp and host/*.cpp it finds, so adding a kernel
// needs no other edit here. Launch the kernel inside emu::run_blocks (emu_core.h), listing
// every tensor it may touch (writable ones first) so global accesses are bounds- and
// race-checked.
#pragma once

// Light torch headers (not torch/extension.h): the build compiles in a third of the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <functional>
#include <string>
#include <vector>

#include "emu_core.h"

namespace emu {

using BindFn = void (*)(pybind11::module_&);

struct Binding {
    const char* name;
    BindFn fn;
};

inline std::vector<Binding>& bindings() {
    static std::vector<Binding> b;
    return b;
}

struct Registrar {
    Registrar(const char* name, BindFn fn) { bindings().push_back({name, fn}); }
};

// The global-memory buffer of a tensor, for run_blocks.
inline Buffer buffer(const at::Tensor& t, const std::string& name, bool writable) {
    return Buffer{t.data_ptr(), size_t(t.numel()) * t.element_size(), name, writable};
}

// The kernels' tiling dtype code of a tensor (0 float32, 1 float16, 2 bfloat16, as every tiling
// struct in csrc/ascendc/kernels/ numbers them), or -1 for a dtype no kernel takes.
inline int dtype_code(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return 0;
        case at::kHalf: return 1;
        case at::kBFloat16: return 2;
        default: return -1;
    }
}
// The same from a dtype's name ("float32", "float16", "bfloat16").
inline int dtype_code(const std::string& dtype) {
    return dtype == "float32" ? 0 : dtype == "float16" ? 1 : dtype == "bfloat16" ? 2 : -1;
}

// Whether a size fits a 32-bit field of a tiling struct.
inline bool fits_u32(int64_t x) { return x >= 0 && x <= 0xffffffffLL; }

}  // namespace emu

#define CPATTN_EMU_BINDING(NAME, FN) static ::emu::Registrar cpattn_emu_registrar_##NAME(#NAME, FN)
