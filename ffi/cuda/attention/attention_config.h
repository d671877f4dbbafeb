// The mma.sync flash_attention kernel's tile shape (constexpr only, no device
// code): what the kernel is built with and what the host side
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

}  // namespace jax_mla::cuda
