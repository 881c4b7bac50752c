// Python binding of the merge_attn_states kernel on CPU tensors (through the emulation).
#include "emu_binding.h"

#include "../host/merge_attn_states_tiling.h"

extern "C" void merge_attn_states(uint8_t* outPtrs, uint8_t* lsePtrs, uint8_t* out, uint8_t* outLse, uint8_t* tiling);

namespace {

using emu::dtype_code;

// Why the kernel cannot merge N inputs of this shape ("" if it can).
std::string check(int64_t rows, int64_t n, int64_t d, const std::string& dtype, int64_t cores) {
    const int code = dtype_code(dtype);
    if (code < 0) return "dtype " + dtype + " not supported (float32/float16/bfloat16)";
    if (n < 1 || n > 0xffffffffLL || d < 0 || d > 0xffffffffLL) return "N or D out of range";
    MergeAttnStatesTiling t;
    return cpattn::ascendc::merge_attn_states_tiling(uint64_t(rows), uint32_t(n), uint32_t(d), uint32_t(code), true,
                                                     uint32_t(cores), &t);
}

// Merge outs/lses into out (and out_lse if given); returns the tiling used, as a dict.
pybind11::dict merge(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& lses, at::Tensor out,
                     c10::optional<at::Tensor> out_lse, int64_t cores) {
    TORCH_CHECK(!outs.empty() && outs.size() == lses.size(), "merge_attn_states: N >= 1 outs and as many lses");
    TORCH_CHECK(out.device().is_cpu(), "merge_attn_states (ascendc_emu): CPU tensors only");
    const int code = dtype_code(out);
    TORCH_CHECK(code >= 0, "merge_attn_states (ascendc_emu): dtype must be float32, float16 or bfloat16");
    const int64_t d = out.dim() ? out.size(-1) : 0;
    const int64_t rows = lses[0].numel();
    const bool write_lse = out_lse.has_value();
    MergeAttnStatesTiling t;
    std::string why = cpattn::ascendc::merge_attn_states_tiling(uint64_t(rows), uint32_t(outs.size()), uint32_t(d),
                                                                uint32_t(code), write_lse, uint32_t(cores), &t);
    if (!why.empty()) throw std::invalid_argument("merge_attn_states (ascendc_emu): " + why);
    pybind11::dict info;
    info["tile_rows"] = t.tileRows;
    info["used_cores"] = t.usedCores;
    info["chunk_inputs"] = t.chunkInputs;
    info["ub_bytes"] = t.ubBytes;
    info["rows_per_core"] = t.rowsPerCore;
    if (rows == 0) return info;

    std::vector<at::Tensor> in_o, in_l;
    for (size_t i = 0; i < outs.size(); ++i) {
        TORCH_CHECK(outs[i].scalar_type() == out.scalar_type() && outs[i].numel() == rows * d, "outs[", i, "] mismatch");
        TORCH_CHECK(lses[i].scalar_type() == at::kFloat && lses[i].numel() == rows, "lses[", i, "] must be float32 [rows]");
        in_o.push_back(outs[i].contiguous());
        in_l.push_back(lses[i].contiguous());
    }
    at::Tensor dst = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
    at::Tensor dst_lse;
    if (write_lse) dst_lse = out_lse->is_contiguous() ? *out_lse : at::empty(out_lse->sizes(), out_lse->options());

    auto i64 = at::TensorOptions().dtype(at::kLong);
    at::Tensor optr = at::empty({int64_t(outs.size())}, i64), lptr = at::empty({int64_t(outs.size())}, i64);
    for (size_t i = 0; i < outs.size(); ++i) {
        optr.data_ptr<int64_t>()[i] = int64_t(reinterpret_cast<uintptr_t>(in_o[i].data_ptr()));
        lptr.data_ptr<int64_t>()[i] = int64_t(reinterpret_cast<uintptr_t>(in_l[i].data_ptr()));
    }
    at::Tensor tiling = at::empty({int64_t(sizeof(t))}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(tiling.data_ptr(), &t, sizeof(t));

    std::vector<emu::Buffer> bufs;  // writable first: an in-place output is also input 0
    bufs.push_back(emu::buffer(dst, "out", true));
    if (write_lse) bufs.push_back(emu::buffer(dst_lse, "out_lse", true));
    for (size_t i = 0; i < outs.size(); ++i) {
        bufs.push_back(emu::buffer(in_o[i], "outs[" + std::to_string(i) + "]", false));
        bufs.push_back(emu::buffer(in_l[i], "lses[" + std::to_string(i) + "]", false));
    }
    bufs.push_back(emu::buffer(optr, "out pointer table", false));
    bufs.push_back(emu::buffer(lptr, "lse pointer table", false));
    bufs.push_back(emu::buffer(tiling, "tiling", false));
    auto* o = static_cast<uint8_t*>(dst.data_ptr());
    auto* ol = write_lse ? static_cast<uint8_t*>(dst_lse.data_ptr()) : nullptr;
    emu::run_blocks(t.usedCores, bufs, [&] {
        merge_attn_states(static_cast<uint8_t*>(optr.data_ptr()), static_cast<uint8_t*>(lptr.data_ptr()), o, ol,
                          static_cast<uint8_t*>(tiling.data_ptr()));
    });
    info["ub_used"] = emu::launch_state().max_ub_used;  // what InitBuffer really handed out
    if (!dst.is_same(out)) out.copy_(dst);
    if (write_lse && !dst_lse.is_same(*out_lse)) out_lse->copy_(dst_lse);
    return info;
}

void bind(pybind11::module_& m) {
    m.def("merge_attn_states", &merge, "N-way LSE merge (AscendC kernel, emulated)", pybind11::arg("outs"),
          pybind11::arg("lses"), pybind11::arg("out"), pybind11::arg("out_lse"), pybind11::arg("cores"));
    m.def("merge_attn_states_check", &check, pybind11::arg("rows"), pybind11::arg("n"), pybind11::arg("d"),
          pybind11::arg("dtype"), pybind11::arg("cores"));
}

}  // namespace

CPATTN_EMU_BINDING(merge_attn_states, bind);
