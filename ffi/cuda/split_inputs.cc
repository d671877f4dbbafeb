// What the Python num_splits heuristic asks the module for, for both ops:
// keys per KV tile, thread blocks per call and blocks per SM, from the
// kernels' tile shapes (attention/attention_config.h, mla/mla_config.h).
#include <cstdint>

#include "ffi/common/quant_format.h"
#include "ffi/cuda/attention/attention_config.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/inst/kernel_table.h"
#include "ffi/cuda/mla/mla_config.h"

namespace jax_mla::cuda {

int KvTile(int64_t dk) {
  if (dk == kMlaDk) return kMlaKeys;
#define JAX_MLA_TILE(DK, DV) \
  if (dk == DK) return AttnShape<DK, DV>::kKeys;
  JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_TILE)
#undef JAX_MLA_TILE
  return 64;
}

int64_t WorkItems(int64_t batch, int64_t seq_q, int64_t heads_q, int64_t heads_kv, int64_t dk) {
  if (dk == kMlaDk && heads_kv == 1) {
    const int64_t rows = seq_q * heads_q, per_block = 16 * MlaGroups(rows);
    return batch * ((rows + per_block - 1) / per_block);
  }
  const int64_t rows = seq_q * (heads_kv > 0 ? heads_q / heads_kv : 0);
  return batch * heads_kv * ((rows + 63) / 64);
}

int MlaBlocksPerSm(int64_t rows, int64_t kv_fmt) {
  const bool quant = kv_fmt == int64_t(QFormat::kQ8_0) || kv_fmt == int64_t(QFormat::kQ8KV) ||
                     kv_fmt == int64_t(QFormat::kFP8E4M3);
  return quant && MlaGroups(rows) == 1 ? MlaQuantShape<1, QFormat::kQ8_0>::kMinBlocks : 1;
}

}  // namespace jax_mla::cuda
