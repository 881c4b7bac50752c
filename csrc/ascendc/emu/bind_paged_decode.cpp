// Python binding of the paged_decode kernel on CPU tensors (through the emulation).
#include "emu_binding.h"

#include "../host/paged_decode_tiling.h"

extern "C" void paged_decode(uint8_t* q, uint8_t* kCache, uint8_t* vCache, uint8_t* blockTable, uint8_t* queryStartLoc,
                             uint8_t* visibleLens, uint8_t* out, uint8_t* lse, uint8_t* tiling);

namespace {

using emu::dtype_code;
using emu::fits_u32;

// Fill the tiling for these sizes; "" or why the kernel cannot run them.
std::string tiling_for(int code, int64_t T, int64_t B, int64_t hq, int64_t hkv, int64_t dqk, int64_t dv, int64_t nb,
                       int64_t bs, int64_t mb, bool mla, double scale, int64_t cores, PagedDecodeTiling& t) {
    if (code < 0) return "dtype not supported (float32/float16/bfloat16)";
    for (int64_t x : {T, B, hq, hkv, dqk, dv, nb, bs, mb, cores})
        if (!fits_u32(x)) return "a size is outside the 32-bit range of the kernel's tiling";
    cpattn_asc::PagedDecodeShape s{uint32_t(code), uint32_t(T), uint32_t(B), uint32_t(hq), uint32_t(hkv),
                                   uint32_t(dqk), uint32_t(dv), uint32_t(nb), uint32_t(bs), uint32_t(mb), mla,
                                   float(scale)};
    return cpattn_asc::PagedDecodeTilingFor(s, uint32_t(cores), t);
}

std::string check(const std::string& dtype, int64_t T, int64_t B, int64_t hq, int64_t hkv, int64_t dqk, int64_t dv,
                  int64_t nb, int64_t bs, int64_t mb, bool mla, int64_t cores) {
    PagedDecodeTiling t;
    return tiling_for(dtype_code(dtype), T, B, hq, hkv, dqk, dv, nb, bs, mb, mla, 1.0, cores, t);
}

at::Tensor int32(const at::Tensor& x) { return x.to(at::kInt).contiguous(); }

// (out [T, Hq, Dv] in q's dtype, lse [T, Hq] float32, tiling info)
std::tuple<at::Tensor, at::Tensor, pybind11::dict> paged(at::Tensor q, at::Tensor k_cache, c10::optional<at::Tensor> v_cache,
                                                         at::Tensor block_table, at::Tensor query_start_loc,
                                                         at::Tensor visible_lens, double scale, int64_t v_head_dim,
                                                         int64_t cores) {
    TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_decode (ascendc_emu): CPU tensors only");
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged_decode: q [T, Hq, Dqk], k_cache [NB, bs, Hkv, Dqk]");
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "paged_decode: k_cache dtype differs from q");
    const bool mla = !v_cache.has_value();
    if (!mla) TORCH_CHECK(v_cache->scalar_type() == q.scalar_type() && v_cache->dim() == 4, "paged_decode: v_cache");
    const int64_t T = q.size(0), hq = q.size(1), dqk = q.size(2);
    const int64_t nb = k_cache.size(0), bs = k_cache.size(1), hkv = k_cache.size(2);
    const int64_t B = block_table.size(0), mb = block_table.size(1);
    TORCH_CHECK(k_cache.size(3) == dqk, "paged_decode: k_cache head dim differs from q");
    TORCH_CHECK(query_start_loc.numel() == B + 1 && visible_lens.numel() == T, "paged_decode: query_start_loc [B+1], "
                "visible_lens [T]");
    PagedDecodeTiling t;
    std::string why = tiling_for(dtype_code(q), T, B, hq, hkv, dqk, v_head_dim, nb, bs, mb, mla, scale, cores, t);
    if (!why.empty()) throw std::invalid_argument("paged_decode (ascendc_emu): " + why);
    at::Tensor out = at::empty({T, hq, v_head_dim}, q.options());
    at::Tensor lse = at::empty({T, hq}, q.options().dtype(at::kFloat));
    pybind11::dict info;
    info["head_chunk"] = t.tile.headChunk;
    info["key_tile"] = t.tile.keyTile;
    info["ub_bytes"] = t.tile.ubBytes;
    info["block_dim"] = t.blockDim;
    if (t.numItems == 0) return {out, lse, info};

    at::Tensor qc = q.contiguous(), kc = k_cache.contiguous();
    at::Tensor vc = mla ? at::Tensor() : v_cache->contiguous();
    at::Tensor table = int32(block_table), qsl = int32(query_start_loc), vis = int32(visible_lens);
    at::Tensor tiling = at::empty({int64_t(sizeof(t))}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(tiling.data_ptr(), &t, sizeof(t));
    std::vector<emu::Buffer> bufs{emu::buffer(out, "out", true), emu::buffer(lse, "lse", true),
                                  emu::buffer(qc, "q", false), emu::buffer(kc, "k_cache", false),
                                  emu::buffer(table, "block_table", false), emu::buffer(qsl, "query_start_loc", false),
                                  emu::buffer(vis, "visible_lens", false), emu::buffer(tiling, "tiling", false)};
    if (!mla) bufs.push_back(emu::buffer(vc, "v_cache", false));
    auto p = [](const at::Tensor& x) { return x.defined() ? static_cast<uint8_t*>(x.data_ptr()) : nullptr; };
    emu::run_blocks(t.blockDim, bufs, [&] {
        paged_decode(p(qc), p(kc), p(vc), p(table), p(qsl), p(vis), p(out), p(lse), p(tiling));
    });
    return {out, lse, info};
}

void bind(pybind11::module_& m) {
    m.def("paged_decode", &paged, "paged decode attention (AscendC kernel, emulated)", pybind11::arg("q"),
          pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_table"),
          pybind11::arg("query_start_loc"), pybind11::arg("visible_lens"), pybind11::arg("scale"),
          pybind11::arg("v_head_dim"), pybind11::arg("cores"));
    m.def("paged_decode_check", &check, pybind11::arg("dtype"), pybind11::arg("num_tokens"), pybind11::arg("num_reqs"),
          pybind11::arg("hq"), pybind11::arg("hkv"), pybind11::arg("dqk"), pybind11::arg("dv"),
          pybind11::arg("num_blocks"), pybind11::arg("block_size"), pybind11::arg("table_stride"),
          pybind11::arg("mla"), pybind11::arg("cores"));
}

}  // namespace

CPATTN_EMU_BINDING(paged_decode, bind);
