// The mma.sync attention backward kernels' tile shapes (constexpr only, no
// device code). Two kernels, each the only writer of its results, so the
// backward is deterministic without atomics:
//   KV kernel: 64 keys of one (batch, KV head) per block (16 per warp); it
//     loops over blocks of kQRows query rows (every head of the group) and
//     accumulates dK and dV in registers. Where they would not fit (Dk = 256)
//     the columns are split over kSplit blocks, each recomputing S and dP.
//   Q kernel: 64 query rows per block (16 per warp), the forward's layout; it
//     loops over blocks of kKeys keys and accumulates dQ in registers.
#pragma once

#include <cstddef>

namespace jax_mla::cuda {

template <int Dk, int Dv>
struct AttnBwdShape {
  static constexpr int kThreads = 128;
  static constexpr int kKRow = Dk * 2 + 16;  // padded smem rows: conflict-free ldmatrix
  static constexpr int kVRow = Dv * 2 + 16;
  // KV kernel.
  static constexpr int kKvKeys = 64;
  static constexpr int kQRows = 32;  // divides kThreads
  static constexpr int kSplit = (Dk + Dv > 320) ? 2 : 1;
  static constexpr int kStages = 2;
  // Per stage: Q and dO rows, then the rows' LSE (log2 units), delta and visible-key count.
  static constexpr size_t kKvStage = size_t(kQRows) * (kKRow + kVRow) + kQRows * 12;
  static constexpr size_t kKvSmem = size_t(kKvKeys) * (kKRow + kVRow) + kStages * kKvStage;
  // Q kernel.
  static constexpr int kRows = 64;
  // 32 keys per tile from Dk + Dv = 320 on: dQ's accumulators leave room for
  // S and dP of 32 keys only, and two blocks fit an H100 SM's shared memory.
  static constexpr int kKeys = (Dk + Dv >= 320) ? 32 : 64;
  static constexpr size_t kQSmem =
      size_t(kRows) * (kKRow + kVRow) + size_t(kStages) * kKeys * (kKRow + kVRow);
};

}  // namespace jax_mla::cuda
