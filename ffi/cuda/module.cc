// The _cuda nanobind module: bindings only. It builds wherever nvcc exists and
// loads without a GPU (static cudart).
#include <cstdint>

#include "ffi/common/capsule.h"
#include "ffi/common/paged_args.h"
#include "ffi/common/quant_format.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/inst/kernel_table.h"
#include "ffi/cuda/kernel_family.h"
#include "nanobind/nanobind.h"

namespace nb = nanobind;

using jax_mla::EncapsulateFfiHandler;

namespace {

// What this build supports, read by the Python checks and messages, the test
// parametrization and benchmarks/gpu/sanitize_cases.py (one table: the lists
// come from ffi/cuda/inst/kernel_table.h, written by generate_kernels.py).
nb::dict Capabilities() {
  using jax_mla::QFormat;
  nb::dict d;
  nb::list dtypes, attention_dims, attention_bwd_dims, attention_quant_dims,
      attention_bwd_sm90_dims, mla_layouts, mla_kernels, attention_kernels;
#define JAX_MLA_DTYPE(NAME) dtypes.append(NAME);
  JAX_MLA_CUDA_DTYPES(JAX_MLA_DTYPE)
#undef JAX_MLA_DTYPE
#define JAX_MLA_PAIR(DK, DV) attention_dims.append(nb::list(nb::make_tuple(DK, DV)));
  JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_PAIR)
#undef JAX_MLA_PAIR
#define JAX_MLA_PAIR(DK, DV) attention_bwd_dims.append(nb::list(nb::make_tuple(DK, DV)));
  JAX_MLA_ATTENTION_BWD_HEAD_DIMS(JAX_MLA_PAIR)
#undef JAX_MLA_PAIR
#define JAX_MLA_PAIR(DK, DV) attention_quant_dims.append(nb::list(nb::make_tuple(DK, DV)));
  JAX_MLA_ATTENTION_QUANT_HEAD_DIMS(JAX_MLA_PAIR)
#undef JAX_MLA_PAIR
#define JAX_MLA_PAIR(DK, DV) attention_bwd_sm90_dims.append(nb::list(nb::make_tuple(DK, DV)));
  JAX_MLA_ATTENTION_BWD_SM90_HEAD_DIMS(JAX_MLA_PAIR)
#undef JAX_MLA_PAIR
#define JAX_MLA_LAYOUT(DK, DV, V_OFFSET) \
  mla_layouts.append(nb::list(nb::make_tuple(DK, DV, V_OFFSET)));
  JAX_MLA_MLA_LAYOUTS(JAX_MLA_LAYOUT)
#undef JAX_MLA_LAYOUT
  for (const char* name : jax_mla::cuda::kMlaKernelNames) mla_kernels.append(name);
  for (const char* name : jax_mla::cuda::kAttentionKernelNames) attention_kernels.append(name);
  nb::dict formats, attention_formats;
  for (QFormat f : {QFormat::kQ8_0, QFormat::kQ8KV, QFormat::kFP8E4M3})
    formats[jax_mla::QFormatName(f)] = int64_t(f);
  // flash_attention over quantized caches: k and v both in one of these
  // (each its own), contiguous, at attention_quant_head_dims.
  for (QFormat f : {QFormat::kQ8_0, QFormat::kQ8KV})
    attention_formats[jax_mla::QFormatName(f)] = int64_t(f);
  d["dtypes"] = dtypes;
  d["attention_head_dims"] = attention_dims;
  d["attention_bwd_head_dims"] = attention_bwd_dims;
  // Of those, the pairs the backward's sm90 family (wgmma, sm_90a) takes.
  d["attention_bwd_sm90_head_dims"] = attention_bwd_sm90_dims;
  d["mla_layouts"] = mla_layouts;
  d["mla_formats"] = formats;
  d["attention_formats"] = attention_formats;
  d["attention_quant_head_dims"] = attention_quant_dims;
  d["mla_kernels"] = mla_kernels;
  d["attention_kernels"] = attention_kernels;
  // Paged caches (ffi/common/paged_args.h): the ops with paged kernels (every
  // mla_kernels family reads pages; of attention_kernels, mma_sync and auto,
  // which takes it for paged calls) and the page sizes.
  nb::list paged_ops, page_sizes;
  paged_ops.append("flash_mla");
  paged_ops.append("flash_attention");
  for (int64_t size : jax_mla::kPageSizes) page_sizes.append(size);
  d["paged_ops"] = paged_ops;
  d["page_sizes"] = page_sizes;
  return d;
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["jax_mla_flash_attention"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashAttention);
    d["jax_mla_flash_attention_quant"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashAttentionQuant);
    d["jax_mla_flash_attention_bwd"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashAttentionBwd);
    d["jax_mla_flash_mla"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashMla);
    d["jax_mla_flash_mla_quant"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashMlaQuant);
    d["jax_mla_flash_mla_paged"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashMlaPaged);
    d["jax_mla_flash_mla_quant_paged"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashMlaQuantPaged);
    d["jax_mla_flash_attention_paged"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashAttentionPaged);
    return d;
  });
  m.def("capabilities", &Capabilities,
        "What this build supports: dtypes, head dims (forward and backward), MLA layouts and "
        "formats (FFI codes), flash_attention's quantized formats and their head dims, "
        "the kernel families a call may force (JAX_MLA_CUDA_MLA_KERNEL, "
        "JAX_MLA_CUDA_ATTENTION_KERNEL), the ops with paged kernels (paged_ops) and their "
        "page sizes.");
  m.def("sm_count", &jax_mla::cuda::SmCount, nb::arg("device") = 0,
        "Multiprocessors of a CUDA device, 0 when there is none.");
  m.def("runtime_version", &jax_mla::cuda::RuntimeVersion);
  m.def("kv_tile", &jax_mla::cuda::KvTile, nb::arg("dk"),
        "Keys per KV tile of the kernel for head dim dk; num_splits is clamped to the tiles.");
  m.def("work_items", &jax_mla::cuda::WorkItems, nb::arg("batch"), nb::arg("seq_q"),
        nb::arg("heads_q"), nb::arg("heads_kv"), nb::arg("dk"),
        "Thread blocks a call makes without split-KV (flash_mla: dk = 576, heads_kv = 1).");
  m.def("mla_blocks_per_sm", &jax_mla::cuda::MlaBlocksPerSm, nb::arg("rows"), nb::arg("kv_fmt"),
        "flash_mla thread blocks that run at once on one SM (rows = Sq * H; kv_fmt 0 float, "
        "1 q8_0, 2 q8_kv, 4 fp8_e4m3): the split heuristic fills that many per SM.");
}
