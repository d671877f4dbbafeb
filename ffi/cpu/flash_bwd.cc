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

// The fused plan needs at least this many (batch, KV head) items. They are
// few and of equal cost for equal kv_len, so a pool of T threads runs n of
// them at an efficiency of n / (T ceil(n / T)) >= n / (n + T - 1); the plan
// does 5/7 of the split plan's GEMM work, so it wins while that is above
// 5/7: for every n >= 16 on pools of up to 7 threads (n = 16 exactly: up to
// 11, and 16). 16 is DeepSeek's 16 heads at batch 1. Decided by the shape
// alone, never by the pool, so that a result never depends on the machine.
constexpr int64_t kFusedMinTasks = 16;

// Two plans, each giving every result element one writer and a fixed
// summation order (results do not depend on thread timing, and neither
// needs atomics nor a reduction across threads); they agree to float32
// rounding, not bitwise.
//   fused (batch * heads_kv >= kFusedMinTasks): one item per (batch, KV
//     head) runs its key blocks in ascending order, each adding dS K into
//     the dQ rows of the heads that share the KV head: 5 GEMMs per visible
//     (query, key) pair. Batch rows costliest first (most visible pairs).
//   split: dQ of a block of kBwdRows positions of one (batch, query head),
//     recomputing S and dP, then dK and dV of a block of kBwdKeys keys of
//     one (batch, KV head): 7 GEMMs per pair, many more items. Block index
//     outermost, in the order that puts the costliest items first under
//     causal masking (the last query blocks see the most keys, the first key
//     blocks the most queries), so that the pool's threads finish together.
struct BwdPlan {
  bool fused = false;
  int64_t q_blocks = 0;              // per (batch, query head)
  int64_t kv_blocks = 0;             // per (batch, KV head)
  int64_t q_items = 0;               // split only
  int64_t kv_items = 0;              // split: one per key block; fused: per (batch, KV head)
  std::vector<int64_t> batch_order;  // fused: batch rows, costliest first
};

BwdPlan MakeBwdPlan(const AttentionBwdParams& p) {
  BwdPlan plan;
  plan.q_blocks = CeilDiv(p.seq_q, kBwdRows);
  plan.kv_blocks = CeilDiv(p.seq_kv, kBwdKeys);
  plan.fused = p.batch * p.heads_kv >= kFusedMinTasks;
  if (!plan.fused) {
    plan.q_items = p.batch * p.heads_q * plan.q_blocks;
    plan.kv_items = p.batch * p.heads_kv * plan.kv_blocks;
    return plan;
  }
  plan.kv_items = p.batch * p.heads_kv;
  std::vector<int64_t> pairs(size_t(p.batch), 0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < p.seq_q; ++i)
      pairs[size_t(b)] += VisibleKeys(int64_t(p.q_pos[b]) + i, p.kv_len[b], p.seq_kv, p.causal);
  plan.batch_order.resize(size_t(p.batch));
  for (int64_t b = 0; b < p.batch; ++b) plan.batch_order[size_t(b)] = b;
  std::stable_sort(plan.batch_order.begin(), plan.batch_order.end(),
                   [&](int64_t a, int64_t b) { return pairs[size_t(a)] > pairs[size_t(b)]; });
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

// dK and dV of key block kb of (batch b, KV head hkv) over s.heads, the
// group's heads (with their dQ rows to add into in the fused plan), s.end
// holding every position's visible keys.
void KvBlock(const AttentionBwdParams& p, const KernelTable& kern, int64_t b, int64_t hkv,
             int64_t kb, BwdScratch& s) {
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
  Grow(s.kernel, BwdKvScratchFloats(p.dk, p.dv));
  kern.attend_bwd_kv(s.heads.data(), p.heads_q / p.heads_kv, s.end.data(), p.seq_q,
                     RowsOf(p.k, b, hkv), RowsOf(p.v, b, hkv), p.dk, p.dv, p.scale, j0, j1, grad_k,
                     gk_stride, grad_v, gv_stride, s.kernel.data());
}

// The group's heads of (b, hkv) in s.heads and every position's visible
// keys in s.end.
void LoadGroup(const AttentionBwdParams& p, int64_t b, int64_t hkv, BwdScratch& s) {
  const int64_t group = p.heads_q / p.heads_kv;
  Grow(s.end, size_t(p.seq_q));
  VisibleEnds(p, b, 0, p.seq_q, s.end.data());
  Grow(s.heads, size_t(group));
  for (int64_t g = 0; g < group; ++g) s.heads[size_t(g)] = QueryOf(p, b, hkv * group + g);
}

void RunKvItem(const AttentionBwdParams& p, const BwdPlan& plan, const KernelTable& kern,
               int64_t item, BwdScratch& s) {
  const int64_t per_block = p.batch * p.heads_kv;
  const int64_t kb = item / per_block;
  const int64_t b = item % per_block / p.heads_kv, hkv = item % p.heads_kv;
  LoadGroup(p, b, hkv, s);
  KvBlock(p, kern, b, hkv, kb, s);
}

// The fused plan's item: every key block of (batch, KV head) in ascending
// order, so that each dQ element is summed in one fixed order; dQ = scale
// dS K, scaled once at the end. Rows that see no key keep dQ = 0.
void RunFusedItem(const AttentionBwdParams& p, const BwdPlan& plan, const KernelTable& kern,
                  int64_t item, BwdScratch& s) {
  const int64_t b = plan.batch_order[size_t(item / p.heads_kv)], hkv = item % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv, dq_stride = p.heads_q * p.dk;
  LoadGroup(p, b, hkv, s);
  for (int64_t g = 0; g < group; ++g) {
    BwdQuery& h = s.heads[size_t(g)];
    h.dq = p.grad_q + (b * p.seq_q * p.heads_q + hkv * group + g) * p.dk;
    h.dq_stride = dq_stride;
    for (int64_t i = 0; i < p.seq_q; ++i) std::fill_n(h.dq + i * dq_stride, p.dk, 0.f);
  }
  for (int64_t kb = 0; kb < plan.kv_blocks; ++kb) KvBlock(p, kern, b, hkv, kb, s);
  for (int64_t g = 0; g < group; ++g) {
    const BwdQuery& h = s.heads[size_t(g)];
    for (int64_t i = 0; i < p.seq_q; ++i)
      for (int64_t d = 0; d < p.dk; ++d) h.dq[i * dq_stride + d] *= p.scale;
  }
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
        if (plan.fused) {
          RunFusedItem(p, plan, *kern, item, scratch);
        } else if (item < plan.q_items) {
          RunQItem(p, plan, *kern, item, scratch);
        } else {
          RunKvItem(p, plan, *kern, item - plan.q_items, scratch);
        }
      },
      [] {});
}

}  // namespace jax_mla::cpu
