// Hopper (sm_90a) warpgroup MMA building blocks in raw PTX: shared-memory
// matrix descriptors for 128-byte-swizzled tiles, wgmma.mma_async m64n128k16
// (A from shared memory or registers, f32 accumulators), the wgmma fences and
// the async-proxy fence, mbarriers, bulk tensor copies, setmaxnreg. Everything
// that emits sm_90a instructions compiles to nothing outside
// __CUDA_ARCH_FEAT_SM90_ALL, so the header is safe to include in the sm_80
// pass; callers guard their kernels the same way.
//
// Layouts (PTX ISA 9.7.15.5.1, "Shared Memory Matrix Layout"):
// - A tile of 16-bit elements is stored as column blocks of 64 elements: each
//   row of a block is 128 bytes, block b of a tile of `rows` rows starts at
//   b * rows * 128, and 16-byte chunk c of row r sits at chunk position
//   c ^ (r % 8) (the 128B swizzle: address bits [4:6] ^= bits [7:9], so tiles
//   start on 1024-byte boundaries).
// - K-major operand (rows = M or N, 64-element blocks along K): SBO = 1024
//   (8 rows), LBO unused; the k-th 16-wide slice of block b starts
//   32 * (k % 4) bytes into it (the hardware applies the swizzle to the full
//   address).
// - MN-major operand (rows = K, 64-element blocks along M or N): LBO = the
//   distance between 64-wide MN blocks (rows * 128), SBO = 1024 (8 K rows);
//   the k-th 16-row slice starts 2048 * k bytes in.
// - Accumulator of m64nNk16: warp w of the warpgroup holds rows 16w + lane/4
//   and 16w + lane/4 + 8; d[4j + e] (e = 0, 1) is (row lo, col 8j + 2(lane%4) + e),
//   d[4j + 2 + e] the same columns of row hi. A from registers has the
//   mma.m16n8k16 A-fragment layout on the warp's 16 rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "ffi/cuda/common/kernel_utils.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JAX_MLA_SM90A 1
#endif

namespace jax_mla::cuda {

// Byte offset of 16-byte chunk c (8 elements) of row r in a 128B-swizzled tile
// of `rows` rows (layout above).
__host__ __device__ constexpr uint32_t Swizzle128(int rows, int r, int c) {
  return uint32_t((c / 8) * rows * 128 + r * 128 + (((c % 8) ^ (r % 8)) << 4));
}

// Shared-memory matrix descriptor, 128B swizzle; byte address and offsets.
__host__ __device__ constexpr uint64_t SmemDesc128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void WgmmaFence() {
#ifdef JAX_MLA_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#ifdef JAX_MLA_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
#ifdef JAX_MLA_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving reads or writes of an accumulator register
// across the wgmma fences (they are asynchronous to the issuing thread).
__device__ __forceinline__ void FenceOperand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void FenceOperand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Ordinary shared-memory writes (st.shared, cp.async) made visible to the
// async proxy (wgmma, TMA) that reads them next; each writer, before the barrier.
__device__ __forceinline__ void FenceProxyAsync() {
#ifdef JAX_MLA_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// mbarrier (shared::cta) helpers, for producer/consumer pipelines.
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
#ifdef JAX_MLA_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count)
               : "memory");
#endif
}
// One arrival, by this thread, now.
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
#ifdef JAX_MLA_SM90A
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(SmemAddr(bar))
      : "memory");
#endif
}
// One arrival, by this thread, once all of its earlier cp.async copies have
// landed (the barrier's count includes it: .noinc).
__device__ __forceinline__ void MbarArriveCpAsync(uint64_t* bar) {
#ifdef JAX_MLA_SM90A
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(SmemAddr(bar))
               : "memory");
#endif
}
// Waits until the phase with this parity has completed (a fresh barrier is in
// phase 0, so waiting for parity 1 returns at once).
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
#ifdef JAX_MLA_SM90A
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
#endif
}
// One arrival, by this thread, that also raises the bytes the current phase
// waits for (the bulk tensor copies that complete_tx on this barrier).
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
#ifdef JAX_MLA_SM90A
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(
          SmemAddr(bar)),
      "r"(bytes)
      : "memory");
#endif
}
// Bulk tensor copy (TMA) of one box of a 4-d tensor map into shared memory,
// completing on `bar`; coordinates innermost first, in elements.
__device__ __forceinline__ void TmaLoad4d(void* dst, const void* tensor_map, int c0, int c1, int c2,
                                          int c3, uint64_t* bar) {
#ifdef JAX_MLA_SM90A
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3, %4, %5}], [%6];\n" ::"r"(SmemAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(SmemAddr(bar))
      : "memory");
#endif
}
// Named barrier: arrive without waiting (pairs with NamedBarrier's bar.sync).
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Per-warpgroup register budget (sm_90a); all warps of the warpgroup execute it.
template <int N>
__device__ __forceinline__ void SetMaxRegsDec() {
#ifdef JAX_MLA_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void SetMaxRegsInc() {
#ifdef JAX_MLA_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

#define JAX_MLA_D64_OPERANDS                                                                      \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),  \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),  \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),  \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),  \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define JAX_MLA_D64_REGISTERS                                                        \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// d[64] (+)= A (64x16) * B (16x128) for element type NAME (bf16, f16), both
// operands from shared memory; A K-major, B K-major (kTransB 0) or N-major
// (kTransB 1); accumulate = 0 overwrites d.
#define JAX_MLA_WGMMA_SS(FN, NAME)                                                              \
  template <int kTransB>                                                                        \
  __device__ __forceinline__ void FN(float d[64], uint64_t a_desc, uint64_t b_desc,             \
                                     int accumulate) {                                          \
    asm volatile(                                                                               \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                            \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." NAME "." NAME " {" JAX_MLA_D64_REGISTERS \
        "}, %64, %65, p, 1, 1, 0, %67;\n}\n"                                                    \
        : JAX_MLA_D64_OPERANDS                                                                  \
        : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(kTransB));                             \
  }
// The same with A (64x16) from registers: four 2-element registers a thread.
#define JAX_MLA_WGMMA_RS(FN, NAME)                                                                 \
  template <int kTransB>                                                                           \
  __device__ __forceinline__ void FN(float d[64], const uint32_t a[4], uint64_t b_desc,            \
                                     int accumulate) {                                             \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." NAME "." NAME " {" JAX_MLA_D64_REGISTERS    \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                         \
        : JAX_MLA_D64_OPERANDS                                                                     \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(kTransB)); \
  }

#ifdef JAX_MLA_SM90A
JAX_MLA_WGMMA_SS(WgmmaSSBf16, "bf16")
JAX_MLA_WGMMA_SS(WgmmaSSF16, "f16")
JAX_MLA_WGMMA_RS(WgmmaRSBf16, "bf16")
JAX_MLA_WGMMA_RS(WgmmaRSF16, "f16")
#endif
#undef JAX_MLA_WGMMA_SS
#undef JAX_MLA_WGMMA_RS
#undef JAX_MLA_D64_OPERANDS
#undef JAX_MLA_D64_REGISTERS

template <typename T, int kTransB>
__device__ __forceinline__ void WgmmaM64N128K16SS(float d[64], uint64_t a_desc, uint64_t b_desc,
                                                  int accumulate) {
#ifdef JAX_MLA_SM90A
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    WgmmaSSBf16<kTransB>(d, a_desc, b_desc, accumulate);
  else
    WgmmaSSF16<kTransB>(d, a_desc, b_desc, accumulate);
#endif
}
template <typename T, int kTransB>
__device__ __forceinline__ void WgmmaM64N128K16RS(float d[64], const uint32_t a[4], uint64_t b_desc,
                                                  int accumulate) {
#ifdef JAX_MLA_SM90A
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    WgmmaRSBf16<kTransB>(d, a, b_desc, accumulate);
  else
    WgmmaRSF16<kTransB>(d, a, b_desc, accumulate);
#endif
}

// MLA-shaped wgmma (ffi/cuda/mla/mla_sm90_*_kernel.cuh): m64n32k16, m64n64k16 and
// m64n256k16 with both operands in shared memory, and a guard that keeps
// the compiler off the accumulators while a group is in flight.
// Keeps the compiler from touching accumulators between an mma_async and its wait.
template <int N>
__device__ __forceinline__ void Sm90Touch(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Each wrapper below is one asm statement for element type NAME (bf16, f16),
// stamped out twice by a macro, as the m64n128 ones above.
#define JAX_MLA_WGMMAN32_ASM(NAME)                                                              \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                              \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." NAME "." NAME                               \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "               \
      "%16, %17, p, 1, 1, 0, %19;\n}\n"                                                         \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
        "+f"(d[14]), "+f"(d[15])                                                                \
      : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(kTransB))
// d[16] (+)= A (64x16) * B (16x32), both from shared memory (descriptors);
// B K-major (kTransB 0) or MN-major (kTransB 1); accumulate 0 overwrites d.
template <typename T, int kTransB>
__device__ __forceinline__ void WgmmaN32(float (&d)[16], uint64_t a_desc, uint64_t b_desc,
                                         int accumulate) {
#ifdef JAX_MLA_SM90A
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    JAX_MLA_WGMMAN32_ASM("bf16");
  else
    JAX_MLA_WGMMAN32_ASM("f16");
#endif
}
#undef JAX_MLA_WGMMAN32_ASM

#define JAX_MLA_WGMMAN256_ASM(NAME)                                                                \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." NAME "." NAME                                 \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "    \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
      "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
      "%55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, " \
      "%73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, " \
      "%91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, "    \
      "%107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, " \
      "%122, %123, %124, %125, %126, %127}, "                                                      \
      "%128, %129, p, 1, 1, 0, %131;\n}\n"                                                         \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), \
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), \
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), \
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), \
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), \
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),          \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),        \
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),        \
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),        \
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])         \
      : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(kTransB))
// d[128] (+)= A (64x16) * B (16x256), both from shared memory (descriptors);
// B K-major (kTransB 0) or MN-major (kTransB 1); accumulate 0 overwrites d.
template <typename T, int kTransB>
__device__ __forceinline__ void WgmmaN256(float (&d)[128], uint64_t a_desc, uint64_t b_desc,
                                          int accumulate) {
#ifdef JAX_MLA_SM90A
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    JAX_MLA_WGMMAN256_ASM("bf16");
  else
    JAX_MLA_WGMMAN256_ASM("f16");
#endif
}
#undef JAX_MLA_WGMMAN256_ASM

#define JAX_MLA_WGMMAN64_ASM(NAME)                                                                 \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." NAME "." NAME                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "    \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                         \
      "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                         \
      : "l"(a_desc), "l"(b_desc), "r"(accumulate))
// d[32] (+)= A (64x16) * B (16x64), both K-major from shared memory
// (descriptors); accumulate 0 overwrites d.
template <typename T>
__device__ __forceinline__ void WgmmaN64(float (&d)[32], uint64_t a_desc, uint64_t b_desc,
                                         int accumulate) {
#ifdef JAX_MLA_SM90A
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    JAX_MLA_WGMMAN64_ASM("bf16");
  else
    JAX_MLA_WGMMAN64_ASM("f16");
#endif
}
#undef JAX_MLA_WGMMAN64_ASM

#define JAX_MLA_WGMMAN64RS_ASM(NAME)                                                               \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." NAME "." NAME                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "    \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                         \
      "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(kTransB))
// d[32] (+)= A (64x16, from registers: the m16n8k16 A fragment of the warp's
// 16 rows) * B (16x64, shared memory); B K-major (kTransB 0) or MN-major
// (kTransB 1); accumulate 0 overwrites d. The backward's dK, dV and dQ
// products (attention_bwd_sm90_kernel.cuh).
template <typename T, int kTransB>
__device__ __forceinline__ void WgmmaN64RS(float (&d)[32], const uint32_t a[4], uint64_t b_desc,
                                           int accumulate) {
#ifdef JAX_MLA_SM90A
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    JAX_MLA_WGMMAN64RS_ASM("bf16");
  else
    JAX_MLA_WGMMAN64RS_ASM("f16");
#endif
}
#undef JAX_MLA_WGMMAN64RS_ASM

}  // namespace jax_mla::cuda
