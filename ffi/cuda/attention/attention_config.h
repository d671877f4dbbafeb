// The mma.sync flash_attention kernels' tile shapes (constexpr only, no device
// code): what the kernels are built with and what the host side
// (split_inputs.cc) plans splits by.
#pragma once

#include <cstddef>

namespace jax_mla::cuda {

template <int Dk, int Dv>
struct AttnShape {
  static constexpr int kThreads = 128;
  static constexpr int kRows = 64;
  static constexpr int kKeys = (Dk >= 256 || Dv >= 256) ? 32 : 64;
  static constexpr int kStages = 2;
  static constexpr int kKRow = Dk * 2 + 16;  // padded smem rows: conflict-free ldmatrix
  static constexpr int kVRow = Dv * 2 + 16;
  static constexpr size_t kSmem = size_t(kRows) * kKRow + size_t(kStages) * kKeys * (kKRow + kVRow);
};

// The kernel over 8-bit K and V (attention_quant_kernel.cuh): the float
// kernel's blocks and key tiles (so the split plan is the same), int8 rows
// staged with their scales, q8_0's float16 block scales or q8_kv's float32
// row scale (the format is a run-time choice: room for the larger).
template <int Dk, int Dv>
struct AttnQuantShape {
  static_assert(Dk % 64 == 0 && Dv % 64 == 0,
                "pairs of 32-column blocks (the S loop's step, 4-byte scale words)");
  static constexpr int kThreads = 128;
  static constexpr int kRows = 64;
  static constexpr int kKeys = AttnShape<Dk, Dv>::kKeys;
  static constexpr int kStages = 2;
  static constexpr int kKBlocks = Dk / 32, kVBlocks = Dv / 32;
  static constexpr int kQsRow = Dk + 16;  // padded int8 Q and K rows: conflict-free ldmatrix
  static constexpr int kVqRow = Dv;       // int8 V rows (16-byte loads only)
  static constexpr int kKScaleBytes = kKBlocks * 2 > 4 ? kKBlocks * 2 : 4;  // per key
  static constexpr int kVScaleBytes = kVBlocks * 2 > 4 ? kVBlocks * 2 : 4;
  static constexpr int kVRow = Dv * 2 + 16;  // padded dequantized V row (T)
  // A stage: K values, K scales, V values, V scales (each 16-byte aligned).
  static constexpr int kStageBytes = kKeys * (kQsRow + kKScaleBytes + kVqRow + kVScaleBytes);
  // The rounded query's int8 rows are read into registers before the first
  // tile; the dequantized V tile reuses their room. Then the query's float32
  // block scales.
  static constexpr int kQVBytes = kRows * kQsRow > kKeys* kVRow ? kRows * kQsRow : kKeys * kVRow;
  static constexpr size_t kSmem =
      size_t(kStages) * kStageBytes + size_t(kQVBytes) + size_t(kRows) * kKBlocks * 4;
};

}  // namespace jax_mla::cuda
