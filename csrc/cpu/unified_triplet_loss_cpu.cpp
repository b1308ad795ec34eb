// unified_triplet_loss on CPU.
//
// The references are visited in tiles: one BLAS call gives a tile's dot
// products, and vectorized element loops fold it into per-anchor online
// log-sum-exps (forward) or turn it into dL/dS, which two more BLAS calls
// multiply back (backward). With the batch as its own reference, S is
// symmetric: each pair of blocks (I, J), I <= J, is computed once and serves
// anchors I (rows) and J (columns), in rounds of disjoint pairs. Nothing larger
// than a tile of the N x M similarity matrix is ever held.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <unordered_map>

#include "cpu/tiles_cpu.h"
#include "reduction.h"

namespace reid_ext {
namespace cpu {
namespace {

constexpr int64_t kBankTile = 256;  // references per tile against a bank
// A problem of at most kSingleTileRefs references and kSingleTilePairs pairs is a single tile:
// its dot products (1 MiB in float32 at most), and its gradient product, are one multi-threaded
// GEMM each instead of one per anchor block, each of which would repack the whole reference set.
constexpr int64_t kSingleTileRefs = 512;
constexpr int64_t kSingleTilePairs = 512 * 512;

inline bool single_tile(int64_t n, int64_t m) { return m <= kSingleTileRefs && n * m <= kSingleTilePairs; }
// From this batch size on, a single tile of the batch against itself computes half of its
// symmetric dot products by mirroring (below it, two smaller GEMMs cost more than they save).
constexpr int64_t kHalfDotsFrom = 128;
constexpr int kLanes = 16;          // independent accumulators, so row reductions vectorize
constexpr int64_t kNoSelfPairs = std::numeric_limits<int64_t>::max();  // Tile::self_shift against a bank

// One side of a tile: label and modality codes (see Codes) and inverse norms from row `first` on.
template <typename scalar_t>
struct Side {
  const int32_t* labels;
  const int32_t* modalities;  // for mode "all", which ignores them, any array of the same length
  const scalar_t* inv;
};

// Labels (or modalities) of the anchors and of the references as int32 codes, equal exactly
// where the int64 values are: the element loops then compare 8 lanes per AVX2 instruction
// instead of 4 and pack the masks. Values that fit in int32 are their own codes; otherwise
// codes number the distinct values.
struct Codes {
  std::vector<int32_t> anchors, references;  // references: empty when they are the anchors
  bool shared;

  Codes(const at::Tensor& a, const at::Tensor& b, bool same) : shared(same) {
    const int64_t* a_data = a.data_ptr<int64_t>();
    const int64_t* b_data = b.data_ptr<int64_t>();
    const int64_t na = a.numel(), nb = same ? 0 : b.numel();
    const auto fits = [](const int64_t* v, int64_t n) {
      for (int64_t i = 0; i < n; ++i)
        if (v[i] < std::numeric_limits<int32_t>::min() || v[i] > std::numeric_limits<int32_t>::max()) return false;
      return true;
    };
    anchors.resize(na);
    references.resize(nb);
    if (fits(a_data, na) && fits(b_data, nb)) {
      std::copy(a_data, a_data + na, anchors.begin());
      std::copy(b_data, b_data + nb, references.begin());
      return;
    }
    std::unordered_map<int64_t, int32_t> code;
    const auto code_of = [&](int64_t v) { return code.emplace(v, static_cast<int32_t>(code.size())).first->second; };
    for (int64_t i = 0; i < na; ++i) anchors[i] = code_of(a_data[i]);
    for (int64_t i = 0; i < nb; ++i) references[i] = code_of(b_data[i]);
  }

  const int32_t* reference_codes() const { return shared ? anchors.data() : references.data(); }
};

// The column c of a tile's row r where r - c == self_shift (the anchor itself), or -1; as int32,
// so that the element loops compare it in 8 lanes.
inline int32_t self_column(int64_t r, int64_t cols, int64_t self_shift) {
  if (self_shift == kNoSelfPairs) return -1;
  const int64_t c = r - self_shift;
  return c >= 0 && c < cols ? static_cast<int32_t>(c) : -1;
}

// Per-anchor running statistics of the forward.
template <typename scalar_t>
struct Stats {
  std::vector<scalar_t> neg_max, neg_sum, pos_max, pos_sum;
  std::vector<uint8_t> neg_nan, pos_nan;  // a NaN value was folded in: its sum must end NaN

  explicit Stats(int64_t n)
      : neg_max(n, neg_infinity<scalar_t>()), neg_sum(n, 0), pos_max(n, neg_infinity<scalar_t>()),
        pos_sum(n, 0), neg_nan(n, 0), pos_nan(n, 0) {}
};

// Masked pair values of a tile: neg[r, c] = gamma*(s+margin) for negatives,
// pos[r, c] = -gamma*s for positives, -inf where the pair does not count
// (r - c == self_shift is an anchor paired with itself).
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void pair_values_impl(const scalar_t* dots, int64_t rows, int64_t cols, int64_t self_shift, Side<scalar_t> a,
                             Side<scalar_t> b, int mode, scalar_t gamma, scalar_t margin, scalar_t* neg,
                             scalar_t* pos) {
  const scalar_t none = neg_infinity<scalar_t>();
  // modality_allowed() with the mode hoisted out of the loop, in bitwise form.
  const bool any_modality = mode == kModeAll, want_other = mode == kModeCross;
  const int32_t cols32 = static_cast<int32_t>(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t label = a.labels[r], modality = a.modalities[r], self_c = self_column(r, cols, self_shift);
    const scalar_t inv_r = a.inv[r];
    const scalar_t* d = dots + r * cols;
    scalar_t* nr = neg + r * cols;
    scalar_t* pr = pos + r * cols;
    for (int32_t c = 0; c < cols32; ++c) {
      const scalar_t s = d[c] * inv_r * b.inv[c];
      // Every load unconditional and no short-circuit: the loop must if-convert to vectorize.
      const int32_t label_c = b.labels[c], modality_c = b.modalities[c];
      const bool allowed = (c != self_c) & (any_modality | (want_other == (modality != modality_c)));
      const bool same = label == label_c;
      nr[c] = (allowed && !same) ? gamma * (s + margin) : none;
      pr[c] = (allowed && same) ? -gamma * s : none;
    }
  }
}

// Folds each row of values[rows, cols] into the running (max, sum) of anchor first + r. A NaN
// value is skipped by the max but makes the sum NaN (vexp keeps NaN); a row whose values are
// all -inf or NaN has no sum, so only then is it searched for a NaN. Keeping NaN checks out of
// the max loop lets its 16 lanes stay in vector registers.
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void fold_rows_impl(const scalar_t* values, int64_t rows, int64_t cols, scalar_t* run_max, scalar_t* run_sum,
                           uint8_t* run_nan) {
  const scalar_t none = neg_infinity<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* v = values + r * cols;
    scalar_t lane_max[kLanes];
    for (int l = 0; l < kLanes; ++l) lane_max[l] = none;
    const int64_t body = cols - cols % kLanes;
    for (int64_t c0 = 0; c0 < body; c0 += kLanes)
      for (int l = 0; l < kLanes; ++l) lane_max[l] = v[c0 + l] > lane_max[l] ? v[c0 + l] : lane_max[l];
    scalar_t m = none;
    for (int l = 0; l < kLanes; ++l) m = lane_max[l] > m ? lane_max[l] : m;
    for (int64_t c = body; c < cols; ++c) m = v[c] > m ? v[c] : m;
    if (m == none) {  // no pair in this tile, or only NaN pairs, which run_nan keeps
      int has_nan = 0;
      for (int64_t c = 0; c < cols; ++c) has_nan |= v[c] != v[c];
      run_nan[r] |= has_nan;
      continue;
    }
    scalar_t lane_sum[kLanes] = {};
    for (int64_t c0 = 0; c0 < body; c0 += kLanes)
      for (int l = 0; l < kLanes; ++l) lane_sum[l] += vexp(v[c0 + l] - m);
    scalar_t sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += lane_sum[l];
    for (int64_t c = body; c < cols; ++c) sum += vexp(v[c] - m);
    run_nan[r] |= sum != sum;
    OnlineLSE<scalar_t> lse;
    lse.max = run_max[r];
    lse.sum = run_sum[r];
    lse.merge(m, sum);
    run_max[r] = lse.max;
    run_sum[r] = lse.sum;
  }
}

// The same for each column of values[rows, cols] (anchors of the J block of a symmetric pair).
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void fold_cols_impl(const scalar_t* values, int64_t rows, int64_t cols, scalar_t* run_max, scalar_t* run_sum,
                           uint8_t* run_nan, scalar_t* col_max, scalar_t* col_sum) {
  const scalar_t none = neg_infinity<scalar_t>();
  for (int64_t c = 0; c < cols; ++c) col_max[c] = none, col_sum[c] = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t x = values[r * cols + c];
      col_max[c] = x > col_max[c] ? x : col_max[c];
      run_nan[c] |= x != x;
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t m = col_max[c];
      col_sum[c] += m == none ? scalar_t(0) : vexp(values[r * cols + c] - m);
    }
  for (int64_t c = 0; c < cols; ++c) {
    if (col_max[c] == none) continue;
    OnlineLSE<scalar_t> lse;
    lse.max = run_max[c];
    lse.sum = run_sum[c];
    lse.merge(col_max[c], col_sum[c]);
    run_max[c] = lse.max;
    run_sum[c] = lse.sum;
  }
}

// Per-anchor factors of dL/dS: weight w = grad * sigmoid(LSE_neg + LSE_pos) (0 if invalid),
// and the shifts that the exponentials subtract: LSE_neg / LSE_pos, or +inf where w = 0 so
// that exp(...) is 0 rather than 0 * inf.
template <typename scalar_t>
struct AnchorGrad {
  const scalar_t* weight;
  const scalar_t* shift_neg;
  const scalar_t* shift_pos;
};

template <typename scalar_t>
inline void anchor_factors(scalar_t grad, scalar_t lse_neg, scalar_t lse_pos, bool valid, scalar_t& weight,
                           scalar_t& shift_neg, scalar_t& shift_pos) {
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  weight = unified_anchor_weight(grad, lse_neg, lse_pos, valid);
  shift_neg = weight == scalar_t(0) ? inf : lse_neg;
  shift_pos = weight == scalar_t(0) ? inf : lse_pos;
}

// g[r, c] = dL/dS of the tile's pairs: (anchor r, reference c) with kRows, plus
// (anchor c, reference r) with kCols. The flags are template arguments so that
// the element loop has no branches and vectorizes.
template <typename scalar_t, bool kRows, bool kCols>
REID_EXT_ALWAYS_INLINE void pair_grads_impl(const scalar_t* dots, int64_t rows_n, int64_t cols_n, int64_t self_shift,
                                            Side<scalar_t> a, Side<scalar_t> b, const AnchorGrad<scalar_t>* rows,
                                            const AnchorGrad<scalar_t>* cols, int mode, scalar_t gamma,
                                            scalar_t margin, scalar_t* g) {
  const bool any_modality = mode == kModeAll, want_other = mode == kModeCross;  // as in pair_values_impl
  // Column factors in locals: loaded through `cols` inside the loop, they might alias g, and the
  // loop would not vectorize.
  const scalar_t* w_cols = kCols ? cols->weight : nullptr;
  const scalar_t* neg_cols = kCols ? cols->shift_neg : nullptr;
  const scalar_t* pos_cols = kCols ? cols->shift_pos : nullptr;
  const int32_t cols32 = static_cast<int32_t>(cols_n);
  for (int64_t r = 0; r < rows_n; ++r) {
    const int32_t label = a.labels[r], modality = a.modalities[r], self_c = self_column(r, cols_n, self_shift);
    const scalar_t inv_r = a.inv[r];
    const scalar_t w_r = kRows ? rows->weight[r] : scalar_t(0);
    const scalar_t neg_r = kRows ? rows->shift_neg[r] : scalar_t(0);
    const scalar_t pos_r = kRows ? rows->shift_pos[r] : scalar_t(0);
    const scalar_t* d = dots + r * cols_n;
    scalar_t* gr = g + r * cols_n;
    for (int32_t c = 0; c < cols32; ++c) {
      const scalar_t s = d[c] * inv_r * b.inv[c];
      // Every load unconditional and no short-circuit: the loop must if-convert to vectorize.
      const int32_t label_c = b.labels[c], modality_c = b.modalities[c];
      const bool allowed = (c != self_c) & (any_modality | (want_other == (modality != modality_c)));
      const bool same = label == label_c;
      const scalar_t neg_arg = gamma * (s + margin), pos_arg = -gamma * s;
      scalar_t value = 0;
      if (kRows) {
        const scalar_t e = vexp(same ? pos_arg - pos_r : neg_arg - neg_r);
        value += (same ? -w_r : w_r) * gamma * e;
      }
      if (kCols) {
        const scalar_t w_c = w_cols[c], neg_c = neg_cols[c], pos_c = pos_cols[c];
        const scalar_t e = vexp(same ? pos_arg - pos_c : neg_arg - neg_c);
        value += (same ? -w_c : w_c) * gamma * e;
      }
      gr[c] = allowed ? value : scalar_t(0);
    }
  }
}

// The vectorized element loops, compiled per ISA (see REID_EXT_CPU_CLONES).
#define REID_EXT_ELEMENT_LOOPS(T)                                                                                 \
  REID_EXT_CPU_CLONES void pair_values(const T* dots, int64_t rows, int64_t cols, int64_t self_shift, Side<T> a,       \
                                       Side<T> b, int mode, T gamma, T margin, T* neg, T* pos) {                  \
    pair_values_impl<T>(dots, rows, cols, self_shift, a, b, mode, gamma, margin, neg, pos);                         \
  }                                                                                                               \
  REID_EXT_CPU_CLONES void fold_rows(const T* values, int64_t rows, int64_t cols, T* run_max, T* run_sum,          \
                                     uint8_t* run_nan) {                                                          \
    fold_rows_impl<T>(values, rows, cols, run_max, run_sum, run_nan);                                             \
  }                                                                                                               \
  REID_EXT_CPU_CLONES void fold_cols(const T* values, int64_t rows, int64_t cols, T* run_max, T* run_sum,          \
                                     uint8_t* run_nan, T* col_max, T* col_sum) {                                  \
    fold_cols_impl<T>(values, rows, cols, run_max, run_sum, run_nan, col_max, col_sum);                           \
  }                                                                                                               \
  REID_EXT_CPU_CLONES void pair_grads(const T* dots, int64_t rows_n, int64_t cols_n, int64_t self_shift, Side<T> a, \
                                      Side<T> b, const AnchorGrad<T>* rows, const AnchorGrad<T>* cols, int mode,  \
                                      T gamma, T margin, T* g) {                                                   \
    if (rows && cols)                                                                                             \
      pair_grads_impl<T, true, true>(dots, rows_n, cols_n, self_shift, a, b, rows, cols, mode, gamma, margin, g); \
    else if (rows)                                                                                                \
      pair_grads_impl<T, true, false>(dots, rows_n, cols_n, self_shift, a, b, rows, cols, mode, gamma, margin, g);\
    else                                                                                                          \
      pair_grads_impl<T, false, true>(dots, rows_n, cols_n, self_shift, a, b, rows, cols, mode, gamma, margin, g);\
  }
REID_EXT_ELEMENT_LOOPS(float)
REID_EXT_ELEMENT_LOOPS(double)
#undef REID_EXT_ELEMENT_LOOPS

// Everything the tile loops need about one problem.
template <typename scalar_t>
struct Problem {
  const UnifiedInputs& in;
  int mode;
  scalar_t gamma, margin;
  Codes labels;
  std::optional<Codes> modalities;  // modes "cross" and "intra" only
  // Inverse norms, and the radial factors of the normalization Jacobian (for the backward).
  std::vector<scalar_t> inv_x, inv_ref, radial_x, radial_ref;

  Problem(const UnifiedInputs& inputs, PairMode mode_, double gamma_, double margin_)
      : in(inputs), mode(static_cast<int>(mode_)), gamma(scalar_t(gamma_)), margin(scalar_t(margin_)),
        labels(in.labels, in.ref_labels, in.self_ref) {
    if (in.modalities.defined()) modalities.emplace(in.modalities, in.ref_modalities, in.self_ref);
    inverse_norms<scalar_t>(in.x, norm_eps<scalar_t>(), inv_x, &radial_x);
    if (!in.self_ref) inverse_norms<scalar_t>(in.ref, norm_eps<scalar_t>(), inv_ref, &radial_ref);
  }

  const std::vector<scalar_t>& ref_inv() const { return in.self_ref ? inv_x : inv_ref; }

  Side<scalar_t> anchors(int64_t first) const {
    const int32_t* l = labels.anchors.data();
    const int32_t* m = modalities ? modalities->anchors.data() : l;
    return {l + first, m + first, inv_x.data() + first};
  }

  Side<scalar_t> references(int64_t first) const {
    const int32_t* l = labels.reference_codes();
    const int32_t* m = modalities ? modalities->reference_codes() : l;
    return {l + first, m + first, ref_inv().data() + first};
  }
};

// A tile of the pair matrix: anchors [i0, i0+rows) against references [j0, j0+cols).
struct Tile {
  int64_t i0, rows, j0, cols;
  // A block pair of the batch against itself above the diagonal: S_ji = S_ij and the
  // pair rule is symmetric, so the tile also serves anchors [j0, j0+cols) as its columns.
  bool mirrored;
  // Pair (r, c) is an anchor with itself when r - c == self_shift (never against a bank).
  int64_t self_shift;
};


// Beyond a single tile, the batch against itself visits each pair of blocks once (half the dot
// products); blocks of 256 keep each BLAS call large enough to be efficient.
constexpr int64_t kSymmetricBlock = 256;

// Calls visit(tile) for every tile the anchors need. Two calls may run at once
// only if they write to disjoint anchors: rows, and the columns of mirrored tiles.
// A single tile (whole_dots) is visited as anchor blocks of whole rows.
template <typename F>
void for_each_tile(int64_t n, int64_t m, bool self_ref, const F& visit) {
  if (self_ref && !single_tile(n, m)) {
    const int64_t block = kSymmetricBlock, nb = (n + block - 1) / block;
    for (const auto& round : tile_pair_rounds(nb)) {
      parallel_over(static_cast<int64_t>(round.size()), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t i0 = round[t].first * block, j0 = round[t].second * block;
          visit(Tile{i0, std::min(block, n - i0), j0, std::min(block, n - j0), i0 != j0, j0 - i0});
        }
      });
    }
    return;
  }
  const int64_t block = anchor_block(n);
  parallel_over((n + block - 1) / block, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * block, rows = std::min(block, n - i0);
      const int64_t cols = single_tile(n, m) ? m : kBankTile;
      for (int64_t j0 = 0; j0 < m; j0 += cols) {
        visit(Tile{i0, rows, j0, std::min(cols, m - j0), false, self_ref ? j0 - i0 : kNoSelfPairs});
      }
    }
  });
}

// Largest tile for_each_tile visits.
inline std::pair<int64_t, int64_t> max_tile(int64_t n, int64_t m, bool self_ref) {
  if (single_tile(n, m)) return {anchor_block(n), m};
  if (self_ref) return {kSymmetricBlock, kSymmetricBlock};
  return {anchor_block(n), kBankTile};
}

// Thread-local scratch of one tile.
template <typename scalar_t>
struct TileScratch {
  at::Tensor dots;
  std::vector<scalar_t> a, b, col_a, col_b;

  TileScratch(const at::TensorOptions& options, int64_t rows, int64_t cols)
      : dots(at::empty({rows * cols}, options)), a(rows * cols), b(rows * cols), col_a(cols), col_b(cols) {}
};

// The dot products of a single-tile problem, computed once by one multi-threaded GEMM and
// shared by the forward and the backward of _unified_triplet_loss_with_grad; undefined otherwise.
inline at::Tensor whole_dots(const UnifiedInputs& in) {
  const int64_t n = in.x.size(0);
  if (!single_tile(n, in.ref.size(0))) return at::Tensor();
  if (!in.self_ref || n < kHalfDotsFrom) return at::mm(in.x, in.ref.t());
  // X X^T is symmetric: the top half of the rows and the bottom-right block, then a mirrored
  // copy of the bottom-left block: 3/4 of the multiply-adds.
  const int64_t h = n / 2;
  const at::Tensor top = in.x.narrow(0, 0, h), bottom = in.x.narrow(0, h, n - h);
  at::Tensor dots = at::empty({n, n}, in.x.options());
  at::Tensor top_rows = dots.narrow(0, 0, h), bottom_right = dots.narrow(0, h, n - h).narrow(1, h, n - h);
  at::mm_out(top_rows, top, in.x.t());
  at::mm_out(bottom_right, bottom, bottom.t());
  dots.narrow(0, h, n - h).narrow(1, 0, h).copy_(dots.narrow(0, 0, h).narrow(1, h, n - h).t());
  return dots;
}

// The forward's per-anchor outputs: loss, validity and the two log-sum-exps the backward reuses.
struct AnchorOutputs {
  at::Tensor loss, valid, lse_neg, lse_pos;

  explicit AnchorOutputs(const at::Tensor& x)
      : loss(at::empty({x.size(0)}, x.options())), valid(at::empty({x.size(0)}, x.options().dtype(at::kBool))),
        lse_neg(at::empty({x.size(0)}, x.options())), lse_pos(at::empty({x.size(0)}, x.options())) {}
};

// Anchors [begin, end) of the outputs from their complete running statistics.
template <typename scalar_t>
void finish_anchors(const Stats<scalar_t>& st, int64_t begin, int64_t end, AnchorOutputs& out) {
  scalar_t* loss_out = out.loss.data_ptr<scalar_t>();
  bool* valid_out = out.valid.data_ptr<bool>();
  scalar_t* neg_out = out.lse_neg.data_ptr<scalar_t>();
  scalar_t* pos_out = out.lse_pos.data_ptr<scalar_t>();
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN(), none = neg_infinity<scalar_t>();
  for (int64_t i = begin; i < end; ++i) {
    const bool has_neg = st.neg_nan[i] || st.neg_max[i] != none;
    const bool has_pos = st.pos_nan[i] || st.pos_max[i] != none;
    OnlineLSE<scalar_t> neg, pos;
    neg.max = st.neg_max[i], neg.sum = st.neg_sum[i];
    pos.max = st.pos_max[i], pos.sum = st.pos_sum[i];
    neg_out[i] = st.neg_nan[i] ? nan : neg.value();
    pos_out[i] = st.pos_nan[i] ? nan : pos.value();
    valid_out[i] = has_neg && has_pos;
    loss_out[i] = unified_anchor_loss(neg_out[i], pos_out[i], valid_out[i]);
  }
}

template <typename scalar_t>
void forward_impl(const Problem<scalar_t>& pb, const at::Tensor& all_dots, AnchorOutputs& out) {
  const UnifiedInputs& in = pb.in;
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  const auto tile_size = max_tile(n, m, in.self_ref);
  Stats<scalar_t> st(n);
  // One scratch per worker thread, indexed by the thread that runs the tile.
  std::vector<std::unique_ptr<TileScratch<scalar_t>>> scratch(at::get_num_threads());
  for_each_tile(n, m, in.self_ref, [&](const Tile& t) {
    auto& s = scratch[at::get_thread_num()];
    if (!s) s = std::make_unique<TileScratch<scalar_t>>(in.x.options(), tile_size.first, tile_size.second);
    const scalar_t* dots = all_dots.defined()
                               ? all_dots.data_ptr<scalar_t>() + t.i0 * m  // tiles are whole rows here
                               : tile_dots(s->dots, in.x, t.i0, t.rows, in.ref, t.j0, t.cols).template data_ptr<scalar_t>();
    const Side<scalar_t> refs = in.self_ref ? pb.anchors(t.j0) : pb.references(t.j0);
    pair_values(dots, t.rows, t.cols, t.self_shift, pb.anchors(t.i0), refs, pb.mode, pb.gamma, pb.margin,
                s->a.data(), s->b.data());
    const int64_t i0 = t.i0, j0 = t.j0;
    fold_rows(s->a.data(), t.rows, t.cols, st.neg_max.data() + i0, st.neg_sum.data() + i0, st.neg_nan.data() + i0);
    fold_rows(s->b.data(), t.rows, t.cols, st.pos_max.data() + i0, st.pos_sum.data() + i0, st.pos_nan.data() + i0);
    if (t.mirrored) {
      fold_cols(s->a.data(), t.rows, t.cols, st.neg_max.data() + j0, st.neg_sum.data() + j0, st.neg_nan.data() + j0,
                s->col_a.data(), s->col_b.data());
      fold_cols(s->b.data(), t.rows, t.cols, st.pos_max.data() + j0, st.pos_sum.data() + j0, st.pos_nan.data() + j0,
                s->col_a.data(), s->col_b.data());
    }
  });
  finish_anchors(st, 0, n, out);
}

// grad_x, and grad_ref when asked: acc_I += (g * inv_J) @ B_J per tile, then the Jacobian.
// all_dots: whole_dots(in), which the caller may share with the forward.
template <typename scalar_t>
void backward_impl(const Problem<scalar_t>& pb, const at::Tensor& all_dots, const scalar_t* grad_loss,
                   const bool* valid, const scalar_t* lse_neg, const scalar_t* lse_pos, at::Tensor& grad_x,
                   at::Tensor* grad_ref) {
  const UnifiedInputs& in = pb.in;
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  std::vector<scalar_t> weight(n), shift_neg(n), shift_pos(n);
  for (int64_t i = 0; i < n; ++i)
    anchor_factors(grad_loss[i], lse_neg[i], lse_pos[i], valid[i], weight[i], shift_neg[i], shift_pos[i]);
  auto anchor_grad = [&](int64_t first) {
    return AnchorGrad<scalar_t>{weight.data() + first, shift_neg.data() + first, shift_pos.data() + first};
  };
  const auto tile_size = max_tile(n, m, in.self_ref);
  std::vector<std::unique_ptr<TileScratch<scalar_t>>> scratch(at::get_num_threads());
  const bool whole = all_dots.defined();
  if (!whole) grad_x.zero_();
  if (grad_ref && !whole) grad_ref->zero_();
  // A single tile keeps its coefficients whole, for one GEMM per gradient after the loop.
  at::Tensor all_coef = whole ? at::empty({n, m}, in.x.options()) : at::Tensor();
  at::Tensor all_ref_coef = whole && grad_ref ? at::empty({n, m}, in.x.options()) : at::Tensor();
  for_each_tile(n, m, in.self_ref, [&](const Tile& t) {
    auto& s = scratch[at::get_thread_num()];
    if (!s) s = std::make_unique<TileScratch<scalar_t>>(in.x.options(), tile_size.first, tile_size.second);
    const int64_t i0 = t.i0, j0 = t.j0, rows = t.rows, cols = t.cols;
    const scalar_t* dots = whole ? all_dots.data_ptr<scalar_t>() + i0 * m  // tiles are whole rows here
                                 : tile_dots(s->dots, in.x, i0, rows, in.ref, j0, cols).template data_ptr<scalar_t>();
    const Side<scalar_t> a = pb.anchors(i0);
    const Side<scalar_t> b = in.self_ref ? pb.anchors(j0) : pb.references(j0);
    const AnchorGrad<scalar_t> row_anchor = anchor_grad(i0), col_anchor = anchor_grad(j0);
    // For the batch against itself S is symmetric, so x_i receives dL/dS_ij + dL/dS_ji: g carries
    // both, and a mirrored tile also sends it back to its column anchors. Against a bank, rows are the anchors.
    pair_grads(dots, rows, cols, t.self_shift, a, b, &row_anchor, in.self_ref ? &col_anchor : nullptr, pb.mode,
               pb.gamma, pb.margin, s->a.data());
    // Row side: acc_I += (g * inv_J) @ B_J (for a single tile, after the loop, as one GEMM).
    const scalar_t* g = s->a.data();
    scalar_t* scaled = whole ? all_coef.data_ptr<scalar_t>() + i0 * m : s->b.data();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) scaled[r * cols + c] = g[r * cols + c] * b.inv[c];
    if (whole) {
      if (grad_ref) {  // bank side: acc_ref = (g * inv_x)^T @ X
        scalar_t* ref_scaled = all_ref_coef.data_ptr<scalar_t>() + i0 * m;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) ref_scaled[r * cols + c] = g[r * cols + c] * a.inv[r];
      }
      return;
    }
    at::Tensor coef = at::from_blob(scaled, {rows, cols}, in.x.options());
    grad_x.narrow(0, i0, rows).addmm_(coef, in.ref.narrow(0, j0, cols));
    if (t.mirrored) {  // column side: acc_J += (g * inv_I)^T @ X_I
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) scaled[r * cols + c] = g[r * cols + c] * a.inv[r];
      grad_x.narrow(0, j0, cols).addmm_(coef.t(), in.x.narrow(0, i0, rows));
    }
  });
  if (whole) at::mm_out(grad_x, all_coef, in.ref);
  if (whole && grad_ref) {
    at::mm_out(*grad_ref, all_ref_coef.t(), in.x);
    normalization_backward<scalar_t>(in.ref, pb.inv_ref, pb.radial_ref, *grad_ref);
  }
  // acc_i = sum_j dL/dS_ij inv_j b_j = dL/d(normalized x_i) becomes dL/dx_i.
  normalization_backward<scalar_t>(in.x, pb.inv_x, pb.radial_x, grad_x);
  if (!grad_ref || whole) return;

  // The bank's gradient is a column reduction: visit bank blocks in parallel as rows, anchors as columns.
  const int64_t ref_block = anchor_block(m);
  parallel_over((m + ref_block - 1) / ref_block, [&](int64_t begin, int64_t end) {
    TileScratch<scalar_t> s(in.x.options(), ref_block, kBankTile);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * ref_block, rows = std::min(ref_block, m - r0);
      for (int64_t c0 = 0; c0 < n; c0 += kBankTile) {
        const int64_t cols = std::min(kBankTile, n - c0);
        const scalar_t* dots = tile_dots(s.dots, in.ref, r0, rows, in.x, c0, cols).template data_ptr<scalar_t>();
        const Side<scalar_t> refs = pb.references(r0), anchors = pb.anchors(c0);
        const AnchorGrad<scalar_t> col_anchor = anchor_grad(c0);
        pair_grads(dots, rows, cols, kNoSelfPairs, refs, anchors, nullptr, &col_anchor, pb.mode, pb.gamma, pb.margin,
                   s.a.data());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) s.b[r * cols + c] = s.a[r * cols + c] * anchors.inv[c];
        at::Tensor coef = at::from_blob(s.b.data(), {rows, cols}, in.x.options());
        grad_ref->narrow(0, r0, rows).addmm_(coef, in.x.narrow(0, c0, cols));
      }
    }
  });
  normalization_backward<scalar_t>(in.ref, pb.inv_ref, pb.radial_ref, *grad_ref);
}

std::tuple<at::Tensor, at::Tensor> unified_triplet_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels,
    const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
    const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& ref_modalities,
    const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos, double gamma, double margin,
    c10::string_view mode, c10::string_view reduction, bool grad_ref) {
  const UnifiedArgs args =
      check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
  check_cpu_dtype(x, "x");
  for (const auto& [t, name] : {std::pair{&valid, "valid"}, {&lse_neg, "lse_neg"}, {&lse_pos, "lse_pos"}}) {
    check_per_row(*t, name, x);
  }
  const UnifiedInputs in = unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, args.mode);
  const at::Tensor valid_c = valid.to(at::kBool).contiguous();
  const at::Tensor grad_c = anchor_grads(grad_loss, in.x, valid_c, args.reduction).to(in.x.scalar_type()).contiguous();
  const at::Tensor neg_c = lse_neg.to(in.x.scalar_type()).contiguous();
  const at::Tensor pos_c = lse_pos.to(in.x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(in.x);
  const bool want_ref = !in.self_ref && grad_ref;
  at::Tensor grad_ref_out = want_ref ? at::empty_like(in.ref) : no_gradient(in.x);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "unified_triplet_loss_backward_cpu", [&] {
    const Problem<scalar_t> pb(in, args.mode, gamma, margin);
    backward_impl<scalar_t>(pb, whole_dots(in), grad_c.data_ptr<scalar_t>(), valid_c.data_ptr<bool>(),
                            neg_c.data_ptr<scalar_t>(), pos_c.data_ptr<scalar_t>(), grad_x,
                            want_ref ? &grad_ref_out : nullptr);
  });
  return {grad_x, grad_ref_out};
}

// Against a bank, a panel of anchors holds whole rows of S, so its statistics are complete within
// the panel: the loss and dL/dS follow at once, and the panel's dot products serve both directions.
// Each panel's GEMMs read the whole bank, so a panel needs enough rows (kPanelRows) for them to be
// bound by arithmetic rather than by memory; panels hold at most kPanelPairs pairs (two buffers of
// 16 MiB in float32). Banks too large for kMinPanelRows rows take the tile passes.
constexpr int64_t kPanelRows = 256;
constexpr int64_t kPanelPairs = 1 << 22;
constexpr int64_t kMinPanelRows = 32;
constexpr int64_t kPanelRowsPerTask = 8;

inline bool bank_panels(int64_t m) { return m > 0 && m * kMinPanelRows <= kPanelPairs; }

// The per-anchor outputs, and the gradients of sum_i L_i (grad_loss = 1), of a bank problem.
template <typename scalar_t>
void bank_panels_impl(const Problem<scalar_t>& pb, AnchorOutputs& out, at::Tensor& grad_x, at::Tensor* grad_ref) {
  const UnifiedInputs& in = pb.in;
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  const int64_t panel = std::min(n, std::max(kMinPanelRows, std::min(kPanelRows, kPanelPairs / m)));
  // The panel's dot products, overwritten by the anchors' coefficients once dL/dS is known; dL/dS,
  // overwritten by the bank's coefficients.
  at::Tensor dots = at::empty({panel, m}, in.x.options()), coef = at::empty({panel, m}, in.x.options());
  Stats<scalar_t> st(n);
  std::vector<scalar_t> weight(n), shift_neg(n), shift_pos(n);
  const scalar_t* lse_neg = out.lse_neg.data_ptr<scalar_t>();
  const scalar_t* lse_pos = out.lse_pos.data_ptr<scalar_t>();
  const bool* valid = out.valid.data_ptr<bool>();
  const Side<scalar_t> refs = pb.references(0);
  if (grad_ref) grad_ref->zero_();
  for (int64_t p0 = 0; p0 < n; p0 += panel) {
    const int64_t rows = std::min(panel, n - p0);
    at::Tensor panel_dots = dots.narrow(0, 0, rows), bank_coef = coef.narrow(0, 0, rows);
    at::mm_out(panel_dots, in.x.narrow(0, p0, rows), in.ref.t());
    parallel_over((rows + kPanelRowsPerTask - 1) / kPanelRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> neg(kPanelRowsPerTask * m), pos(kPanelRowsPerTask * m);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r0 = task * kPanelRowsPerTask, count = std::min(kPanelRowsPerTask, rows - r0), i0 = p0 + r0;
        scalar_t* d = dots.data_ptr<scalar_t>() + r0 * m;
        scalar_t* g = coef.data_ptr<scalar_t>() + r0 * m;
        const Side<scalar_t> a = pb.anchors(i0);
        pair_values(d, count, m, kNoSelfPairs, a, refs, pb.mode, pb.gamma, pb.margin, neg.data(), pos.data());
        fold_rows(neg.data(), count, m, st.neg_max.data() + i0, st.neg_sum.data() + i0, st.neg_nan.data() + i0);
        fold_rows(pos.data(), count, m, st.pos_max.data() + i0, st.pos_sum.data() + i0, st.pos_nan.data() + i0);
        finish_anchors(st, i0, i0 + count, out);
        for (int64_t i = i0; i < i0 + count; ++i)
          anchor_factors(scalar_t(1), lse_neg[i], lse_pos[i], valid[i], weight[i], shift_neg[i], shift_pos[i]);
        const AnchorGrad<scalar_t> row_anchor{weight.data() + i0, shift_neg.data() + i0, shift_pos.data() + i0};
        pair_grads(d, count, m, kNoSelfPairs, a, refs, &row_anchor, nullptr, pb.mode, pb.gamma, pb.margin, g);
        for (int64_t r = 0; r < count; ++r)
          for (int64_t c = 0; c < m; ++c) d[r * m + c] = g[r * m + c] * refs.inv[c];
        if (grad_ref) {
          for (int64_t r = 0; r < count; ++r)
            for (int64_t c = 0; c < m; ++c) g[r * m + c] *= a.inv[r];
        }
      }
    });
    at::Tensor panel_grad = grad_x.narrow(0, p0, rows);
    at::mm_out(panel_grad, panel_dots, in.ref);  // acc_I = (g * inv_ref) @ ref
    if (grad_ref) grad_ref->addmm_(bank_coef.t(), in.x.narrow(0, p0, rows));  // acc_ref += (g * inv_I)^T @ X_I
  }
  normalization_backward<scalar_t>(in.x, pb.inv_x, pb.radial_x, grad_x);
  if (grad_ref) normalization_backward<scalar_t>(in.ref, pb.inv_ref, pb.radial_ref, *grad_ref);
}

// The loss, reduced, and with a scalar reduction the gradients that grad_x / grad_ref ask for.
// A single-tile problem computes its dot products once for both directions, and so does a bank
// problem, panel by panel: two GEMMs of N*M*D (three with the bank's gradient) instead of three
// (five). A larger batch against itself runs the forward and the backward passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_triplet_loss_cpu(
    const at::Tensor& x, const at::Tensor& labels, const c10::optional<at::Tensor>& modalities,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin, c10::string_view mode,
    c10::string_view reduction, bool grad_x, bool grad_ref) {
  const UnifiedArgs args =
      check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
  check_cpu_dtype(x, "x");
  const UnifiedInputs in = unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, args.mode);
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  const bool want_ref = !in.self_ref && grad_ref;
  const bool with_grad = args.reduction != Reduction::kNone && (grad_x || want_ref);
  AnchorOutputs out(in.x);
  at::Tensor grad_x_out = with_grad ? at::empty_like(in.x) : no_gradient(in.x);
  at::Tensor grad_ref_out = with_grad && want_ref ? at::empty_like(in.ref) : no_gradient(in.x);
  at::Tensor loss;
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the GEMMs inside are not part of the graph
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "unified_triplet_loss_cpu", [&] {
    const Problem<scalar_t> pb(in, args.mode, gamma, margin);
    // The panels give the loss and dL/dS at once, but the reduction's scale needs every anchor's
    // validity: they compute the gradient of the sum and scale it afterwards.
    const bool panels = with_grad && !in.self_ref && !single_tile(n, m) && bank_panels(m);
    const at::Tensor all_dots = panels ? at::Tensor() : whole_dots(in);
    if (panels) {
      bank_panels_impl<scalar_t>(pb, out, grad_x_out, want_ref ? &grad_ref_out : nullptr);
    } else {
      forward_impl<scalar_t>(pb, all_dots, out);
    }
    loss = reduce_anchors(out.loss, out.valid, args.reduction);
    if (!with_grad) return;
    const at::Tensor weights = reduction_weights(out.loss, out.valid, args.reduction);
    if (panels) {
      if (args.reduction == Reduction::kMean && n > 0) {
        grad_x_out.mul_(weights[0]);
        if (want_ref) grad_ref_out.mul_(weights[0]);
      }
    } else {
      backward_impl<scalar_t>(pb, all_dots, weights.data_ptr<scalar_t>(), out.valid.data_ptr<bool>(),
                              out.lse_neg.data_ptr<scalar_t>(), out.lse_pos.data_ptr<scalar_t>(), grad_x_out,
                              want_ref ? &grad_ref_out : nullptr);
    }
  });
  return {loss, grad_x ? grad_x_out : no_gradient(in.x), grad_ref_out, out.valid, out.lse_neg, out.lse_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("unified_triplet_loss", &unified_triplet_loss_cpu);
  m.impl("_unified_triplet_loss_backward", &unified_triplet_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
