#include "ffi/cpu/flash.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace jax_mla::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool NanFillRequested() {
  const char* env = std::getenv("JAX_MLA_DEBUG_NAN_FILL");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
}

void FillNaN(void* data, DType dtype, int64_t n) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(data, i, dtype, nan);
}

// How the problem is cut into work items: (b, kv head, head chunk, query chunk, split).
struct Plan {
  int64_t group;        // query heads per KV head
  int64_t heads_blk;    // heads of the group per block
  int64_t n_head_blk;
  int64_t pos_blk;      // query positions per block
  int64_t n_pos_blk;
  int64_t split_len;    // keys per split
  int64_t items;
  int64_t max_rows;     // rows of the largest block
};

Plan MakePlan(const AttentionParams& p) {
  Plan plan{};
  if (p.batch == 0 || p.seq_q == 0 || p.heads_q == 0) return plan;  // nothing to compute
  plan.group = p.heads_q / p.heads_kv;
  plan.heads_blk = std::min(plan.group, kMaxHeadsPerBlock);
  plan.n_head_blk = CeilDiv(plan.group, plan.heads_blk);
  plan.pos_blk = std::max<int64_t>(1, std::min(p.seq_q, kTargetRows / plan.heads_blk));
  plan.n_pos_blk = CeilDiv(p.seq_q, plan.pos_blk);
  plan.split_len = p.num_splits > 1 ? p.split_len : std::max<int64_t>(p.seq_kv, 1);
  plan.items = p.batch * p.heads_kv * plan.n_head_blk * plan.n_pos_blk * p.num_splits;
  plan.max_rows = plan.heads_blk * plan.pos_blk;
  return plan;
}

// Per-thread scratch, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> q, o, m, l, kernel;
  std::vector<int64_t> end;
  void Reserve(int64_t rows, int64_t dk, int64_t dv) {
    auto grow = [](auto& v, size_t n) {
      if (v.size() < n) v.resize(n);
    };
    grow(q, size_t(rows * dk));
    grow(o, size_t(rows * dv));
    grow(m, size_t(rows));
    grow(l, size_t(rows));
    grow(end, size_t(rows));
    grow(kernel, AttendScratchFloats(dk, dv, rows));
  }
};

void RunItem(const AttentionParams& p, const Plan& plan, const KernelTable& kern, int64_t item) {
  // Split innermost, so consecutive items share query rows (cache-warm q).
  int64_t rest = item;
  const int64_t s = rest % p.num_splits;
  rest /= p.num_splits;
  const int64_t pb = rest % plan.n_pos_blk;
  rest /= plan.n_pos_blk;
  const int64_t hb = rest % plan.n_head_blk;
  rest /= plan.n_head_blk;
  const int64_t hkv = rest % p.heads_kv;
  const int64_t b = rest / p.heads_kv;

  const int64_t i0 = pb * plan.pos_blk, i1 = std::min(p.seq_q, i0 + plan.pos_blk);
  const int64_t g0 = hb * plan.heads_blk, g1 = std::min(plan.group, g0 + plan.heads_blk);
  const int64_t kv0 = std::min(p.seq_kv, s * plan.split_len);
  const int64_t kv1 = std::min(p.seq_kv, kv0 + plan.split_len);
  const int64_t dk = p.dk, dv = p.dv;

  thread_local Scratch scratch;
  scratch.Reserve(plan.max_rows, dk, dv);

  // Rows are position-major: (i, g) -> (i - i0) * (g1 - g0) + (g - g0).
  const int64_t n_rows = (i1 - i0) * (g1 - g0);
  const int64_t q_elem = DTypeBytes(p.q_dtype);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t pos = int64_t(p.q_pos[b]) + i;
    const int64_t visible = VisibleKeys(pos, p.kv_len[b], p.seq_kv, p.causal);
    const int64_t end = std::max(kv0, std::min(visible, kv1));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r = (i - i0) * (g1 - g0) + (g - g0);
      const int64_t h = hkv * plan.group + g;
      const char* src = static_cast<const char*>(p.q) + ((b * p.seq_q + i) * p.heads_q + h) * dk * q_elem;
      float* q = scratch.q.data() + r * dk;
      kern.to_float(src, p.q_dtype, q, dk);
      for (int64_t d = 0; d < dk; ++d) q[d] *= p.scale;
      scratch.end[r] = end;
      scratch.m[r] = kNegInf;
      scratch.l[r] = 0.f;
    }
  }
  std::fill_n(scratch.o.data(), n_rows * dv, 0.f);

  const int64_t k_bytes = DTypeBytes(p.k.dtype), v_bytes = DTypeBytes(p.v.dtype);
  KvRows k{static_cast<const char*>(p.k.data) + (b * p.k.batch_stride + hkv * p.k.head_stride) * k_bytes,
           p.k.dtype, p.k.row_stride};
  KvRows v{static_cast<const char*>(p.v.data) + (b * p.v.batch_stride + hkv * p.v.head_stride) * v_bytes,
           p.v.dtype, p.v.row_stride};
  RowBlock block{n_rows, scratch.q.data(), scratch.end.data(), scratch.o.data(), scratch.m.data(),
                 scratch.l.data()};
  if (kv1 > kv0) kern.attend(block, k, v, p.v_in_k, dk, dv, kv0, scratch.kernel.data());

  // Normalize and write: straight to the outputs, or to the split partials.
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r = (i - i0) * (g1 - g0) + (g - g0);
      const int64_t h = hkv * plan.group + g;
      const float l = scratch.l[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float lse = l > 0.f ? scratch.m[r] + std::log(l) : kNegInf;
      const float* o = scratch.o.data() + r * dv;
      if (p.num_splits == 1) {
        const int64_t base = ((b * p.seq_q + i) * p.heads_q + h) * dv;
        for (int64_t d = 0; d < dv; ++d) StoreFromFloat(p.out, base + d, p.q_dtype, o[d] * inv);
        p.lse[(b * p.heads_q + h) * p.seq_q + i] = lse;
      } else {
        const int64_t row = ((b * p.num_splits + s) * p.seq_q + i) * p.heads_q + h;
        float* dst = p.part_out + row * dv;
        for (int64_t d = 0; d < dv; ++d) dst[d] = o[d] * inv;
        p.part_lse[row] = lse;
      }
    }
  }
}

// Merges the split partials of every (b, i, h) by their LSE.
void Combine(const AttentionParams& p) {
  const int64_t ns = p.num_splits, dv = p.dv;
  std::vector<float> acc(static_cast<size_t>(dv));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.seq_q; ++i) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        auto row = [&](int64_t s) { return ((b * ns + s) * p.seq_q + i) * p.heads_q + h; };
        float mx = kNegInf;
        for (int64_t s = 0; s < ns; ++s) mx = std::max(mx, p.part_lse[row(s)]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float total = 0.f;
        if (mx != kNegInf) {
          for (int64_t s = 0; s < ns; ++s) {
            const float w = std::exp(p.part_lse[row(s)] - mx);  // 0 for an empty split
            if (w == 0.f) continue;
            total += w;
            const float* src = p.part_out + row(s) * dv;
            for (int64_t d = 0; d < dv; ++d) acc[d] += w * src[d];
          }
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        const int64_t base = ((b * p.seq_q + i) * p.heads_q + h) * dv;
        for (int64_t d = 0; d < dv; ++d) StoreFromFloat(p.out, base + d, p.q_dtype, acc[d] * inv);
        p.lse[(b * p.heads_q + h) * p.seq_q + i] = total > 0.f ? mx + std::log(total) : kNegInf;
      }
    }
  }
}

}  // namespace

const KernelTable* CurrentKernels(ffi::Error* error) {
  std::string select_error;
  const KernelTable* table = SelectKernels(&select_error);
  if (table == nullptr) *error = ffi::Error(ffi::ErrorCode::kInvalidArgument, select_error);
  return table;
}

ffi::Future RunFlash(const AttentionParams& params, const KernelTable& kernels,
                     ffi::ThreadPool pool) {
  const AttentionParams p = params;
  const int64_t out_elems = p.batch * p.seq_q * p.heads_q * p.dv;
  if (NanFillRequested()) {
    FillNaN(p.out, p.q_dtype, out_elems);
    FillNaN(p.lse, DType::kF32, p.batch * p.heads_q * p.seq_q);
    if (p.num_splits > 1) {
      FillNaN(p.part_out, DType::kF32, out_elems * p.num_splits);
      FillNaN(p.part_lse, DType::kF32, p.batch * p.seq_q * p.heads_q * p.num_splits);
    }
  }
  const Plan plan = MakePlan(p);
  const KernelTable* kern = &kernels;
  return ParallelFor(
      pool, plan.items, /*max_tasks=*/plan.items,
      [p, plan, kern](int64_t item) { RunItem(p, plan, *kern, item); },
      [p] {
        if (p.num_splits > 1) Combine(p);
      });
}

}  // namespace jax_mla::cpu
