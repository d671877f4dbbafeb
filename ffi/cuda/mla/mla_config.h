// The MLA kernels' tile shapes (constexpr only, no device code): what the
// kernels are built with and what the host side (mla.cu, split_inputs.cc)
// sizes launches and split plans by.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ffi/common/quant_format.h"

namespace jax_mla::cuda {

constexpr int kMlaDk = 576;
constexpr int kMlaDv = 512;
constexpr int kMlaKeys = 32;                      // keys per KV tile
constexpr int kMlaRowBytes = kMlaDk * 2 + 16;     // padded smem row: conflict-free ldmatrix
constexpr int kMlaPRowBytes = kMlaKeys * 2 + 16;  // padded P row
constexpr int kMlaChunks = kMlaDk * 2 / 16;       // 16-byte chunks per row

// Rows per block: G groups of 16 (G = 1 for up to 16 rows, e.g. 16-head decode).
inline int MlaGroups(int64_t rows) { return rows <= 16 ? 1 : 4; }

template <int G>
struct MlaShape {
  static constexpr int kThreads = 128 * G;
  static constexpr int kRows = 16 * G;
  static constexpr int kStages = G == 1 ? 4 : 3;
  static constexpr size_t kSmem = size_t(kRows) * kMlaRowBytes +
                                  size_t(kStages) * kMlaKeys * kMlaRowBytes +
                                  size_t(G) * 16 * kMlaPRowBytes + 2 * G * 64 * sizeof(float);
};

constexpr int kMlaBlocks = kMlaDk / 32;         // 18 blocks of 32 per latent row
constexpr int kMlaQsRowBytes = kMlaDk + 16;     // padded int8 row: conflict-free ldmatrix
constexpr int kMlaQsChunks = kMlaDk / 16;       // 16-byte chunks per int8 row
constexpr int kMlaQdStride = 20;                // query block scales per row (18, padded to 16 B)
constexpr int kMlaVRowBytes = kMlaDv * 2 + 16;  // padded dequantized V row

// Staged scale bytes per key: 18 float16 block scales (q8_0) or one float32
// (q8_kv, fp8_e4m3).
template <QFormat F>
struct MlaScaleBytes {
  static constexpr int value = F == QFormat::kQ8_0 ? kMlaBlocks * 2 : 4;
};

template <int G, QFormat F>
struct MlaQuantShape {
  static constexpr int kThreads = 128 * G;
  static constexpr int kRows = 16 * G;
  static constexpr int kStages = 3;
  // Two 16-row blocks fit on an SM (4 warps each hide each other's latency).
  static constexpr int kMinBlocks = G == 1 ? 2 : 1;
  static constexpr int kStageBytes = kMlaKeys * kMlaQsRowBytes + kMlaKeys * MlaScaleBytes<F>::value;
  static constexpr size_t kSmem8 = size_t(kRows) * kMlaQsRowBytes +    // Q, int8
                                   size_t(kRows) * kMlaQdStride * 4 +  // Q block scales
                                   size_t(kStages) * kStageBytes +     // K/V tiles, int8
                                   size_t(kMlaKeys) * kMlaVRowBytes;   // V, dequantized
  static constexpr size_t kSmemFp8 = size_t(kRows) * kMlaRowBytes +    // Q, in its type
                                     size_t(kStages) * kStageBytes +   // K/V tiles, e4m3
                                     size_t(kMlaKeys) * kMlaRowBytes;  // K/V, dequantized
  static constexpr size_t kSmem = (F == QFormat::kFP8E4M3 ? kSmemFp8 : kSmem8) +
                                  size_t(G) * 16 * kMlaPRowBytes + 2 * G * 64 * sizeof(float);
};

// The sm_90a kernels (key-split and seesaw): 64-key tiles, 64-row blocks.
constexpr int kSm90Keys = 64;  // keys per KV tile
constexpr int kSm90Rows = 64;  // query rows per block

}  // namespace jax_mla::cuda
