// The element loops of unified_triplet_loss on CPU: a tile of dot products becomes the masked
// pair values of the forward, folded into per-anchor online log-sum-exps, or the dL/dS of the
// backward. The pair rule and the pair values and gradients are common.h's (pair_kind,
// unified_pair_value, unified_pair_grad_shifted), in the branch-free form that vectorizes.
// Included by unified_triplet_loss_cpu.cpp only: the loops are compiled once, per ISA.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <limits>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "cpu/vector_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

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

// Masked pair values of a tile: neg[r, c] = gamma*(s+margin) for negatives,
// pos[r, c] = -gamma*s for positives, -inf where the pair does not count
// (r - c == self_shift is an anchor paired with itself).
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void pair_values_impl(const scalar_t* dots, int64_t rows, int64_t cols, int64_t self_shift,
                                             Side<scalar_t> a, Side<scalar_t> b, int mode, scalar_t gamma,
                                             scalar_t margin, scalar_t* neg, scalar_t* pos) {
  const scalar_t none = neg_infinity<scalar_t>();
  const int32_t cols32 = static_cast<int32_t>(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t label = a.labels[r], modality = a.modalities[r], self_c = self_column(r, cols, self_shift);
    const scalar_t inv_r = a.inv[r];
    const scalar_t* d = dots + r * cols;
    scalar_t* nr = neg + r * cols;
    scalar_t* pr = pos + r * cols;
    for (int32_t c = 0; c < cols32; ++c) {
      // Every load unconditional: the loop must if-convert to vectorize.
      const int kind = pair_kind(mode, c == self_c, label, b.labels[c], modality, b.modalities[c]);
      const scalar_t v = unified_pair_value(kind > 0, d[c] * inv_r * b.inv[c], gamma, margin);
      nr[c] = kind < 0 ? v : none;
      pr[c] = kind > 0 ? v : none;
    }
  }
}

// Folds each row of values[rows, cols] into the running log-sum-exp of anchor r (run[r]). A NaN
// value is skipped by the max but makes the sum NaN (vexp keeps NaN); a row whose values are all
// -inf or NaN has no max to shift by, so only then is it searched for a NaN. Keeping NaN checks
// out of the max loop lets its lanes stay in vector registers.
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void fold_rows_impl(const scalar_t* values, int64_t rows, int64_t cols,
                                           OnlineLSE<scalar_t>* run) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* v = values + r * cols;
    const scalar_t m = lanes_max(v, cols);
    if (m == neg_infinity<scalar_t>()) {  // no pair in this tile, or only NaN pairs
      int has_nan = 0;
      for (int64_t c = 0; c < cols; ++c) has_nan |= v[c] != v[c];
      if (has_nan) run[r].push(quiet_nan<scalar_t>());
      continue;
    }
    run[r].merge(m, lanes_sum(v, cols, ShiftedExp<scalar_t>{m}));
  }
}

// The same for each column of values[rows, cols] (anchors of the J block of a symmetric pair),
// with col_max and col_sum as scratch of cols entries. A column of -inf and NaN is shifted by 0
// instead of its max: its sum is then 0, or NaN if it has a NaN, which merge() keeps.
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void fold_cols_impl(const scalar_t* values, int64_t rows, int64_t cols,
                                           OnlineLSE<scalar_t>* run, scalar_t* col_max, scalar_t* col_sum) {
  const scalar_t none = neg_infinity<scalar_t>();
  for (int64_t c = 0; c < cols; ++c) col_max[c] = none, col_sum[c] = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t x = values[r * cols + c];
      col_max[c] = x > col_max[c] ? x : col_max[c];
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t shift = col_max[c] == none ? scalar_t(0) : col_max[c];
      col_sum[c] += vexp(values[r * cols + c] - shift);
    }
  for (int64_t c = 0; c < cols; ++c) run[c].merge(col_max[c], col_sum[c]);
}

// Per-anchor factors of dL/dS: weight w = grad * sigmoid(LSE_neg + LSE_pos) (0 if invalid), and
// the shifts that the exponentials subtract (unified_grad_shift).
template <typename scalar_t>
struct AnchorGrad {
  const scalar_t* weight;
  const scalar_t* shift_neg;
  const scalar_t* shift_pos;
};

// g[r, c] = dL/dS of the tile's pairs: (anchor r, reference c) with kRows, plus
// (anchor c, reference r) with kCols. The flags are template arguments so that
// the element loop has no branches and vectorizes.
template <typename scalar_t, bool kRows, bool kCols>
REID_EXT_ALWAYS_INLINE void pair_grads_impl(const scalar_t* dots, int64_t rows_n, int64_t cols_n, int64_t self_shift,
                                            Side<scalar_t> a, Side<scalar_t> b, const AnchorGrad<scalar_t>* rows,
                                            const AnchorGrad<scalar_t>* cols, int mode, scalar_t gamma,
                                            scalar_t margin, scalar_t* g) {
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
      // Every load unconditional: the loop must if-convert to vectorize.
      const int kind = pair_kind(mode, c == self_c, label, b.labels[c], modality, b.modalities[c]);
      const scalar_t s = d[c] * inv_r * b.inv[c];
      scalar_t value = 0;
      if (kRows) value += unified_pair_grad_shifted(kind, s, w_r, neg_r, pos_r, gamma, margin, VExp());
      if (kCols) {
        value += unified_pair_grad_shifted(kind, s, w_cols[c], neg_cols[c], pos_cols[c], gamma, margin, VExp());
      }
      gr[c] = value;
    }
  }
}

// The vectorized element loops, compiled per ISA (see REID_EXT_CPU_CLONES).
#define REID_EXT_ELEMENT_LOOPS(T)                                                                                  \
  REID_EXT_CPU_CLONES void pair_values(const T* dots, int64_t rows, int64_t cols, int64_t self_shift, Side<T> a,  \
                                       Side<T> b, int mode, T gamma, T margin, T* neg, T* pos) {                   \
    pair_values_impl<T>(dots, rows, cols, self_shift, a, b, mode, gamma, margin, neg, pos);                        \
  }                                                                                                                \
  REID_EXT_CPU_CLONES void fold_rows(const T* values, int64_t rows, int64_t cols, OnlineLSE<T>* run) {            \
    fold_rows_impl<T>(values, rows, cols, run);                                                                    \
  }                                                                                                                \
  REID_EXT_CPU_CLONES void fold_cols(const T* values, int64_t rows, int64_t cols, OnlineLSE<T>* run, T* col_max,  \
                                     T* col_sum) {                                                                 \
    fold_cols_impl<T>(values, rows, cols, run, col_max, col_sum);                                                  \
  }                                                                                                                \
  REID_EXT_CPU_CLONES void pair_grads(const T* dots, int64_t rows_n, int64_t cols_n, int64_t self_shift, Side<T> a, \
                                      Side<T> b, const AnchorGrad<T>* rows, const AnchorGrad<T>* cols, int mode,   \
                                      T gamma, T margin, T* g) {                                                   \
    if (rows && cols)                                                                                              \
      pair_grads_impl<T, true, true>(dots, rows_n, cols_n, self_shift, a, b, rows, cols, mode, gamma, margin, g);  \
    else if (rows)                                                                                                 \
      pair_grads_impl<T, true, false>(dots, rows_n, cols_n, self_shift, a, b, rows, cols, mode, gamma, margin, g); \
    else                                                                                                           \
      pair_grads_impl<T, false, true>(dots, rows_n, cols_n, self_shift, a, b, rows, cols, mode, gamma, margin, g); \
  }
REID_EXT_ELEMENT_LOOPS(float)
REID_EXT_ELEMENT_LOOPS(double)
#undef REID_EXT_ELEMENT_LOOPS

}  // namespace
}  // namespace cpu
}  // namespace reid_ext
