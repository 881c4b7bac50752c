// Python binding of the varlen_prefill kernel on CPU tensors (through the emulation).
#include "emu_binding.h"

#include "../host/varlen_prefill_tiling.h"

extern "C" void varlen_prefill(uint8_t* q, uint8_t* k, uint8_t* v, uint8_t* cuSeqlensQ, uint8_t* cuSeqlensK,
                               uint8_t* qPositions, uint8_t* kPositions, uint8_t* out, uint8_t* lse, uint8_t* tiling);

namespace {

using emu::dtype_code;
using emu::fits_u32;

std::string tiling_for(int code, int64_t tq, int64_t tk, int64_t B, int64_t hq, int64_t hkv, int64_t dqk, int64_t dv,
                       int64_t max_q, int64_t ks_t, int64_t ks_h, int64_t vs_t, int64_t vs_h, bool causal, double scale,
                       int64_t cores, VarlenPrefillTiling& t) {
    if (code < 0) return "dtype not supported (float32/float16/bfloat16)";
    for (int64_t x : {tq, tk, B, hq, hkv, dqk, dv, max_q, ks_t, ks_h, vs_t, vs_h, cores})
        if (!fits_u32(x)) return "a size or stride is outside the 32-bit range of the kernel's tiling";
    cpattn_asc::VarlenPrefillShape s{uint32_t(code), uint32_t(tq), uint32_t(tk), uint32_t(B), uint32_t(hq),
                                     uint32_t(hkv), uint32_t(dqk), uint32_t(dv), uint32_t(max_q), uint32_t(ks_t),
                                     uint32_t(ks_h), uint32_t(vs_t), uint32_t(vs_h), causal, float(scale)};
    return cpattn_asc::VarlenPrefillTilingFor(s, uint32_t(cores), t);
}

std::string check(const std::string& dtype, int64_t tq, int64_t tk, int64_t B, int64_t hq, int64_t hkv, int64_t dqk,
                  int64_t dv, int64_t max_q, bool causal, int64_t cores) {
    VarlenPrefillTiling t;
    return tiling_for(dtype_code(dtype), tq, tk, B, hq, hkv, dqk, dv, max_q, hkv * dqk, dqk, hkv * dv, dv, causal, 1.0,
                      cores, t);
}

// A K or V view the kernel reads in place: unit channel stride, non-negative token/head strides;
// else a contiguous copy.
at::Tensor strided_view(const at::Tensor& x) {
    const bool channels = x.size(2) <= 1 || x.stride(2) == 1;
    const bool tokens = x.size(0) <= 1 || x.stride(0) >= x.size(2);
    const bool heads = x.size(1) <= 1 || x.stride(1) >= x.size(2);
    if (channels && tokens && heads) return x;
    return x.contiguous();
}

// Bytes a strided view spans (for the launch's global-memory bounds).
emu::Buffer span(const at::Tensor& x, const std::string& name) {
    size_t elems = x.numel() == 0 ? 0 : size_t((x.size(0) - 1) * x.stride(0) + (x.size(1) - 1) * x.stride(1) + x.size(2));
    return emu::Buffer{x.data_ptr(), elems * x.element_size(), name, false};
}

// Writes out [Tq, Hq, Dv] and lse [Tq, Hq] float32 for the rows of the sequences in cu_seqlens_q
// (the caller fills rows past the last sequence). Positions: int32 [Tq] and [Tk] (causal only).
pybind11::dict varlen(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_q, at::Tensor cu_k,
                      c10::optional<at::Tensor> q_pos, c10::optional<at::Tensor> k_pos, bool causal, double scale,
                      int64_t max_q, at::Tensor out, at::Tensor lse, int64_t cores) {
    TORCH_CHECK(q.device().is_cpu(), "varlen_prefill (ascendc_emu): CPU tensors only");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "varlen_prefill: q, k, v are [T, H, D]");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "varlen_prefill: one dtype");
    TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == at::kFloat, "varlen_prefill: outputs");
    TORCH_CHECK(!causal || (q_pos.has_value() && k_pos.has_value()), "varlen_prefill: causal needs positions");
    const int64_t tq = q.size(0), hq = q.size(1), dqk = q.size(2), tk = k.size(0), hkv = k.size(1), dv = v.size(2);
    const int64_t B = cu_q.numel() - 1;
    at::Tensor qc = q.contiguous(), kc = strided_view(k), vc = strided_view(v);
    VarlenPrefillTiling t;
    std::string why = tiling_for(dtype_code(q), tq, tk, B, hq, hkv, dqk, dv, max_q, kc.stride(0), kc.stride(1),
                                 vc.stride(0), vc.stride(1), causal, scale, cores, t);
    if (!why.empty()) throw std::invalid_argument("varlen_prefill (ascendc_emu): " + why);
    pybind11::dict info;
    info["tok_tile"] = t.tile.tokTile;
    info["head_chunk"] = t.tile.headChunk;
    info["key_tile"] = t.tile.keyTile;
    info["ub_bytes"] = t.tile.ubBytes;
    info["block_dim"] = t.blockDim;
    if (t.numItems == 0 || tq == 0) return info;
    at::Tensor cq = cu_q.to(at::kInt).contiguous(), ck = cu_k.to(at::kInt).contiguous();
    at::Tensor qp, kp;
    if (causal) {
        qp = q_pos->to(at::kInt).contiguous();
        kp = k_pos->to(at::kInt).contiguous();
    }
    at::Tensor tiling = at::empty({int64_t(sizeof(t))}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(tiling.data_ptr(), &t, sizeof(t));
    std::vector<emu::Buffer> bufs{emu::buffer(out, "out", true), emu::buffer(lse, "lse", true), emu::buffer(qc, "q", false),
                                  span(kc, "k"), span(vc, "v"), emu::buffer(cq, "cu_seqlens_q", false),
                                  emu::buffer(ck, "cu_seqlens_k", false), emu::buffer(tiling, "tiling", false)};
    if (causal) {
        bufs.push_back(emu::buffer(qp, "q_positions", false));
        bufs.push_back(emu::buffer(kp, "k_positions", false));
    }
    auto p = [](const at::Tensor& x) { return x.defined() ? static_cast<uint8_t*>(x.data_ptr()) : nullptr; };
    emu::run_blocks(t.blockDim, bufs, [&] {
        varlen_prefill(p(qc), p(kc), p(vc), p(cq), p(ck), p(qp), p(kp), p(out), p(lse), p(tiling));
    });
    return info;
}

void bind(pybind11::module_& m) {
    m.def("varlen_prefill", &varlen, "varlen prefill attention (AscendC kernel, emulated)", pybind11::arg("q"),
          pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens_q"), pybind11::arg("cu_seqlens_k"),
          pybind11::arg("q_positions"), pybind11::arg("k_positions"), pybind11::arg("causal"), pybind11::arg("scale"),
          pybind11::arg("max_seqlen_q"), pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("cores"));
    m.def("varlen_prefill_check", &check, pybind11::arg("dtype"), pybind11::arg("tq"), pybind11::arg("tk"),
          pybind11::arg("num_seqs"), pybind11::arg("hq"), pybind11::arg("hkv"), pybind11::arg("dqk"), pybind11::arg("dv"),
          pybind11::arg("max_seqlen_q"), pybind11::arg("causal"), pybind11::arg("cores"));
}

}  // namespace

CPATTN_EMU_BINDING(varlen_prefill, bind);
