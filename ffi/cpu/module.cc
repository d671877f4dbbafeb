// The _cpu nanobind module: bindings only.
#include <string>

#include "ffi/common/capsule.h"
#include "ffi/common/dtype.h"
#include "ffi/common/paged_args.h"
#include "ffi/common/quant_format.h"
#include "ffi/cpu/flash.h"
#include "ffi/cpu/handlers.h"
#include "ffi/cpu/kernels.h"
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"

namespace nb = nanobind;

using jax_mla::EncapsulateFfiHandler;

NB_MODULE(_cpu, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["jax_mla_flash_attention"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashAttention);
    d["jax_mla_flash_mla"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashMla);
    d["jax_mla_flash_attention_quant"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashAttentionQuant);
    d["jax_mla_flash_mla_quant"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashMlaQuant);
    d["jax_mla_flash_attention_paged"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashAttentionPaged);
    d["jax_mla_flash_mla_paged"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashMlaPaged);
    d["jax_mla_flash_attention_quant_paged"] =
        EncapsulateFfiHandler(jax_mla::cpu::kFlashAttentionQuantPaged);
    d["jax_mla_flash_mla_quant_paged"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashMlaQuantPaged);
    d["jax_mla_flash_attention_bwd"] = EncapsulateFfiHandler(jax_mla::cpu::kFlashAttentionBwd);
    return d;
  });
  m.def(
      "capabilities",
      [] {
        using jax_mla::DType;
        using jax_mla::QFormat;
        nb::dict d;
        d["head_dim_multiple"] = jax_mla::cpu::kHeadDimMultiple;
        d["max_head_dim"] = jax_mla::cpu::kMaxHeadDim;
        nb::list dtypes;
        for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) dtypes.append(DTypeName(t));
        d["dtypes"] = dtypes;
        nb::dict formats;
        for (QFormat f : {QFormat::kQ8_0, QFormat::kQ8KV, QFormat::kQ6_0, QFormat::kFP8E4M3}) {
          formats[QFormatName(f)] = static_cast<int64_t>(f);
        }
        d["formats"] = formats;
        d["kv_tile"] = jax_mla::cpu::kKvTile;
        nb::list page_sizes;
        for (int64_t s : jax_mla::kPageSizes) page_sizes.append(s);
        d["page_sizes"] = page_sizes;
        return d;
      },
      "What the CPU kernels take: the head-dim rule (multiples of head_dim_multiple up to "
      "max_head_dim), the dtypes, the quantized formats and their FFI attribute codes, and "
      "the KV tile, and the page sizes of the *_paged targets.");
  m.def(
      "kv_tile", [] { return jax_mla::cpu::kKvTile; },
      "Keys per kernel tile; num_splits is clamped to the number of tiles.");
  m.def(
      "isa",
      [] {
        std::string error;
        const jax_mla::cpu::KernelTable* t = jax_mla::cpu::SelectKernels(&error);
        if (t == nullptr) throw nb::value_error(error.c_str());
        return std::string(t->isa);
      },
      "The ISA path the kernels take now (JAX_MLA_CPU_ISA or the best available).");
  m.def(
      "work_items",
      [](int64_t batch, int64_t seq_q, int64_t heads_q, int64_t heads_kv) {
        return jax_mla::cpu::MakePlan(batch, seq_q, heads_q, heads_kv, 1, 1).items;
      },
      nb::arg("batch"), nb::arg("seq_q"), nb::arg("heads_q"), nb::arg("heads_kv"),
      "Work items the CPU driver makes of a call without split-KV (the num_splits "
      "heuristic splits the keys when there are fewer items than threads).");
  m.def("built_isas", &jax_mla::cpu::BuiltIsas);
  m.def("supported_isas", &jax_mla::cpu::SupportedIsas);
}
