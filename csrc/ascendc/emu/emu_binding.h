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

}  // namespace emu

#define CPATTN_EMU_BINDING(NAME, FN) static ::emu::Registrar cpattn_emu_registrar_##NAME(#NAME, FN)
