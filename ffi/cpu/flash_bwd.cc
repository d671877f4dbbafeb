#include "ffi/cpu/flash_bwd.h"

#include <algorithm>
#include <string>
#include <vector>

#include "ffi/cpu/flash.h"
#include "ffi/cpu/kernels.h"
#include "ffi/cpu/scratch.h"

namespace jax_mla::cpu {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work items, each the only writer of its result rows: dQ of a block of
// kBwdRows positions of one (batch, query head), then dK and dV of a block
// of kBwdKeys keys of one (batch, KV head). Block index outermost, in the
// order that puts the costliest items first under causal masking (the last
// query blocks see the most keys, the first key blocks the most queries), so
// that the pool's threads finish together.
struct BwdPlan {
  int64_t q_blocks = 0;   // per (batch, query head)
  int64_t kv_blocks = 0;  // per (batch, KV head)
  int64_t q_items = 0;
  int64_t kv_items = 0;
};

BwdPlan MakeBwdPlan(const AttentionBwdParams& p) {
  BwdPlan plan;
  plan.q_blocks = CeilDiv(p.seq_q, kBwdRows);
  plan.kv_blocks = CeilDiv(p.seq_kv, kBwdKeys);
  plan.q_items = p.batch * p.heads_q * plan.q_blocks;
  plan.kv_items = p.batch * p.heads_kv * plan.kv_blocks;
  return plan;
}

struct BwdScratch {
  std::vector<float> kernel;
  std::vector<int64_t> end;
  std::vector<BwdQuery> heads;
};

// end[i - i0] for positions [i0, i1) of batch row b: the keys each sees.
void VisibleEnds(const AttentionBwdParams& p, int64_t b, int64_t i0, int64_t i1, int64_t* end) {
  for (int64_t i = i0; i < i1; ++i)
    end[i - i0] = VisibleKeys(int64_t(p.q_pos[b]) + i, p.kv_len[b], p.seq_kv, p.causal);
}

BwdQuery QueryOf(const AttentionBwdParams& p, int64_t b, int64_t h) {
  BwdQuery q;
  const int64_t row = b * p.seq_q * p.heads_q + h;  // position 0's row of [B, Sq, Hq]
  q.q = static_cast<const char*>(p.q) + row * p.dk * DTypeBytes(p.q_dtype);
  q.q_dtype = p.q_dtype;
  q.q_stride = p.heads_q * p.dk;
  q.dout = static_cast<const char*>(p.dout) + row * p.dv * DTypeBytes(p.dout_dtype);
  q.dout_dtype = p.dout_dtype;
  q.dout_stride = p.heads_q * p.dv;
  q.lse = p.lse + (b * p.heads_q + h) * p.seq_q;
  q.delta = p.delta + (b * p.heads_q + h) * p.seq_q;
  return q;
}

void RunQItem(const AttentionBwdParams& p, const BwdPlan& plan, const KernelTable& kern,
              int64_t item, BwdScratch& s) {
  const int64_t per_block = p.batch * p.heads_q;
  const int64_t qb = plan.q_blocks - 1 - item / per_block;
  const int64_t b = item % per_block / p.heads_q, h = item % p.heads_q;
  const int64_t hkv = h / (p.heads_q / p.heads_kv);
  const int64_t i0 = qb * kBwdRows, i1 = std::min(p.seq_q, i0 + kBwdRows);
  Grow(s.end, size_t(p.seq_q));
  // The kernel indexes end by position.
  VisibleEnds(p, b, i0, i1, s.end.data() + i0);
  Grow(s.kernel, BwdQScratchFloats(p.dk, p.dv));
  float* grad_q = p.grad_q + (b * p.seq_q * p.heads_q + h) * p.dk;
  kern.attend_bwd_q(QueryOf(p, b, h), s.end.data(), i0, i1, RowsOf(p.k, b, hkv),
                    RowsOf(p.v, b, hkv), p.dk, p.dv, p.scale, grad_q, p.heads_q * p.dk,
                    s.kernel.data());
}

void RunKvItem(const AttentionBwdParams& p, const BwdPlan& plan, const KernelTable& kern,
               int64_t item, BwdScratch& s) {
  const int64_t per_block = p.batch * p.heads_kv;
  const int64_t kb = item / per_block;
  const int64_t b = item % per_block / p.heads_kv, hkv = item % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t kv_len = std::clamp<int64_t>(p.kv_len[b], 0, p.seq_kv);
  const int64_t j0 = kb * kBwdKeys, j_end = std::min(p.seq_kv, j0 + kBwdKeys);
  const int64_t j1 = std::clamp(kv_len, j0, j_end);  // keys of the block that exist
  float* grad_k = p.grad_k + (b * p.seq_kv * p.heads_kv + hkv) * p.dk;
  float* grad_v = p.grad_v + (b * p.seq_kv * p.heads_kv + hkv) * p.dv;
  const int64_t gk_stride = p.heads_kv * p.dk, gv_stride = p.heads_kv * p.dv;
  for (int64_t j = j1; j < j_end; ++j) {
    std::fill_n(grad_k + j * gk_stride, p.dk, 0.f);
    std::fill_n(grad_v + j * gv_stride, p.dv, 0.f);
  }
  if (j1 == j0) return;
  Grow(s.end, size_t(p.seq_q));
  VisibleEnds(p, b, 0, p.seq_q, s.end.data());
  Grow(s.heads, size_t(group));
  for (int64_t g = 0; g < group; ++g) s.heads[size_t(g)] = QueryOf(p, b, hkv * group + g);
  Grow(s.kernel, BwdKvScratchFloats(p.dk, p.dv));
  kern.attend_bwd_kv(s.heads.data(), group, s.end.data(), p.seq_q, RowsOf(p.k, b, hkv),
                     RowsOf(p.v, b, hkv), p.dk, p.dv, p.scale, j0, j1, grad_k, gk_stride, grad_v,
                     gv_stride, s.kernel.data());
}

}  // namespace

ffi::Future RunBackwardChecked(ffi::Error checked, const AttentionBwdParams& params,
                               ffi::ThreadPool pool) {
  if (checked.failure()) return ReadyFuture(std::move(checked));
  std::string select_error;
  const KernelTable* kern = SelectKernels(&select_error);
  if (kern == nullptr)
    return ReadyFuture(ffi::Error(ffi::ErrorCode::kInvalidArgument, select_error));
  const AttentionBwdParams p = params;
  if (NanFillRequested()) {
    FillNaN(p.grad_q, DType::kF32, p.batch * p.seq_q * p.heads_q * p.dk);
    FillNaN(p.grad_k, DType::kF32, p.batch * p.seq_kv * p.heads_kv * p.dk);
    FillNaN(p.grad_v, DType::kF32, p.batch * p.seq_kv * p.heads_kv * p.dv);
  }
  const BwdPlan plan = MakeBwdPlan(p);
  const int64_t items = plan.q_items + plan.kv_items;
  return ParallelFor(
      pool, items, /*max_tasks=*/items,
      [p, plan, kern](int64_t item) {
        thread_local BwdScratch scratch;
        if (item < plan.q_items) {
          RunQItem(p, plan, *kern, item, scratch);
        } else {
          RunKvItem(p, plan, *kern, item - plan.q_items, scratch);
        }
      },
      [] {});
}

}  // namespace jax_mla::cpu
