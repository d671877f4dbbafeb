// The warpgroup MMA of ffi/cuda/common/wgmma.cuh emulated on the host, for
// the sm_90a attention backward (attention_bwd_sm90_kernel.cuh). The real
// header is included below (#include_next) for what the kernels compute on
// their side, Swizzle128 (where a tile's chunks are written) and SmemDesc128
// (the descriptors), with its device wrappers renamed out of the way; the
// emulated wgmma decodes each descriptor with its own model of the PTX ISA's
// layouts (9.7.15.5.1), not with the kernels' address arithmetic:
// - 128B swizzle: the 16-byte chunk at shared address bits [4:6] is stored at
//   bits [4:6] ^ [7:9] (a 1024-byte period);
// - K-major operand (rows = M or N): element (r, k) of the 16-wide slice at
//   start + (r / 8) SBO + (r % 8) 128 + 2k, LBO unused;
// - MN-major operand: element (k, n) at start + (n / 64) LBO + (k / 8) SBO +
//   (k % 8) 128 + 2 (n % 64);
// - A from registers: the warp's 16 rows (warp w of the warpgroup: rows 16w..)
//   in the mma.m16n8k16 A-fragment layout; accumulator d[4j + e] of warp w,
//   lane l: row 16w + l / 4 (+ 8 for e >= 2), column 8j + 2 (l % 4) + e % 2.
// A descriptor whose start lies where these readings could differ (base
// offset, swizzle phase of the start) aborts, as does any other swizzle mode.
// wgmma is asynchronous: an operation runs when a wait_group retires its
// commit group, so its operands (shared memory, A registers) are read then
// and its accumulators written then; a wgmma issued after a wait_group with
// no wgmma.fence between, or left uncommitted or unwaited at the thread's
// end, aborts. Products are float sums of the exact 16-bit inputs, in k
// order (the hardware's order within a k16 step is not modelled).
#pragma once
#include <functional>
#include <vector>

#include "ffi/cuda/common/kernel_utils.cuh"

// The real header's device wrappers, empty outside sm_90a device code, under
// other names; those not emulated stay unusable.
#define WgmmaFence WgmmaFence_Device
#define WgmmaCommit WgmmaCommit_Device
#define WgmmaWait WgmmaWait_Device
#define FenceOperand FenceOperand_Device
#define FenceProxyAsync FenceProxyAsync_Device
#define WgmmaN32 WgmmaN32_Device
#define WgmmaN64 WgmmaN64_Device
#define WgmmaN64RS WgmmaN64RS_Device
#define WgmmaN256 WgmmaN256_NotEmulated
#define WgmmaM64N128K16SS WgmmaM64N128K16SS_NotEmulated
#define WgmmaM64N128K16RS WgmmaM64N128K16RS_Device
#define MbarInit MbarInit_NotEmulated
#define MbarArrive MbarArrive_NotEmulated
#define MbarArriveCpAsync MbarArriveCpAsync_NotEmulated
#define MbarWait MbarWait_NotEmulated
#define MbarArriveExpectTx MbarArriveExpectTx_NotEmulated
#define TmaLoad4d TmaLoad4d_NotEmulated
#define NamedBarrierArrive NamedBarrierArrive_NotEmulated
#define SetMaxRegsDec SetMaxRegsDec_NotEmulated
#define SetMaxRegsInc SetMaxRegsInc_NotEmulated
#define Sm90Touch Sm90Touch_NotEmulated
#include_next "ffi/cuda/common/wgmma.cuh"
#undef WgmmaFence
#undef WgmmaCommit
#undef WgmmaWait
#undef FenceOperand
#undef FenceProxyAsync
#undef WgmmaN32
#undef WgmmaN64
#undef WgmmaN64RS
#undef WgmmaM64N128K16RS

#ifdef JAX_MLA_SM90A
#error "the real wgmma.cuh enabled its sm_90a device code on the host"
#endif
#define JAX_MLA_SM90A 1

namespace emu90 {

// One thread's wgmma state: operations issued and not yet committed, the
// commit groups not yet retired, whether a wgmma.fence came since the last wait.
struct Queue {
  std::vector<std::function<void()>> open;
  std::vector<std::vector<std::function<void()>>> groups;
  bool fenced = false;
  ~Queue() {
    if (!open.empty() || !groups.empty()) {
      fprintf(stderr, "wgmma: a thread ended with operations not waited for\n");
      abort();
    }
  }
};
inline thread_local Queue queue;

[[noreturn]] inline void Fail(const char* what) {
  fprintf(stderr, "wgmma emulation: %s\n", what);
  abort();
}

struct Desc {
  uint32_t start, lbo, sbo;
};
inline Desc Decode(uint64_t d) {
  if ((d >> 62) != 1) Fail("descriptor not in 128B swizzle mode");
  if ((d >> 49) & 7) Fail("descriptor base offset not 0");
  const uint64_t reserved =
      (uint64_t(3) << 14) | (uint64_t(3) << 30) | (uint64_t(7) << 46) | (uint64_t(0x3ff) << 52);
  if (d & reserved) Fail("descriptor reserved bits set");
  const Desc r{uint32_t(d & 0x3fff) << 4, uint32_t((d >> 16) & 0x3fff) << 4,
               uint32_t((d >> 32) & 0x3fff) << 4};
  // Where the 1024-byte swizzle period and the start's swizzle phase agree
  // (bits [7:9] of the start 0), reading the XOR from the absolute address and
  // from the offset to the start give the same layout.
  if ((r.start >> 7) & 7) Fail("descriptor start not in the first row of a swizzle period");
  return r;
}

// The element at (logical) shared address `addr`.
template <typename T>
inline float Load(uint32_t addr) {
  const uint32_t phys = addr ^ (((addr >> 7) & 7) << 4);
  const uint32_t at = phys - emu::kSharedBase;
  if (phys < emu::kSharedBase || at + 2 > emu::shared_bytes) Fail("read outside shared memory");
  T v;
  memcpy(&v.x, jax_mla::cuda::smem_raw + at, 2);
  return emu::ToFloat(v);
}
template <typename T>
inline float KMajor(const Desc& d, int r, int k) {
  if (d.start % 128 + 32 > 128) Fail("K-major k16 slice crosses a 128-byte row");
  return Load<T>(d.start + (r / 8) * d.sbo + (r % 8) * 128 + 2 * k);
}
template <typename T>
inline float MnMajor(const Desc& d, int k, int n) {
  if (d.start % 1024) Fail("MN-major start not on a swizzle period");
  return Load<T>(d.start + (n / 64) * d.lbo + (k / 8) * d.sbo + (k % 8) * 128 + 2 * (n % 64));
}

// d (N / 2 floats) = (accumulate ? d : 0) + A (64 x 16) B (16 x N); a(row, k)
// is A on this thread's rows; B K-major (trans_b 0) or MN-major.
template <typename T, int N, typename AFn>
inline void Mma(float* d, const AFn& a, const Desc& b, int trans_b, bool accumulate) {
  const int lane = threadIdx.x % 32, w = (threadIdx.x / 32) % 4;
  for (int j = 0; j < N / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + lane / 4 + (e >= 2 ? 8 : 0), col = 8 * j + 2 * (lane % 4) + e % 2;
      float acc = accumulate ? d[4 * j + e] : 0.f;
      for (int k = 0; k < 16; ++k)
        acc += a(row, k) * (trans_b ? MnMajor<T>(b, k, col) : KMajor<T>(b, col, k));
      d[4 * j + e] = acc;
    }
}

inline void Issue(std::function<void()> op) {
  if (!queue.fenced) Fail("wgmma issued with no wgmma.fence since the last wait_group");
  queue.open.push_back(std::move(op));
}

// Both operands from shared memory, A K-major.
template <typename T, int N>
inline void SS(float* d, uint64_t a_desc, uint64_t b_desc, int trans_b, int accumulate) {
  Issue([=] {
    const Desc a = Decode(a_desc), b = Decode(b_desc);
    Mma<T, N>(d, [&](int r, int k) { return KMajor<T>(a, r, k); }, b, trans_b, accumulate);
  });
}

// A from this thread's registers a[0..3], gathered over the warp when the
// operation runs.
template <typename T, int N>
inline void RS(float* d, const uint32_t* a_regs, uint64_t b_desc, int trans_b, int accumulate) {
  Issue([=] {
    auto& w = emu::MyWarp();
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 4; ++i) w.a[lane][i] = a_regs[i];
    w.bar.arrive_and_wait();
    float A[16][16];
    emu::GatherA16<T>(w, A);
    w.bar.arrive_and_wait();
    const Desc b = Decode(b_desc);
    Mma<T, N>(d, [&](int r, int k) { return A[r % 16][k]; }, b, trans_b, accumulate);
  });
}

}  // namespace emu90

namespace jax_mla::cuda {

inline void WgmmaFence() { emu90::queue.fenced = true; }
inline void WgmmaCommit() {
  auto& q = emu90::queue;
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}
// Runs every commit group but the newest N, oldest first.
template <int N>
inline void WgmmaWait() {
  auto& q = emu90::queue;
  if (!q.open.empty()) emu90::Fail("wait_group with uncommitted wgmma operations");
  while (int(q.groups.size()) > N) {
    auto group = std::move(q.groups.front());
    q.groups.erase(q.groups.begin());
    for (auto& op : group) op();
  }
  q.fenced = false;
}
inline void FenceOperand(float&) {}
inline void FenceOperand(uint32_t&) {}
// cp.async is a synchronous copy here, so its writes are always visible.
inline void FenceProxyAsync() {}

template <typename T, int kTransB>
inline void WgmmaN32(float (&d)[16], uint64_t a, uint64_t b, int accumulate) {
  emu90::SS<T, 32>(d, a, b, kTransB, accumulate);
}
template <typename T>
inline void WgmmaN64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  emu90::SS<T, 64>(d, a, b, 0, accumulate);
}
template <typename T, int kTransB>
inline void WgmmaN64RS(float (&d)[32], const uint32_t a[4], uint64_t b, int accumulate) {
  emu90::RS<T, 64>(d, a, b, kTransB, accumulate);
}
template <typename T, int kTransB>
inline void WgmmaM64N128K16RS(float d[64], const uint32_t a[4], uint64_t b, int accumulate) {
  emu90::RS<T, 128>(d, a, b, kTransB, accumulate);
}

}  // namespace jax_mla::cuda
