// The mma.sync attention and MLA kernels run through the host emulator
// (mock/ffi/cuda/common/kernel_utils.cuh) against float64 loops:
//   forward     the forward kernel (attention_kernel.cuh), which the GPU tests
//               validate, so the emulator's fragment layouts are checked too;
//   bwd_*       the backward's KV and Q kernels (attention_bwd_kernel.cuh):
//               dq, dk, dv within two ulps of the inputs' type times the
//               gradient's magnitude, every element written, keys past kv_len
//               (NaN in k and v) exactly 0, rows that see no key dq = 0;
//   bwd90_*     the same for the sm_90a backward (attention_bwd_sm90_kernel.cuh,
//               256 threads, wgmma emulated by mock/ffi/cuda/common/wgmma.cuh
//               with its own model of the swizzled shared-memory layouts);
//   mla_paged   flash_mla's mma.sync kernel in 16-row blocks over pages
//               (mla_kernel.cuh): equal to its contiguous call bit for bit,
//               and skipped pages, against float64, with no table entry
//               past kv_len read; mla_paged_g4 the same in 64-row blocks.
//   quant_*     the kernel over 8-bit k and v (attention_quant_kernel.cuh),
//               each format pair, against float64 attention over the
//               dequantized caches with the query rounded to 8 bits
//               (quant_format.h): outputs within two ulps of the type times
//               max |v|, every element written, scales NaN past kv_len, rows
//               that see no key exactly 0 and LSE -inf; split-KV partials
//               merged here as the combine kernel merges them.
// Built by tests/test_cuda_emulator.py with the kernel headers' launchers
// (host code with <<<>>>) cut off into kernels.h. Usage: attention CASE...
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace jax_mla::cuda {
alignas(128) char smem[240000];  // the block's dynamic shared memory
}  // namespace jax_mla::cuda

namespace {

using jax_mla::AttentionBwdParams;
using jax_mla::AttentionParams;
using jax_mla::VisibleKeys;

// Runs kernel() as every block of `grid`, one block at a time, block_threads
// threads each; shared_bytes: the dynamic shared memory of a kernel in
// smem_raw (the sm_90a ones).
template <typename F>
void RunGrid(Dim3 grid, const F& kernel, unsigned block_threads = 128, size_t shared_bytes = 0) {
  gridDim = grid;
  emu::shared_bytes = shared_bytes;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::Block block{int(block_threads)};
        emu::block = &block;
        // Garbage, so a read of shared memory nothing wrote shows.
        memset(jax_mla::cuda::smem, 0x7f, sizeof(jax_mla::cuda::smem));
        memset(jax_mla::cuda::smem_raw, 0x7f, shared_bytes);  // past it, a read aborts
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block_threads; ++t)
          threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            blockIdx = {x, y, z};
            kernel();
          });
        for (auto& t : threads) t.join();
      }
}

template <typename T>
T Round(float f) {
  T v;
  v.x = std::is_same_v<T, __half> ? emu::HalfBits(f) : emu::Bf16Bits(f);
  return v;
}

template <typename T>
double F(T x) {
  return emu::ToFloat(x);
}

// [B, S, H, D] row-major index.
size_t At(int b, int s, int h, int d, int S, int H, int D) {
  return ((size_t(b) * S + s) * H + h) * D + d;
}

int Fails(const char* what, const std::vector<float>& got, const std::vector<double>& want,
          double ulp) {
  double magnitude = 1;
  for (double w : want) magnitude = std::max(magnitude, std::abs(w));
  const double tol = 2 * ulp * magnitude;
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      printf("  %s FAIL: element %zu is %g\n", what, i, got[i]);
      return 1;
    }
    const double e = std::abs(got[i] - want[i]) / (tol * (1 + std::abs(want[i]) / magnitude));
    if (e > worst) worst = e, at = i;
  }
  const bool ok = worst <= 1;
  printf("  %s %s: worst |diff| / tol %.3f", what, ok ? "ok" : "FAIL", worst);
  if (!got.empty()) printf(" (element %zu: %g, expected %g)", at, got[at], want[at]);
  printf("\n");
  return !ok;
}

struct Case {
  int B, Sq, Hq, Hkv, Skv;
  bool causal;
  std::vector<int> q_pos, kv_len;
};

// The backward's KV and Q kernels, mma.sync or (kSm90) sm_90a wgmma, against
// float64.
template <typename T, int Dk, int Dv, bool kSm90 = false>
int CheckBackward(const Case& c, uint64_t seed) {
  const int B = c.B, Sq = c.Sq, Hq = c.Hq, Hkv = c.Hkv, Skv = c.Skv, group = Hq / Hkv;
  std::vector<int> q_pos = c.q_pos, kv_len = c.kv_len;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  auto random = [&](size_t n) {
    std::vector<T> x(n);
    for (auto& e : x) e = Round<T>(normal(rng));
    return x;
  };
  std::vector<T> q = random(size_t(B) * Sq * Hq * Dk), k = random(size_t(B) * Skv * Hkv * Dk),
                 v = random(size_t(B) * Skv * Hkv * Dv), dout = random(size_t(B) * Sq * Hq * Dv);
  for (int b = 0; b < B; ++b)  // keys past kv_len do not exist: NaN shows a read
    for (int j = std::clamp(kv_len[b], 0, Skv); j < Skv; ++j)
      for (int h = 0; h < Hkv; ++h) {
        for (int d = 0; d < Dk; ++d) k[At(b, j, h, d, Skv, Hkv, Dk)] = Round<T>(NAN);
        for (int d = 0; d < Dv; ++d) v[At(b, j, h, d, Skv, Hkv, Dv)] = Round<T>(NAN);
      }
  const double scale = 1.0 / std::sqrt(double(Dk));
  // The contract in float64: lse, delta (with a random dlse), dq, dk, dv.
  std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(size_t(B) * Hq * Sq, -INFINITY), delta(lse.size());
  std::vector<int64_t> seen(size_t(B) * Sq);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Sq; ++i) {
      const int64_t n = VisibleKeys(int64_t(q_pos[b]) + i, kv_len[b], Skv, c.causal);
      seen[size_t(b) * Sq + i] = n;
      for (int h = 0; h < Hq; ++h) {
        const int hk = h / group;
        const size_t stat = (size_t(b) * Hq + h) * Sq + i;
        const float dlse = normal(rng);
        delta[stat] = dlse;  // kept on rows that see no key: the kernels must ignore it
        if (n == 0) continue;
        std::vector<double> s(n), p(n);
        double m = -INFINITY, total = 0, dot = 0;
        for (int j = 0; j < n; ++j) {
          double acc = 0;
          for (int d = 0; d < Dk; ++d)
            acc += F(q[At(b, i, h, d, Sq, Hq, Dk)]) * F(k[At(b, j, hk, d, Skv, Hkv, Dk)]);
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        for (int j = 0; j < n; ++j) total += std::exp(s[j] - m);
        lse[stat] = float(m + std::log(total));
        for (int j = 0; j < n; ++j) p[j] = std::exp(s[j] - lse[stat]);
        for (int d = 0; d < Dv; ++d) {
          double o = 0;
          for (int j = 0; j < n; ++j) o += p[j] * F(v[At(b, j, hk, d, Skv, Hkv, Dv)]);
          dot += o * F(dout[At(b, i, h, d, Sq, Hq, Dv)]);
        }
        delta[stat] = float(dot - dlse);
        for (int j = 0; j < n; ++j) {
          double dp = 0;
          for (int d = 0; d < Dv; ++d)
            dp += F(dout[At(b, i, h, d, Sq, Hq, Dv)]) * F(v[At(b, j, hk, d, Skv, Hkv, Dv)]);
          const double ds = p[j] * (dp - delta[stat]);
          for (int d = 0; d < Dk; ++d) {
            dq[At(b, i, h, d, Sq, Hq, Dk)] += scale * ds * F(k[At(b, j, hk, d, Skv, Hkv, Dk)]);
            dk[At(b, j, hk, d, Skv, Hkv, Dk)] += scale * ds * F(q[At(b, i, h, d, Sq, Hq, Dk)]);
          }
          for (int d = 0; d < Dv; ++d)
            dv[At(b, j, hk, d, Skv, Hkv, Dv)] += p[j] * F(dout[At(b, i, h, d, Sq, Hq, Dv)]);
        }
      }
    }

  // NaN first: an element no block writes fails.
  std::vector<float> gq(dq.size(), NAN), gk(dk.size(), NAN), gv(dv.size(), NAN);
  AttentionBwdParams p;
  p.batch = B, p.seq_q = Sq, p.heads_q = Hq, p.heads_kv = Hkv, p.seq_kv = Skv;
  p.dk = Dk, p.dv = Dv, p.scale = float(scale), p.causal = c.causal;
  p.q = q.data(), p.dout = dout.data();
  p.k.data = k.data(), p.v.data = v.data();
  p.k.batch_stride = int64_t(Skv) * Hkv * Dk, p.k.row_stride = Hkv * Dk, p.k.head_stride = Dk;
  p.v.batch_stride = int64_t(Skv) * Hkv * Dv, p.v.row_stride = Hkv * Dv, p.v.head_stride = Dv;
  p.lse = lse.data(), p.delta = delta.data(), p.q_pos = q_pos.data(), p.kv_len = kv_len.data();
  p.grad_q = gq.data(), p.grad_k = gk.data(), p.grad_v = gv.data();
  const unsigned bh = unsigned(B * Hkv);
  if constexpr (kSm90) {  // the grids of LaunchAttentionBwdSm90
    using Shape = jax_mla::cuda::AttnBwdSm90Shape<Dk, Dv>;
    if (Skv > 0)
      RunGrid(
          {unsigned((Skv + Shape::kKvKeys - 1) / Shape::kKvKeys), 1u, bh},
          [&] { jax_mla::cuda::AttentionBwdSm90KvKernel<T, Dk, Dv>(p); }, Shape::kThreads,
          Shape::kKvSmem);
    if (Sq * group > 0)
      RunGrid(
          {unsigned((Sq * group + Shape::kRows - 1) / Shape::kRows), 1u, bh},
          [&] { jax_mla::cuda::AttentionBwdSm90QKernel<T, Dk, Dv>(p); }, Shape::kThreads,
          Shape::kQSmem);
  } else {  // the grids of LaunchAttentionBwd
    using Shape = jax_mla::cuda::AttnBwdShape<Dk, Dv>;
    if (Skv > 0)
      RunGrid({unsigned((Skv + Shape::kKvKeys - 1) / Shape::kKvKeys), unsigned(Shape::kSplit), bh},
              [&] { jax_mla::cuda::AttentionBwdKvKernel<T, Dk, Dv>(p); });
    if (Sq * group > 0)
      RunGrid({unsigned((Sq * group + Shape::kRows - 1) / Shape::kRows), 1u, bh},
              [&] { jax_mla::cuda::AttentionBwdQKernel<T, Dk, Dv>(p); });
  }

  const double ulp = std::ldexp(1.0, std::is_same_v<T, __half> ? -10 : -7);
  int bad = Fails("dq", gq, dq, ulp) + Fails("dk", gk, dk, ulp) + Fails("dv", gv, dv, ulp);
  for (int b = 0; b < B; ++b) {
    for (int j = std::clamp(kv_len[b], 0, Skv); j < Skv; ++j)
      for (int h = 0; h < Hkv; ++h) {
        for (int d = 0; d < Dk; ++d) bad += gk[At(b, j, h, d, Skv, Hkv, Dk)] != 0.f;
        for (int d = 0; d < Dv; ++d) bad += gv[At(b, j, h, d, Skv, Hkv, Dv)] != 0.f;
      }
    for (int i = 0; i < Sq; ++i)
      if (seen[size_t(b) * Sq + i] == 0)
        for (int h = 0; h < Hq; ++h)
          for (int d = 0; d < Dk; ++d) bad += gq[At(b, i, h, d, Sq, Hq, Dk)] != 0.f;
  }
  if (bad) printf("  FAIL: %d checks (exact zeros included)\n", bad);
  return bad;
}

// The kernel over 8-bit caches: k and v in formats k_fmt / v_fmt (q8_0: a
// float16 scale per block of 32; q8_kv: a float32 scale per row), int8
// values uniform in [-127, 127], scales NaN past kv_len.
template <typename T, int Dk, int Dv>
int CheckQuant(const Case& c, jax_mla::QFormat k_fmt, jax_mla::QFormat v_fmt, int splits,
               uint64_t seed) {
  using jax_mla::QFormat;
  const int B = c.B, Sq = c.Sq, Hq = c.Hq, Hkv = c.Hkv, Skv = c.Skv, group = Hq / Hkv;
  std::vector<int> q_pos = c.q_pos, kv_len = c.kv_len;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> byte(-127, 127);
  std::uniform_real_distribution<float> uniform(0.005f, 0.02f);
  std::vector<T> q(size_t(B) * Sq * Hq * Dk);
  for (auto& e : q) e = Round<T>(normal(rng));
  // One cache: int8 values, raw scales (uint16 float16 bits or float32) and
  // their float values (NaN past kv_len).
  struct Cache {
    std::vector<int8_t> qs;
    std::vector<uint16_t> d16;
    std::vector<float> d32, scale;  // scale[(b, j, h, block)] as a float
    int per_row;                    // scales per row
  };
  auto make = [&](QFormat fmt, int D) {
    Cache x;
    x.per_row = fmt == QFormat::kQ8_0 ? D / 32 : 1;
    x.qs.resize(size_t(B) * Skv * Hkv * D);
    for (auto& e : x.qs) e = int8_t(byte(rng));
    x.scale.resize(size_t(B) * Skv * Hkv * x.per_row);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < Skv; ++j)
        for (int i = 0; i < Hkv * x.per_row; ++i) {
          const size_t at = (size_t(b) * Skv + j) * Hkv * x.per_row + i;
          const bool live = j < std::clamp(kv_len[b], 0, Skv);
          x.scale[at] = live ? uniform(rng) : NAN;
          if (fmt == QFormat::kQ8_0) {  // rounded to float16, the value the kernel reads
            x.d16.push_back(emu::HalfBits(x.scale[at]));
            x.scale[at] = F(__half{x.d16.back()});
          }
        }
    if (fmt != QFormat::kQ8_0) x.d32 = x.scale;
    return x;
  };
  Cache k = make(k_fmt, Dk), v = make(v_fmt, Dv);
  auto value = [&](const Cache& x, int D, int b, int j, int h, int d) {  // float32 d * q
    const float s = x.scale[(size_t(b) * Skv + j) * Hkv * x.per_row + h * x.per_row +
                            (x.per_row > 1 ? d / 32 : 0)];
    return double(s * float(x.qs[At(b, j, h, d, Skv, Hkv, D)]));
  };
  const float scale = 1.f / std::sqrt(float(Dk));

  AttentionParams p;
  p.batch = B, p.kv_batch = B, p.seq_q = Sq, p.heads_q = Hq, p.heads_kv = Hkv, p.seq_kv = Skv;
  p.dk = Dk, p.dv = Dv, p.scale = scale, p.causal = c.causal, p.num_splits = splits;
  p.q = q.data(),
  p.q_dtype = std::is_same_v<T, __half> ? jax_mla::DType::kF16 : jax_mla::DType::kBF16;
  for (auto [view, x, D, fmt] :
       {std::tuple{&p.k, &k, Dk, k_fmt}, std::tuple{&p.v, &v, Dv, v_fmt}}) {
    view->fmt = fmt;
    view->data = x->qs.data();
    view->batch_stride = int64_t(Skv) * Hkv * D, view->row_stride = Hkv * D, view->head_stride = D;
    view->scales = fmt == QFormat::kQ8_0 ? static_cast<const void*>(x->d16.data())
                                         : static_cast<const void*>(x->d32.data());
    view->scale_head_stride = x->per_row, view->scale_row_stride = Hkv * x->per_row;
    view->scale_batch_stride = int64_t(Skv) * Hkv * x->per_row;
  }
  // NaN first: an element no block writes fails.
  std::vector<T> out(size_t(B) * Sq * Hq * Dv, Round<T>(NAN));
  std::vector<float> lse(size_t(B) * Hq * Sq, NAN), part_out(out.size() * splits, NAN),
      part_lse(lse.size() * splits, NAN);
  p.q_pos = q_pos.data(), p.kv_len = kv_len.data(), p.out = out.data(), p.lse = lse.data();
  p.part_out = part_out.data(), p.part_lse = part_lse.data();
  RunGrid({unsigned((Sq * group + 63) / 64), unsigned(splits), unsigned(B * Hkv)},
          [&] { jax_mla::cuda::AttentionQuantKernel<T, Dk, Dv>(p); });

  // The split partials ([B, ns, Sq, Hq, *]) merged by their LSE, as the combine does.
  std::vector<double> got_out(out.size()), got_lse(lse.size());
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Sq; ++i)
      for (int h = 0; h < Hq; ++h) {
        const size_t row = (size_t(b) * Sq + i) * Hq + h, stat = (size_t(b) * Hq + h) * Sq + i;
        if (splits == 1) {
          got_lse[stat] = lse[stat];
          for (int d = 0; d < Dv; ++d) got_out[row * Dv + d] = F(out[row * Dv + d]);
          continue;
        }
        auto at = [&](int s) { return (size_t(b) * splits + s) * Sq * Hq + size_t(i) * Hq + h; };
        double m = -INFINITY, total = 0;
        for (int s = 0; s < splits; ++s) m = std::max(m, double(part_lse[at(s)]));
        for (int s = 0; s < splits; ++s)
          if (m > -INFINITY) total += std::exp(part_lse[at(s)] - m);
        got_lse[stat] = m > -INFINITY ? m + std::log(total) : -INFINITY;
        for (int d = 0; d < Dv; ++d) {
          double o = 0;
          for (int s = 0; s < splits; ++s)
            if (m > -INFINITY)
              o += std::exp(part_lse[at(s)] - got_lse[stat]) * part_out[at(s) * Dv + d];
          got_out[row * Dv + d] = o;
        }
      }

  double worst_out = 0, worst_lse = 0, v_max = 0;
  int bad = 0;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Sq; ++i) {
      const int64_t n = VisibleKeys(int64_t(q_pos[b]) + i, kv_len[b], Skv, c.causal);
      for (int h = 0; h < Hq; ++h) {
        const int hk = h / group;
        const size_t row = (size_t(b) * Sq + i) * Hq + h, stat = (size_t(b) * Hq + h) * Sq + i;
        if (n == 0) {  // exactly 0 and -inf
          bad += !(got_lse[stat] == -INFINITY);
          for (int d = 0; d < Dv; ++d) bad += !(got_out[row * Dv + d] == 0.0);
          continue;
        }
        // The query as the kernels take it (RoundQueryToQ8's arithmetic).
        std::vector<double> qr(Dk);
        for (int blk = 0; blk < Dk / 32; ++blk) {
          float x[32], amax = 0.f;
          for (int e = 0; e < 32; ++e) {
            x[e] = F(q[At(b, i, h, blk * 32 + e, Sq, Hq, Dk)]) * scale;
            amax = std::max(amax, std::fabs(x[e]));
          }
          const float dq = amax / 127.f, id = dq != 0.f ? 1.f / dq : 0.f;
          for (int e = 0; e < 32; ++e) qr[blk * 32 + e] = double(dq) * std::round(x[e] * id);
        }
        std::vector<double> s(n);
        double m = -INFINITY, total = 0;
        for (int j = 0; j < n; ++j) {
          double acc = 0;
          for (int d = 0; d < Dk; ++d) acc += qr[d] * value(k, Dk, b, j, hk, d);
          s[j] = acc;
          m = std::max(m, acc);
        }
        for (int j = 0; j < n; ++j) total += std::exp(s[j] - m);
        worst_lse = std::max(worst_lse, std::abs(got_lse[stat] - (m + std::log(total))));
        for (int d = 0; d < Dv; ++d) {
          double o = 0;
          for (int j = 0; j < n; ++j) {
            const double vj = value(v, Dv, b, j, hk, d);
            v_max = std::max(v_max, std::abs(vj));
            o += std::exp(s[j] - m) / total * vj;
          }
          const double e = std::abs(got_out[row * Dv + d] - o);
          worst_out = std::isnan(e) ? INFINITY : std::max(worst_out, e);
        }
      }
    }
  // P and V are rounded to T on the tensor cores: two ulps of T times max |v|.
  const double tol = 2 * std::ldexp(1.0, std::is_same_v<T, __half> ? -10 : -7) * v_max;
  const bool ok = worst_out <= tol && worst_lse <= 1e-4 && bad == 0;
  printf("  out %g (tol %g), lse %g, exact-zero failures %d: %s\n", worst_out, tol, worst_lse, bad,
         ok ? "ok" : "FAIL");
  return !ok;
}

// The forward 192/128 bf16 kernel, causal GQA, against float64 attention.
int CheckForward() {
  using T = __nv_bfloat16;
  constexpr int Dk = 192, Dv = 128;
  const int B = 1, Sq = 37, Hq = 2, Hkv = 1, Skv = 70;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  auto random = [&](size_t n) {
    std::vector<T> x(n);
    for (auto& e : x) e = Round<T>(normal(rng));
    return x;
  };
  std::vector<T> q = random(B * Sq * Hq * Dk), k = random(B * Skv * Hkv * Dk),
                 v = random(B * Skv * Hkv * Dv), out(B * Sq * Hq * Dv);
  std::vector<float> lse(B * Hq * Sq);
  std::vector<int> q_pos{Skv - Sq}, kv_len{Skv};
  AttentionParams p;
  p.batch = B, p.kv_batch = B, p.seq_q = Sq, p.heads_q = Hq, p.heads_kv = Hkv, p.seq_kv = Skv;
  p.dk = Dk, p.dv = Dv, p.scale = 1.f / std::sqrt(float(Dk)), p.causal = true;
  p.q = q.data(), p.k.data = k.data(), p.v.data = v.data();
  p.k.batch_stride = Skv * Hkv * Dk, p.k.row_stride = Hkv * Dk, p.k.head_stride = Dk;
  p.v.batch_stride = Skv * Hkv * Dv, p.v.row_stride = Hkv * Dv, p.v.head_stride = Dv;
  p.q_pos = q_pos.data(), p.kv_len = kv_len.data(), p.out = out.data(), p.lse = lse.data();
  RunGrid({unsigned((Sq * Hq / Hkv + 63) / 64), 1u, unsigned(B * Hkv)},
          [&] { jax_mla::cuda::AttentionKernel<T, Dk, Dv, /*kPaged=*/false>(p); });
  double worst = 0;
  for (int i = 0; i < Sq; ++i)
    for (int h = 0; h < Hq; ++h) {
      const int n = q_pos[0] + i + 1;
      std::vector<double> s(n);
      double m = -INFINITY, total = 0;
      for (int j = 0; j < n; ++j) {
        double acc = 0;
        for (int d = 0; d < Dk; ++d) acc += F(q[At(0, i, h, d, Sq, Hq, Dk)]) * F(k[j * Dk + d]);
        s[j] = acc * p.scale;
        m = std::max(m, s[j]);
      }
      for (int j = 0; j < n; ++j) total += std::exp(s[j] - m);
      worst = std::max(worst, std::abs(lse[h * Sq + i] - (m + std::log(total))));
      for (int d = 0; d < Dv; ++d) {
        double o = 0;
        for (int j = 0; j < n; ++j) o += std::exp(s[j] - m) / total * F(v[j * Dv + d]);
        worst = std::max(worst, std::abs(F(out[At(0, i, h, d, Sq, Hq, Dv)]) - o));
      }
    }
  // Two bf16 ulps of outputs up to about 3 in magnitude.
  const bool ok = worst < 2e-2;
  printf("  out, lse %s: max |diff| %g\n", ok ? "ok" : "FAIL", worst);
  return !ok;
}

// One run of flash_mla's mma.sync kernel in blocks of 16 G rows (the float
// source, mla_kernel.cuh) over a cache: contiguous [B, Skv, 576] or, with a
// table, pages [num_pages, page, 576]; out and lse, or the split partials.
struct MlaRun {
  std::vector<__nv_bfloat16> out;
  std::vector<float> lse, part_out, part_lse;
};
template <int G, bool kPaged>
MlaRun RunMla(const std::vector<__nv_bfloat16>& q, const std::vector<__nv_bfloat16>& kv, int B,
              int H, int Skv, std::vector<int> kv_len, int num_splits,
              const std::vector<int32_t>* table = nullptr, int page = 0, int num_pages = 0) {
  using jax_mla::cuda::kMlaDk;
  using jax_mla::cuda::kMlaDv;
  MlaRun r;
  r.out.assign(size_t(B) * H * kMlaDv, Round<__nv_bfloat16>(NAN));
  r.lse.assign(size_t(B) * H, NAN);
  if (num_splits > 1) {
    r.part_out.assign(size_t(B) * num_splits * H * kMlaDv, NAN);
    r.part_lse.assign(size_t(B) * num_splits * H, NAN);
  }
  std::vector<int> q_pos(B, 0);
  AttentionParams p;
  p.batch = B, p.kv_batch = B, p.seq_q = 1, p.heads_q = H, p.heads_kv = 1, p.seq_kv = Skv;
  p.dk = kMlaDk, p.dv = kMlaDv, p.scale = 1.f / 24.f, p.causal = false, p.v_in_k = 0;
  p.q = q.data(), p.k.data = kv.data();
  p.k.batch_stride = int64_t(kPaged ? page : Skv) * kMlaDk;
  p.k.row_stride = kMlaDk, p.k.head_stride = kMlaDk;
  if (kPaged) {
    p.k.block_table = table->data(), p.k.page_size = page, p.k.max_pages = Skv / page;
    p.k.num_pages = num_pages;
  }
  p.v = p.k;
  p.q_pos = q_pos.data(), p.kv_len = kv_len.data(), p.out = r.out.data(), p.lse = r.lse.data();
  p.num_splits = num_splits, p.part_out = r.part_out.data(), p.part_lse = r.part_lse.data();
  using Src = jax_mla::cuda::MlaFloatTiles<__nv_bfloat16, G, kPaged>;
  RunGrid(
      {unsigned((H + 16 * G - 1) / (16 * G)), unsigned(num_splits), unsigned(B)},
      [&] { jax_mla::cuda::MlaTileKernel<Src>(p); }, 128 * G);
  return r;
}

template <typename U>
bool SameBits(const std::vector<U>& a, const std::vector<U>& b) {
  return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(U)) == 0;
}

// flash_mla's mma.sync kernel (the float source, 16 G heads: one block of
// 16 G rows, G = 1 or 4), bf16, against float64 attention over the live keys,
// and over pages of the given sizes in a shuffled pool (NaN in every slot no
// live key occupies): bit-identical to the contiguous call with 1 and 3 splits
// (3: the partials compared), then with table entries out of range below
// kv_len (skipped keys; a row whose every page is skipped gives 0 and LSE
// -inf) against float64. Rows of ~170 keys: more tiles than pipeline stages;
// pages of 16 (two a tile), 32 (one) or 128 (four tiles a page); kv_len
// mid-page and mid-tile. (A block is 128 G host threads: the emulation is slow.)
template <int G>
int CheckMlaPaged(std::vector<int> page_sizes) {
  using T = __nv_bfloat16;
  using jax_mla::cuda::kMlaDk;
  using jax_mla::cuda::kMlaDv;
  const int B = 3, H = 16 * G;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  int bad = 0;
  // float64 attention of batch row b over the keys live[b][j] of rows.
  auto check = [&](const char* what, const MlaRun& got, const std::vector<T>& q,
                   const std::vector<T>& rows, int Skv,
                   const std::vector<std::vector<bool>>& live) {
    double worst = 0;
    int wrong_empty = 0;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        std::vector<double> s;
        std::vector<int> keys;
        double m = -INFINITY, total = 0;
        for (int j = 0; j < Skv; ++j) {
          if (!live[b][j]) continue;
          double acc = 0;
          for (int d = 0; d < kMlaDk; ++d)
            acc += F(q[(size_t(b) * H + h) * kMlaDk + d]) *
                   F(rows[(size_t(b) * Skv + j) * kMlaDk + d]);
          s.push_back(acc / 24.0);
          keys.push_back(j);
          m = std::max(m, s.back());
        }
        const float lse = got.lse[b * H + h];
        if (keys.empty()) {  // no key: output 0, LSE -inf
          wrong_empty += !(lse == -INFINITY);
          for (int d = 0; d < kMlaDv; ++d)
            wrong_empty += F(got.out[(size_t(b) * H + h) * kMlaDv + d]) != 0;
          continue;
        }
        for (double x : s) total += std::exp(x - m);
        worst = std::max(worst, std::abs(lse - (m + std::log(total))));
        for (int d = 0; d < kMlaDv; ++d) {
          double o = 0;
          for (size_t i = 0; i < keys.size(); ++i)
            o += std::exp(s[i] - m) / total * F(rows[(size_t(b) * Skv + keys[i]) * kMlaDk + d]);
          const double g = F(got.out[(size_t(b) * H + h) * kMlaDv + d]);
          worst = std::max(worst, std::isfinite(g) ? std::abs(g - o) : INFINITY);
        }
      }
    // Two bf16 ulps of outputs up to about 3 in magnitude (as the forward).
    const bool ok = worst < 2e-2 && wrong_empty == 0;
    printf("  %s %s: max |diff| %g, empty rows wrong %d\n", what, ok ? "ok" : "FAIL", worst,
           wrong_empty);
    return ok ? 0 : 1;
  };
  for (int page : page_sizes) {
    // About 100 keys: pages of 16 make tiles span pages, pages of 128 hold
    // several tiles; longer rows only cost emulation time.
    const int max_pages = (100 + page - 1) / page, Skv = max_pages * page;
    const std::vector<int> kv_len{Skv, Skv / 2 + 3, 37};
    std::vector<T> q(size_t(B) * H * kMlaDk), kv(size_t(B) * Skv * kMlaDk);
    for (auto& e : q) e = Round<T>(normal(rng));
    for (int b = 0; b < B; ++b)  // keys past kv_len do not exist: NaN shows a read
      for (int j = 0; j < Skv; ++j)
        for (int d = 0; d < kMlaDk; ++d)
          kv[(size_t(b) * Skv + j) * kMlaDk + d] = Round<T>(j < kv_len[b] ? normal(rng) : NAN);
    // The pages in a shuffled pool of 2 spare pages (NaN); entries of pages no
    // key below kv_len reaches are emu::kUnreadEntry (a read aborts).
    const int num_pages = B * max_pages + 2;
    std::vector<int32_t> order(num_pages), table(size_t(B) * max_pages);
    for (int i = 0; i < num_pages; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<T> pool(size_t(num_pages) * page * kMlaDk, Round<T>(NAN));
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < max_pages; ++j) {
        const int32_t at = order[b * max_pages + j];
        memcpy(&pool[size_t(at) * page * kMlaDk], &kv[(size_t(b) * Skv + j * page) * kMlaDk],
               size_t(page) * kMlaDk * sizeof(T));
        table[b * max_pages + j] = j * page < kv_len[b] ? at : emu::kUnreadEntry;
      }
    std::vector<std::vector<bool>> live(B, std::vector<bool>(Skv));
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < Skv; ++j) live[b][j] = j < kv_len[b];
    printf(" page %d\n", page);
    const MlaRun contiguous = RunMla<G, false>(q, kv, B, H, Skv, kv_len, 1);
    bad += check("contiguous vs float64", contiguous, q, kv, Skv, live);
    const MlaRun paged = RunMla<G, true>(q, pool, B, H, Skv, kv_len, 1, &table, page, num_pages);
    const bool same1 = SameBits(paged.out, contiguous.out) && SameBits(paged.lse, contiguous.lse);
    printf("  paged == contiguous, 1 split: %s\n", same1 ? "ok" : "FAIL");
    bad += !same1;
    if (page == page_sizes.front()) {  // split-KV over pages: the first page size only
      const MlaRun c3 = RunMla<G, false>(q, kv, B, H, Skv, kv_len, 3);
      const MlaRun p3 = RunMla<G, true>(q, pool, B, H, Skv, kv_len, 3, &table, page, num_pages);
      const bool same3 = SameBits(p3.part_out, c3.part_out) && SameBits(p3.part_lse, c3.part_lse);
      printf("  paged == contiguous, 3 splits (partials): %s\n", same3 ? "ok" : "FAIL");
      bad += !same3;
    }
    // Skipped pages below kv_len: row 0 its second page, row 1 its first, row
    // 2 every page (no key left).
    std::vector<int32_t> holes = table;
    holes[0 * max_pages + 1] = -7;
    holes[1 * max_pages + 0] = num_pages;
    for (int j = 0; j * page < kv_len[2]; ++j) holes[2 * max_pages + j] = j % 2 ? -1 : 1 << 30;
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < Skv; ++j) {
        const int32_t e = holes[b * max_pages + j / page];
        live[b][j] = j < kv_len[b] && e >= 0 && e < num_pages;
      }
    const MlaRun skipped = RunMla<G, true>(q, pool, B, H, Skv, kv_len, 1, &holes, page, num_pages);
    bad += check("skipped pages vs float64", skipped, q, kv, Skv, live);
  }
  if (bad) printf("  FAIL: %d checks\n", bad);
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  using BF16 = __nv_bfloat16;
  constexpr auto kQ8_0 = jax_mla::QFormat::kQ8_0, kQ8KV = jax_mla::QFormat::kQ8KV;
  int bad = 0;
  for (int a = 1; a < argc; ++a) {
    const std::string name = argv[a];
    printf("%s\n", name.c_str());
    if (name == "forward") {
      bad += CheckForward();
    } else if (name == "bwd_64x64") {  // GQA 2, q_pos < 0 (empty rows), a batch row without keys
      bad += CheckBackward<BF16, 64, 64>({2, 37, 4, 2, 70, true, {-5, 3}, {70, 0}}, 1);
    } else if (name == "bwd_64x64_f16") {  // not causal, kv_len inside the second key block
      bad += CheckBackward<__half, 64, 64>({2, 9, 2, 2, 130, false, {0, 0}, {130, 65}}, 2);
    } else if (name == "bwd_192x128") {  // GQA 4 over one KV head, Sq < Skv
      bad += CheckBackward<BF16, 192, 128>({1, 19, 4, 1, 67, true, {48}, {67}}, 3);
    } else if (name == "bwd_128x128_f16") {  // more than one row tile of each kernel
      bad += CheckBackward<__half, 128, 128>({1, 70, 1, 1, 70, true, {0}, {70}}, 5);
    } else if (name == "bwd_128x128_gqa3") {  // group 3: rows of a position span row tiles
      bad += CheckBackward<BF16, 128, 128>({2, 23, 6, 2, 50, true, {27, -4}, {50, 31}}, 6);
    } else if (name == "bwd_256x256") {  // the column split, kv_len < Skv
      bad += CheckBackward<BF16, 256, 256>({2, 5, 2, 1, 40, true, {30, 2}, {35, 3}}, 4);
    } else if (name == "bwd90_192x128") {  // GQA 2, q_pos > 0, kv_len mid-block, 2 row tiles
      bad +=
          CheckBackward<BF16, 192, 128, true>({2, 70, 4, 2, 300, true, {129, 230}, {300, 255}}, 21);
    } else if (name == "bwd90_192x128_f16") {  // not causal: kv_len 0 and short; MQA group 6
      bad += CheckBackward<__half, 192, 128, true>({2, 50, 4, 2, 260, false, {0, 0}, {0, 131}}, 22);
      bad += CheckBackward<__half, 192, 128, true>({1, 19, 6, 1, 133, false, {0}, {133}}, 23);
    } else if (name == "bwd90_128x128") {  // group 3 (a position's rows span steps), q_pos < 0
      bad += CheckBackward<BF16, 128, 128, true>({2, 23, 6, 2, 50, true, {27, -4}, {50, 31}}, 24);
      bad +=
          CheckBackward<BF16, 128, 128, true>({2, 70, 4, 2, 140, true, {-33, -70}, {140, 140}}, 25);
    } else if (name == "bwd90_128x128_f16") {  // Sq = 1 under GQA 8, kv_len 1; ragged tiles
      bad += CheckBackward<__half, 128, 128, true>(
          {3, 1, 16, 2, 390, true, {389, 127, 0}, {390, 128, 1}}, 26);
      bad += CheckBackward<__half, 128, 128, true>({1, 133, 2, 2, 261, true, {0}, {261}}, 27);
    } else if (name == "mla_paged") {  // 16-row blocks
      bad += CheckMlaPaged<1>({16, 32, 128});
    } else if (name == "mla_paged_g4") {  // 64-row blocks: 512 threads, a barrier per row group
      bad += CheckMlaPaged<4>({16});
    } else if (name == "quant_q8_0") {  // GQA 4, causal prefill, a short row, two row tiles
      bad += CheckQuant<BF16, 192, 128>({2, 37, 8, 2, 70, true, {33, -5}, {70, 33}}, kQ8_0, kQ8_0,
                                        1, 7);
    } else if (name == "quant_q8_kv") {  // MHA, not causal, kv_len inside the second tile
      bad += CheckQuant<__half, 192, 128>({1, 9, 2, 2, 130, false, {0}, {65}}, kQ8KV, kQ8KV, 1, 8);
    } else if (name == "quant_mixed") {  // GQA 16 (4 positions a block), both mixed pairs
      bad += CheckQuant<__half, 192, 128>({1, 5, 16, 1, 77, true, {72}, {77}}, kQ8_0, kQ8KV, 1, 9);
      bad += CheckQuant<BF16, 192, 128>({2, 5, 16, 1, 77, true, {40, -2}, {77, 50}}, kQ8KV, kQ8_0,
                                        1, 10);
    } else if (name ==
               "quant_splits") {  // decode split 3 ways (one split empty), a row with no key
      bad += CheckQuant<BF16, 192, 128>({2, 1, 4, 4, 200, true, {199, 0}, {200, 0}}, kQ8_0, kQ8KV,
                                        3, 11);
    } else {
      printf("unknown case\n");
      ++bad;
    }
  }
  printf(bad ? "FAILED\n" : "all ok\n");
  return bad != 0;
}
