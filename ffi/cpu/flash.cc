#include "ffi/cpu/flash.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ffi/cpu/scratch.h"

namespace jax_mla::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys per call when several KV heads over a quantized cache go one head at a
// time: a multiple of the key tile and of the 8-bit P group, so the calls'
// groups are those of one long call.
constexpr int64_t kQuantHeadsChunk = 256;
static_assert(kQuantHeadsChunk % kKvTile == 0 && kQuantHeadsChunk % kPGroup == 0,
              "chunks must fall on tiles and P groups");

// Floats of one thread's tile-kernel working set the driver aims to keep in
// L2 (512 KiB a core on Zen 3): 192/128 blocks of 128 rows take 70k.
constexpr int64_t kTileBudgetFloats = 96 * 1024;

// Per-thread scratch (Grow).
struct Scratch {
  std::vector<float> q, o, m, l, kernel;
  std::vector<int64_t> end, chunk_end, page_end;
  std::vector<RowBlock> blocks;
  void Reserve(int64_t heads, int64_t rows, int64_t block_rows, int64_t dk, int64_t dv) {
    Grow(q, size_t(rows * dk));
    Grow(o, size_t(rows * dv));
    Grow(m, size_t(rows));
    Grow(l, size_t(rows));
    Grow(end, size_t(rows));
    Grow(page_end, size_t(rows));
    Grow(chunk_end, size_t(block_rows));
    Grow(blocks, size_t(heads));
    Grow(kernel, std::max({AttendScratchFloats(dk, dv, block_rows),
                           AttendHeadsScratchFloats(heads, block_rows),
                           AttendHeadsQ8ScratchFloats(heads, block_rows, dk, dv)}));
  }
};

// Loads the block's query rows (scaled, float32) and sets the softmax state.
// Rows are position-major: (i, g) -> (i - i0) * (g1 - g0) + (g - g0).
void LoadRows(const AttentionParams& p, const KernelTable& kern, int64_t b, int64_t hkv,
              int64_t group, int64_t i0, int64_t i1, int64_t g0, int64_t g1, int64_t kv0,
              int64_t kv1, float* q, int64_t* end, float* m, float* l, float* o) {
  const int64_t q_elem = DTypeBytes(p.q_dtype), dk = p.dk;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t pos = int64_t(p.q_pos[b]) + i;
    const int64_t visible = VisibleKeys(pos, p.kv_len[b], p.seq_kv, p.causal);
    const int64_t row_end = std::max(kv0, std::min(visible, kv1));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r = (i - i0) * (g1 - g0) + (g - g0);
      const int64_t h = hkv * group + g;
      const char* src =
          static_cast<const char*>(p.q) + ((b * p.seq_q + i) * p.heads_q + h) * dk * q_elem;
      kern.to_float(src, p.q_dtype, q + r * dk, dk);
      for (int64_t d = 0; d < dk; ++d) q[r * dk + d] *= p.scale;
      if (QuantizesQueries(p.k.fmt)) RoundQueryToQ8(q + r * dk, dk);
      end[r] = row_end;
      m[r] = kNegInf;
      l[r] = 0.f;
    }
  }
  std::fill_n(o, (i1 - i0) * (g1 - g0) * p.dv, 0.f);
}

// Normalizes the block's rows and writes them to the outputs, or to the split
// partials when the keys are split.
void StoreRows(const AttentionParams& p, int64_t b, int64_t hkv, int64_t group, int64_t s,
               int64_t i0, int64_t i1, int64_t g0, int64_t g1, const float* m, const float* l,
               const float* o) {
  const int64_t dv = p.dv;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r = (i - i0) * (g1 - g0) + (g - g0);
      const int64_t h = hkv * group + g;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      const float lse = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
      const float* src = o + r * dv;
      if (p.num_splits == 1) {
        const int64_t base = ((b * p.seq_q + i) * p.heads_q + h) * dv;
        for (int64_t d = 0; d < dv; ++d) StoreFromFloat(p.out, base + d, p.q_dtype, src[d] * inv);
        p.lse[(b * p.heads_q + h) * p.seq_q + i] = lse;
      } else {
        const int64_t row = ((b * p.num_splits + s) * p.seq_q + i) * p.heads_q + h;
        float* dst = p.part_out + row * dv;
        for (int64_t d = 0; d < dv; ++d) dst[d] = src[d] * inv;
        p.part_lse[row] = lse;
      }
    }
  }
}

// The rows of KV heads h, h + 1, ... of a view (8-bit: with their scales).
KvHeads HeadsOf(const RowView& view, int64_t b, int64_t h) {
  KvHeads heads;
  heads.head0 = RowsOf(view, b, h);
  heads.head_bytes = view.head_stride * view.UnitBytes();
  if (view.fmt != QFormat::kNone)
    heads.scale_head_bytes = view.scale_head_stride * ScaleBytes(view.fmt);
  return heads;
}

// Rows per kernel call for a block of R rows of one KV head: all of them
// when the tile kernel's working set for that many (Q transposed, the
// scores, O, the K and V tiles) fits kTileBudgetFloats and both caches are
// float; else calls the size of a block of MakePlan's short plan (kTargetRows
// rows, or the group's heads where there are more: MLA's wide rows, the 8-bit
// kernels, tuned for that many), so a block the long plan did not enlarge
// (e.g. 128-head decode) still goes whole. Rows are independent, so results
// do not depend on how a block is cut.
int64_t RowsPerCall(const AttentionParams& p, bool quantized, int64_t R) {
  const int64_t fits =
      (kTileBudgetFloats - kKvTile * (p.dk + p.dv + kTilePad)) / (p.dk + p.dv + kKvTile);
  if (!quantized && fits >= R) return R;
  const int64_t short_rows =
      std::max(kTargetRows, std::min(p.heads_q / p.heads_kv, kMaxHeadsPerBlock));
  return std::min(R, short_rows);
}

// The nh KV heads' rows (R per head, at q, o, m, l with their key ends `end`)
// attend keys [kv0, max end) of K and V batch row b of the views. `aligned`:
// kv0 is a multiple of kPGroup (attend_heads_q8 needs it).
void AttendRange(const AttentionParams& p, const KernelTable& kern, Scratch& scratch,
                 const RowView& kview, const RowView& vview, int64_t b, int64_t h0, int64_t nh,
                 int64_t R, int64_t kv0, const int64_t* end, float* q, float* o, float* m, float* l,
                 bool aligned) {
  const int64_t dk = p.dk, dv = p.dv;
  const bool quantized = p.k.fmt != QFormat::kNone || p.v.fmt != QFormat::kNone;
  // The KV heads' row blocks, for the kernels that take several heads.
  auto head_blocks = [&] {
    for (int64_t u = 0; u < nh; ++u)
      scratch.blocks[u] =
          RowBlock{R, q + u * R * dk, end + u * R, o + u * R * dv, m + u * R, l + u * R};
    return scratch.blocks.data();
  };
  if (nh == 1) {
    const int64_t step = RowsPerCall(p, quantized, R);
    for (int64_t r0 = 0; r0 < R; r0 += step) {
      RowBlock block{std::min(step, R - r0), q + r0 * dk, end + r0, o + r0 * dv, m + r0, l + r0};
      kern.attend(block, RowsOf(kview, b, h0), RowsOf(vview, b, h0), p.v_in_k, dk, dv, kv0,
                  scratch.kernel.data());
    }
  } else if (aligned && HeadsQ8Takes(p.k.fmt, p.v.fmt, dk, dv) && p.v_in_k < 0) {
    // Several KV heads over an 8-bit cache: key by key across the heads, in
    // memory order, as below.
    kern.attend_heads_q8(head_blocks(), nh, HeadsOf(kview, b, h0), HeadsOf(vview, b, h0), dk, dv,
                         kv0, scratch.kernel.data());
  } else if (quantized) {
    // Several KV heads over a quantized cache attend_heads_q8 does not take
    // (q6_0, float with 8-bit, odd dims): one head at a time, but chunk by
    // chunk of keys, so the heads of a key (adjacent in the cache) are read
    // close together in time. The chunks fall on the 8-bit P groups (kv0
    // does), and each call continues the rows' online softmax from where the
    // last one left it.
    int64_t kv_max = kv0;
    for (int64_t e = 0; e < nh * R; ++e) kv_max = std::max(kv_max, end[e]);
    int64_t* chunk_end = scratch.chunk_end.data();
    for (int64_t c = kv0; c < kv_max; c += kQuantHeadsChunk) {
      for (int64_t u = 0; u < nh; ++u) {
        for (int64_t r = 0; r < R; ++r)
          chunk_end[r] = std::min(end[u * R + r], c + kQuantHeadsChunk);
        RowBlock block{R, q + u * R * dk, chunk_end, o + u * R * dv, m + u * R, l + u * R};
        kern.attend(block, RowsOf(kview, b, h0 + u), RowsOf(vview, b, h0 + u), p.v_in_k, dk, dv, c,
                    scratch.kernel.data());
      }
    }
  } else {
    // Several KV heads with few rows each: the kernel walks the keys and
    // reads all heads of a key together, in memory order.
    kern.attend_heads(head_blocks(), nh, HeadsOf(kview, b, h0), HeadsOf(vview, b, h0), dk, dv, kv0,
                      scratch.kernel.data());
  }
}

bool PageInRange(const RowView& view, int32_t page) {
  return page >= 0 && int64_t(page) < view.num_pages;
}

// Paged caches (docs/design.md, "Paged caches"): the kernels read the pages
// in place (RowsOf gives them the sequence's block-table row), so the keys
// [kv0, max end) go in one call per span of pages in range, normally one
// call for all of them. Pages whose index is out of range are skipped, never
// read; a span that starts after one inside a 64-key P group (or tile) has
// its first call end at the group's end, so that the later calls' groups and
// tiles are a contiguous cache's (only the broken group's 8-bit P is rounded
// per call).
void AttendPaged(const AttentionParams& p, const KernelTable& kern, Scratch& scratch, int64_t b,
                 int64_t h0, int64_t nh, int64_t R, int64_t kv0, const int64_t* end, float* q,
                 float* o, float* m, float* l) {
  const RowView& kv = p.k;
  const int64_t ps = kv.page_size;
  const int32_t* table = kv.block_table + b * kv.max_pages;
  int64_t kv_max = kv0;
  for (int64_t e = 0; e < nh * R; ++e) kv_max = std::max(kv_max, end[e]);
  int64_t* clipped = scratch.page_end.data();
  for (int64_t c = kv0; c < kv_max;) {
    int64_t span = std::min(kv_max, (c / ps + 1) * ps);
    if (!PageInRange(kv, table[c / ps])) {
      c = span;  // never read
      continue;
    }
    while (span < kv_max && PageInRange(kv, table[span / ps])) span = std::min(kv_max, span + ps);
    const int64_t c1 = c % kPGroup == 0 ? span : std::min(span, (c / kPGroup + 1) * kPGroup);
    for (int64_t e = 0; e < nh * R; ++e) clipped[e] = std::max(c, std::min(end[e], c1));
    AttendRange(p, kern, scratch, p.k, p.v, b, h0, nh, R, c, clipped, q, o, m, l, c % kPGroup == 0);
    c = c1;
  }
}

void RunItem(const AttentionParams& p, const Plan& plan, const KernelTable& kern, int64_t item) {
  // Split innermost, so consecutive items share query rows.
  int64_t rest = item;
  const int64_t s = rest % p.num_splits;
  rest /= p.num_splits;
  const int64_t pb = rest % plan.n_pos_blk;
  rest /= plan.n_pos_blk;
  const int64_t hb = rest % plan.n_head_blk;
  rest /= plan.n_head_blk;
  const int64_t kb = rest % plan.n_kv_head_blk;
  const int64_t b = rest / plan.n_kv_head_blk;

  const int64_t i0 = pb * plan.pos_blk, i1 = std::min(p.seq_q, i0 + plan.pos_blk);
  const int64_t g0 = hb * plan.heads_blk, g1 = std::min(plan.group, g0 + plan.heads_blk);
  const int64_t h0 = kb * plan.kv_heads_blk, h1 = std::min(p.heads_kv, h0 + plan.kv_heads_blk);
  const int64_t kv0 = std::min(p.seq_kv, s * plan.split_len);
  const int64_t kv1 = std::min(p.seq_kv, kv0 + plan.split_len);
  const int64_t dk = p.dk, dv = p.dv;
  const int64_t R = (i1 - i0) * (g1 - g0);  // rows per KV head
  const int64_t nh = h1 - h0;

  thread_local Scratch scratch;
  scratch.Reserve(nh, nh * R, R, dk, dv);
  float *q = scratch.q.data(), *o = scratch.o.data(), *m = scratch.m.data(), *l = scratch.l.data();
  int64_t* end = scratch.end.data();
  for (int64_t u = 0; u < nh; ++u)
    LoadRows(p, kern, b, h0 + u, plan.group, i0, i1, g0, g1, kv0, kv1, q + u * R * dk, end + u * R,
             m + u * R, l + u * R, o + u * R * dv);

  if (p.k.block_table != nullptr)
    AttendPaged(p, kern, scratch, b, h0, nh, R, kv0, end, q, o, m, l);
  else
    AttendRange(p, kern, scratch, p.k, p.v, b % p.kv_batch, h0, nh, R, kv0, end, q, o, m, l,
                /*aligned=*/true);
  for (int64_t u = 0; u < nh; ++u)
    StoreRows(p, b, h0 + u, plan.group, s, i0, i1, g0, g1, m + u * R, l + u * R, o + u * R * dv);
}

// Merges the split partials of every (b, i, h) by their LSE. Empty splits
// (weight 0) are left out; the normalization is folded into the weights.
void Combine(const AttentionParams& p, const KernelTable& kern) {
  const int64_t ns = p.num_splits, dv = p.dv;
  thread_local std::vector<const float*> src;
  thread_local std::vector<float> w, acc;
  Grow(src, size_t(ns));
  Grow(w, size_t(ns));
  Grow(acc, size_t(dv));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.seq_q; ++i) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        auto row = [&](int64_t s) { return ((b * ns + s) * p.seq_q + i) * p.heads_q + h; };
        float mx = kNegInf;
        for (int64_t s = 0; s < ns; ++s) mx = std::max(mx, p.part_lse[row(s)]);
        float total = 0.f;
        int64_t used = 0;
        if (mx != kNegInf) {
          for (int64_t s = 0; s < ns; ++s) {
            const float ws = std::exp(p.part_lse[row(s)] - mx);  // 0 for an empty split
            if (ws == 0.f) continue;
            total += ws;
            src[size_t(used)] = p.part_out + row(s) * dv;
            w[size_t(used++)] = ws;
          }
        }
        const int64_t base = ((b * p.seq_q + i) * p.heads_q + h) * dv;
        p.lse[(b * p.heads_q + h) * p.seq_q + i] = total > 0.f ? mx + std::log(total) : kNegInf;
        float* dst = p.q_dtype == DType::kF32 ? static_cast<float*>(p.out) + base : acc.data();
        if (used == 0) {
          std::fill_n(dst, dv, 0.f);
        } else {
          const float inv = 1.f / total;
          for (int64_t s = 0; s < used; ++s) w[size_t(s)] *= inv;
          kern.merge(src.data(), w.data(), used, dst, dv);
        }
        if (p.q_dtype != DType::kF32)
          for (int64_t d = 0; d < dv; ++d)
            StoreFromFloat(p.out, base + d, p.q_dtype, acc[size_t(d)]);
      }
    }
  }
}

}  // namespace

KvRows RowsOf(const RowView& view, int64_t b, int64_t h) {
  const bool paged = view.block_table != nullptr;
  const int64_t batch_row = paged ? 0 : b;  // paged: the batch stride is the page stride
  KvRows rows;
  rows.data = static_cast<const char*>(view.data) +
              (batch_row * view.batch_stride + h * view.head_stride) * view.UnitBytes();
  rows.dtype = view.dtype;
  rows.row_bytes = view.row_stride * view.UnitBytes();
  rows.fmt = view.fmt;
  if (view.fmt != QFormat::kNone) {
    const int64_t sb = ScaleBytes(view.fmt);
    rows.scales = static_cast<const char*>(view.scales) +
                  (batch_row * view.scale_batch_stride + h * view.scale_head_stride) * sb;
    rows.scale_row_bytes = view.scale_row_stride * sb;
    if (paged) rows.page_scale_bytes = view.scale_batch_stride * sb;
  }
  if (paged) {
    rows.pages = view.block_table + b * view.max_pages;
    while ((int64_t(1) << rows.page_shift) < view.page_size) ++rows.page_shift;
    rows.page_mask = view.page_size - 1;
    rows.page_bytes = view.batch_stride * view.UnitBytes();
  }
  return rows;
}

Plan MakePlan(int64_t batch, int64_t seq_q, int64_t heads_q, int64_t heads_kv, int64_t seq_kv,
              int64_t num_splits) {
  Plan plan{};
  if (batch <= 0 || seq_q <= 0 || heads_q <= 0 || heads_kv <= 0) return plan;  // no work
  plan.group = heads_q / heads_kv;
  plan.heads_blk = std::min(plan.group, kMaxHeadsPerBlock);
  plan.n_head_blk = CeilDiv(plan.group, plan.heads_blk);
  plan.pos_blk = std::max<int64_t>(1, std::min(seq_q, kTargetRows / plan.heads_blk));
  const int64_t long_pos_blk = std::max<int64_t>(1, std::min(seq_q, kLongRows / plan.heads_blk));
  if (batch * heads_kv * plan.n_head_blk * CeilDiv(seq_q, long_pos_blk) >= kLongMinItems)
    plan.pos_blk = long_pos_blk;
  plan.n_pos_blk = CeilDiv(seq_q, plan.pos_blk);
  const int64_t rows = plan.heads_blk * plan.pos_blk;
  plan.kv_heads_blk = rows < kMinRowsPerKvHead ? heads_kv : 1;
  plan.n_kv_head_blk = CeilDiv(heads_kv, plan.kv_heads_blk);
  plan.split_len = CeilDiv(CeilDiv(std::max<int64_t>(seq_kv, 1), num_splits), kKvTile) * kKvTile;
  plan.items = batch * plan.n_kv_head_blk * plan.n_head_blk * plan.n_pos_blk * num_splits;
  return plan;
}

ffi::Future RunChecked(ffi::Error checked, const AttentionParams& params, ffi::ThreadPool pool) {
  if (checked.failure()) return ReadyFuture(std::move(checked));
  std::string select_error;
  const KernelTable* kern = SelectKernels(&select_error);
  if (kern == nullptr)
    return ReadyFuture(ffi::Error(ffi::ErrorCode::kInvalidArgument, select_error));
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
  const Plan plan = MakePlan(p.batch, p.seq_q, p.heads_q, p.heads_kv, p.seq_kv, p.num_splits);
  return ParallelFor(
      pool, plan.items, /*max_tasks=*/plan.items,
      [p, plan, kern](int64_t item) { RunItem(p, plan, *kern, item); },
      [p, kern] {
        if (p.num_splits > 1) Combine(p, *kern);
      });
}

}  // namespace jax_mla::cpu
