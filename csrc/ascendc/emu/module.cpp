// cpattn AscendC CPU emulation: the Python extension module. Kernel bindings register
// themselves (emu_binding.h); this file only creates the module and the exception type.
#include "emu_binding.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "cpattn AscendC kernels run on CPU tensors through a strict emulation of the AscendC API";
    // Every broken emulation rule raises EmulationError (a RuntimeError) naming the rule.
    pybind11::register_exception<emu::RuleError>(m, "EmulationError", PyExc_RuntimeError);
    m.attr("UB_BYTES") = emu::UB_SIZE;
    std::vector<std::string> names;
    for (const auto& b : emu::bindings()) {
        b.fn(m);
        names.push_back(b.name);
    }
    m.attr("KERNELS") = names;
}
