// The _cuda nanobind module: bindings only. It builds wherever nvcc exists and
// loads without a GPU (static cudart).
#include <cstdint>

#include "ffi/common/capsule.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "nanobind/nanobind.h"

namespace nb = nanobind;

using jax_mla::EncapsulateFfiHandler;

NB_MODULE(_cuda, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["jax_mla_flash_attention"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashAttention);
    d["jax_mla_flash_mla"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashMla);
    d["jax_mla_flash_mla_quant"] = EncapsulateFfiHandler(jax_mla::cuda::kFlashMlaQuant);
    return d;
  });
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
        "1 q8_0, 2 q8_kv): the split heuristic fills that many per SM.");
}
