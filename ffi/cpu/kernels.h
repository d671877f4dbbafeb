// The interface between the CPU drivers (which split work across threads and
// handle positions, splits and outputs) and the kernels (which are compiled
// once per ISA level in ffi/cpu/kernels.cc and chosen at run time, isa.cc).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "ffi/common/dtype.h"
#include "ffi/common/quant_format.h"

namespace jax_mla::cpu {

// Keys per tile of the attention kernels. The Python num_splits heuristic reads
// it through the module's kv_tile() so that there is one table (docs/design.md, "Conventions").
inline constexpr int64_t kKvTile = 64;

// A block of query rows that attend to the same key/value head.
struct RowBlock {
  int64_t n_rows = 0;
  const float* q = nullptr;      // [n_rows, dk] float32, already multiplied by scale
  const int64_t* end = nullptr;  // [n_rows] exclusive key end of each row (<= kv_end)
  float* o = nullptr;            // [n_rows, dv] running unnormalized output
  float* m = nullptr;            // [n_rows] running max of the scores (-inf at start)
  float* l = nullptr;            // [n_rows] running sum of exp(score - m)
};

// Key and value rows of one (batch, kv head): row t starts at Row(t), its
// scales (quantized rows) at Scales(t). Float rows hold elements of dtype;
// quantized rows (fmt != kNone) hold qs. Contiguous (pages == nullptr): row t
// at data + t * row_bytes, its scales at scales + t * scale_row_bytes. Paged
// (docs/design.md, "Paged caches"): row t is row t & page_mask of page
// pages[t >> page_shift], whose rows (scales) start page_bytes
// (page_scale_bytes) times the page index after data (scales); a kernel reads
// only rows of the keys it is given, so only their pages' entries.
struct KvRows {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t row_bytes = 0;
  QFormat fmt = QFormat::kNone;
  const void* scales = nullptr;
  int64_t scale_row_bytes = 0;
  const int32_t* pages = nullptr;  // this sequence's block-table row, or nullptr
  int page_shift = 0;              // log2 of the page size
  int64_t page_mask = 0;           // page size - 1
  int64_t page_bytes = 0;
  int64_t page_scale_bytes = 0;

  const char* Row(int64_t t) const {
    const char* base = static_cast<const char*>(data);
    if (pages == nullptr) return base + t * row_bytes;
    return base + pages[t >> page_shift] * page_bytes + (t & page_mask) * row_bytes;
  }
  const char* Scales(int64_t t) const {
    const char* base = static_cast<const char*>(scales);
    if (pages == nullptr) return base + t * scale_row_bytes;
    return base + pages[t >> page_shift] * page_scale_bytes + (t & page_mask) * scale_row_bytes;
  }
  // The end of the run of rows from t that lie one after another in memory
  // (the end of t's page; contiguous rows: no end).
  int64_t RunEnd(int64_t t) const {
    if (pages == nullptr) return std::numeric_limits<int64_t>::max();
    return (t | page_mask) + 1;
  }
  // The same rows starting `bytes` (`scale_bytes`) further into each row
  // (MLA's V columns inside the K rows).
  KvRows Offset(int64_t bytes, int64_t scale_bytes) const {
    KvRows r = *this;
    r.data = static_cast<const char*>(data) + bytes;
    if (scales != nullptr) r.scales = static_cast<const char*>(scales) + scale_bytes;
    return r;
  }
};

// The rows of consecutive KV heads of one view: head u's rows (scales) start
// u * head_bytes (u * scale_head_bytes) after those of head0.
struct KvHeads {
  KvRows head0;
  int64_t head_bytes = 0;
  int64_t scale_head_bytes = 0;
};

// The backward's view of one (batch, query head): position i's query (Dk
// values) at q + i * q_stride and its output gradient (Dv values) at
// dout + i * dout_stride, in elements of their dtypes; its LSE and delta.
// dq: where attend_bwd_kv adds dS K (unscaled) into position i's dQ row at
// dq + i * dq_stride; nullptr when dQ comes from attend_bwd_q instead.
struct BwdQuery {
  const void* q = nullptr;
  DType q_dtype = DType::kF32;
  int64_t q_stride = 0;
  const void* dout = nullptr;
  DType dout_dtype = DType::kF32;
  int64_t dout_stride = 0;
  const float* lse = nullptr;    // [Sq]
  const float* delta = nullptr;  // [Sq]
  float* dq = nullptr;
  int64_t dq_stride = 0;
};

struct KernelTable {
  const char* isa;
  // Online-softmax attention of `rows` over keys [kv_begin, max(rows.end)),
  // updating o/m/l. v_in_k >= 0 says V is columns [v_in_k, v_in_k + dv) of
  // the K rows (MLA), read from the same converted tile; then `v` is unused.
  // `scratch` holds AttendScratchFloats(dk, dv, rows.n_rows) floats.
  void (*attend)(const RowBlock& rows, const KvRows& k, const KvRows& v, int64_t v_in_k, int64_t dk,
                 int64_t dv, int64_t kv_begin, float* scratch);
  // Decode with few rows per KV head over several KV heads of a float cache
  // (8-bit: attend_heads_q8; other quantized caches go head by head through
  // `attend`): rows[u] attends KV head u of k and v. Keys are visited key by
  // key across the heads, i.e. in memory order. Every block has the same
  // n_rows; `scratch` holds AttendHeadsScratchFloats(n_heads, n_rows) floats.
  void (*attend_heads)(const RowBlock* rows, int64_t n_heads, const KvHeads& k, const KvHeads& v,
                       int64_t dk, int64_t dv, int64_t kv_begin, float* scratch);
  // The same over an 8-bit cache, for shapes HeadsQ8Takes accepts (the
  // driver runs others head by head through `attend`): rows[u] attends KV
  // head u of k and v; kv_begin is a multiple of kPGroup. `scratch` holds
  // AttendHeadsQ8ScratchFloats(n_heads, n_rows, dk, dv) floats.
  void (*attend_heads_q8)(const RowBlock* rows, int64_t n_heads, const KvHeads& k, const KvHeads& v,
                          int64_t dk, int64_t dv, int64_t kv_begin, float* scratch);
  // The backward (kernels/backward.h), each result element written by one
  // call. end[i] is the number of keys position i sees (nondecreasing in i);
  // a row whose LSE is -inf sees none. Keys at or past a row's end are never
  // read.
  // dK and dV of keys [j0, j1) (j1 - j0 <= kBwdKeys) of one (batch, KV head)
  // over every position of the heads[g], g < n_heads, that share it: rows j0
  // to j1 of grad_k and grad_v (row t at grad_k + t * gk_stride, ...), k and
  // v's row 0 at key 0; and where heads[g].dq is set, dS K of those keys
  // added into every position's dQ row of head g (not scaled). Keys of a
  // block that a row does not see add exactly 0. `scratch` holds
  // BwdKvScratchFloats(dk, dv) floats.
  void (*attend_bwd_kv)(const BwdQuery* heads, int64_t n_heads, const int64_t* end, int64_t seq_q,
                        const KvRows& k, const KvRows& v, int64_t dk, int64_t dv, float scale,
                        int64_t j0, int64_t j1, float* grad_k, int64_t gk_stride, float* grad_v,
                        int64_t gv_stride, float* scratch);
  // dQ of positions [i0, i1) (i1 - i0 <= kBwdRows) of one (batch, query
  // head): rows i0 to i1 of grad_q (row i at grad_q + i * gq_stride).
  // `scratch` holds BwdQScratchFloats(dk, dv) floats.
  void (*attend_bwd_q)(const BwdQuery& head, const int64_t* end, int64_t i0, int64_t i1,
                       const KvRows& k, const KvRows& v, int64_t dk, int64_t dv, float scale,
                       float* grad_q, int64_t gq_stride, float* scratch);
  // dst[i] = float(src[i]) for i < n.
  void (*to_float)(const void* src, DType dtype, float* dst, int64_t n);
  // The split merge of one output row: dst[i] = sum_s w[s] * src[s][i] for
  // i < n (ns >= 1 rows).
  void (*merge)(const float* const* src, const float* w, int64_t ns, float* dst, int64_t n);
};

// The head dims (Dk, Dv) the CPU kernels take: multiples of kHeadDimMultiple
// up to kMaxHeadDim. The module's capabilities() exports both for Python.
inline constexpr int64_t kHeadDimMultiple = 16;
inline constexpr int64_t kMaxHeadDim = 576;

// Keys per online-softmax block of the few-rows (GEMV) kernels.
inline constexpr int64_t kFewKeys = 16;

inline size_t AttendHeadsScratchFloats(int64_t n_heads, int64_t n_rows) {
  return size_t(n_heads * n_rows * kFewKeys);
}

static_assert(kKvTile == kPGroup, "8-bit P groups are the key tiles");

// attend_heads_q8 takes K and V in 8-bit formats (q8_0, q8_kv) with Dk and
// Dv multiples of 32 (whole q8_0 blocks), Dv at least 64.
inline bool HeadsQ8Takes(QFormat k_fmt, QFormat v_fmt, int64_t dk, int64_t dv) {
  return QuantizesQueries(k_fmt) && RoundsProbabilities(v_fmt) && dk % kQBlock == 0 &&
         dv % kQBlock == 0 && dv >= 2 * kQBlock;
}

// Per row: query lanes (3 x dk / 4 rounded to 16), scores, rounded P, sums;
// then the P scales, one head's V scales, a K row and the rows' key counts
// (kernels/heads_q8.h, CarveHeadsQ8), with 64 bytes for alignment.
inline size_t AttendHeadsQ8ScratchFloats(int64_t n_heads, int64_t n_rows, int64_t dk, int64_t dv) {
  auto up16 = [](int64_t x) { return (x + 15) / 16 * 16; };
  const int64_t nr = n_heads * n_rows, nbv = dv / kQBlock;
  return size_t(nr * (3 * up16(dk / 4) + kPGroup + nbv * kPGroup + dv) + up16(nr * nbv) +
                nbv * kPGroup + up16(dk) + 2 * nr + 16);
}

// Floats of padding after each row of a converted V tile: rows of a multiple
// of 1 KiB (MLA's 512 floats: 2 KiB) would map onto the same few L1 sets and
// evict each other while P.V walks down the tile.
inline constexpr int64_t kTilePad = 16;

// Rows are padded to a multiple of the widest vector (16 floats). The last
// term holds 8-bit V's per-key scales and the rounded P (quant_format.h):
// [T, nbv], [nbv, T, rp] and [nbv, rp] with nbv blocks of 32 V columns.
inline size_t AttendScratchFloats(int64_t dk, int64_t dv, int64_t n_rows) {
  const int64_t rp = (n_rows + 15) / 16 * 16;
  const int64_t nbv = (dv + kQBlock - 1) / kQBlock;
  return size_t(dk * rp + kKvTile * (dk + dv + kTilePad + rp) + 4 * rp +
                nbv * (kKvTile * (rp + 1) + rp));
}

// The backward's blocks: query rows per dQ work item and keys per dK/dV work
// item (multiples of the widest vector, 16 floats).
inline constexpr int64_t kBwdRows = 64;
inline constexpr int64_t kBwdKeys = 64;
static_assert(kBwdRows % 16 == 0 && kBwdKeys % 16 == 0, "blocks are whole vectors");

// attend_bwd_kv: K and V transposed [dk + dv, keys], the block's queries
// (scaled) and output gradients [rows, dk + dv], the scores and their
// gradients [rows, keys] each, K as stored [keys, dk], and one converted row.
inline size_t BwdKvScratchFloats(int64_t dk, int64_t dv) {
  return size_t((dk + dv) * (kBwdKeys + kBwdRows) + 2 * kBwdRows * kBwdKeys + kBwdKeys * dk +
                std::max(dk, dv));
}

// attend_bwd_q: Q and dO transposed [dk + dv, rows], a K and V tile
// [keys, dk + dv], the tile's scores and their gradients [keys, rows] each,
// three values per row (LSE, delta, keys seen), and one converted row.
inline size_t BwdQScratchFloats(int64_t dk, int64_t dv) {
  return size_t((dk + dv) * (kBwdRows + kBwdKeys) + 2 * kBwdKeys * kBwdRows + 3 * kBwdRows +
                std::max(dk, dv));
}

// The kernels for the ISA chosen by JAX_MLA_CPU_ISA (auto|avx2|avx512|generic,
// default auto = the best the CPU has). Returns nullptr and sets *error when the
// requested ISA is unknown, not built, or not supported by this CPU.
const KernelTable* SelectKernels(std::string* error);

// ISAs compiled into this build and, of those, the ones this CPU can run.
std::string BuiltIsas();
std::string SupportedIsas();

}  // namespace jax_mla::cpu
