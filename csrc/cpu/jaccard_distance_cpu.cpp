// _jaccard_distance on CPU: the last two stages of k-reciprocal re-ranking (reid_ext.evaluation) on a
// sparse V, as compiled loops over its entries instead of a few hundred tensor ops.
//
// V (N x N, rows of N = Q + G samples, queries first) comes as its nonzero entries sorted by (row,
// column). With k2 > 1 the local query expansion first replaces each row by the mean of the rows
// of its min(k2, N) nearest samples, summed in rank order. Then each query row meets the gallery
// rows through an inverted index (the gallery entries of each column, in row order):
// m_ij = sum_f min(V[i, f], V[Q + j, f]), summed in increasing f as the dense algorithm sums, and
// the result is 1 - m / (2 - m). Memory: the Q x G result and O(entries of V).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"

namespace reid_ext {
namespace cpu {
namespace {

// Rows of a sparse matrix in compressed form: row r is entries [offsets[r], offsets[r + 1]).
template <typename scalar_t>
struct SparseRows {
  std::vector<int64_t> offsets, cols;
  std::vector<scalar_t> vals;
};

// min as np.minimum: NaN if either is NaN.
template <typename scalar_t>
inline scalar_t nan_min(scalar_t a, scalar_t b) {
  return (a != a || b != b) ? std::numeric_limits<scalar_t>::quiet_NaN() : (b < a ? b : a);
}

// V'[i] = (1 / kq) sum_{r < kq} V[ranks[i, r]], each row's entries sorted by column.
template <typename scalar_t>
SparseRows<scalar_t> expand(const SparseRows<scalar_t>& v, const int64_t* ranks, int64_t rank_stride, int64_t n,
                            int64_t kq) {
  std::vector<std::vector<int64_t>> row_cols(n);
  std::vector<std::vector<scalar_t>> row_vals(n);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> sum(n, scalar_t(0));
    std::vector<int64_t> seen(n, -1);  // seen[c] == i: column c is in row i's sum
    std::vector<int64_t> touched;
    for (int64_t i = begin; i < end; ++i) {
      touched.clear();
      for (int64_t r = 0; r < kq; ++r) {
        const int64_t source = ranks[i * rank_stride + r];
        for (int64_t e = v.offsets[source]; e < v.offsets[source + 1]; ++e) {
          const int64_t c = v.cols[e];
          if (seen[c] != i) {
            seen[c] = i;
            sum[c] = scalar_t(0);
            touched.push_back(c);
          }
          sum[c] += v.vals[e];
        }
      }
      std::sort(touched.begin(), touched.end());
      row_cols[i] = touched;
      row_vals[i].resize(touched.size());
      for (size_t t = 0; t < touched.size(); ++t) row_vals[i][t] = sum[touched[t]] / static_cast<scalar_t>(kq);
    }
  });
  SparseRows<scalar_t> out;
  out.offsets.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) out.offsets[i + 1] = out.offsets[i] + static_cast<int64_t>(row_cols[i].size());
  out.cols.reserve(out.offsets[n]);
  out.vals.reserve(out.offsets[n]);
  for (int64_t i = 0; i < n; ++i) {
    out.cols.insert(out.cols.end(), row_cols[i].begin(), row_cols[i].end());
    out.vals.insert(out.vals.end(), row_vals[i].begin(), row_vals[i].end());
  }
  return out;
}

// The Q x G Jaccard distances 1 - m / (2 - m) of the query rows with the gallery rows of v.
template <typename scalar_t>
void jaccard(const SparseRows<scalar_t>& v, int64_t n, int64_t num_query, scalar_t* out) {
  const int64_t num_gallery = n - num_query;
  // The inverted index: for column f, the gallery rows holding it (increasing) and their values.
  std::vector<int64_t> starts(n + 1, 0);
  for (int64_t e = v.offsets[num_query]; e < v.offsets[n]; ++e) ++starts[v.cols[e] + 1];
  for (int64_t f = 0; f < n; ++f) starts[f + 1] += starts[f];
  std::vector<int64_t> holder(starts[n]), fill(starts.begin(), starts.end() - 1);
  std::vector<scalar_t> held(starts[n]);
  for (int64_t g = num_query; g < n; ++g) {
    for (int64_t e = v.offsets[g]; e < v.offsets[g + 1]; ++e) {
      const int64_t slot = fill[v.cols[e]]++;
      holder[slot] = g - num_query;
      held[slot] = v.vals[e];
    }
  }
  at::parallel_for(0, num_query, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* m = out + i * num_gallery;
      std::fill(m, m + num_gallery, scalar_t(0));
      for (int64_t e = v.offsets[i]; e < v.offsets[i + 1]; ++e) {
        const int64_t f = v.cols[e];
        const scalar_t value = v.vals[e];
        for (int64_t h = starts[f]; h < starts[f + 1]; ++h) m[holder[h]] += nan_min(value, held[h]);
      }
      for (int64_t j = 0; j < num_gallery; ++j) m[j] = scalar_t(1) - m[j] / (scalar_t(2) - m[j]);
    }
  });
}

at::Tensor jaccard_distance_cpu(const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& vals_in,
                                const at::Tensor& ranks_in, int64_t num_query, int64_t k2) {
  TORCH_CHECK_VALUE(ranks_in.dim() == 2, "ranks must be a 2-D integer Tensor[N, k], got shape ", ranks_in.sizes());
  TORCH_CHECK_TYPE(ranks_in.scalar_type() == at::kLong, "ranks must be int64, got ", ranks_in.scalar_type());
  const int64_t n = ranks_in.size(0);
  TORCH_CHECK_VALUE(num_query >= 0 && num_query <= n, "num_query must be in [0, N] with N = ", n,
                    " the rows of ranks, got ", num_query);
  TORCH_CHECK_VALUE(k2 >= 1, "k2 must be >= 1, got ", k2);
  const int64_t kq = std::min(k2, n);
  TORCH_CHECK_VALUE(k2 == 1 || ranks_in.size(1) >= kq, "ranks must have at least min(k2, N) = ", kq,
                    " columns, got ", ranks_in.size(1));
  TORCH_CHECK_VALUE(vals_in.dim() == 1, "vals must be a 1-D Tensor[E], got shape ", vals_in.sizes());
  check_cpu_dtype(vals_in, "vals");
  for (const auto& [t, name] : {std::pair{&rows_in, "rows"}, std::pair{&cols_in, "cols"}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == vals_in.size(0), name,
                      " must be a 1-D Tensor[E] like vals, got shape ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
  }
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous(), vals = vals_in.contiguous();
  const at::Tensor ranks = ranks_in.contiguous();
  const int64_t entries = vals.size(0);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* col = cols.data_ptr<int64_t>();
  for (int64_t e = 0; e < entries; ++e) {
    TORCH_CHECK_VALUE(row[e] >= 0 && row[e] < n && col[e] >= 0 && col[e] < n,
                      "rows and cols must be in [0, N) with N = ", n, ", got entry (", row[e], ", ", col[e], ")");
    TORCH_CHECK_VALUE(e == 0 || row[e - 1] < row[e] || (row[e - 1] == row[e] && col[e - 1] < col[e]),
                      "the entries must be sorted by (row, column) without repeats, but entry ", e, " (", row[e], ", ",
                      col[e], ") follows (", row[e - 1], ", ", col[e - 1], ")");
  }
  if (k2 > 1) {
    const int64_t* rank = ranks.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < kq; ++r)
        TORCH_CHECK_VALUE(rank[i * ranks.size(1) + r] >= 0 && rank[i * ranks.size(1) + r] < n,
                          "ranks must be in [0, N) with N = ", n, ", got ", rank[i * ranks.size(1) + r]);
  }
  at::Tensor out = at::empty({num_query, n - num_query}, vals.options());
  AT_DISPATCH_FLOATING_TYPES(vals.scalar_type(), "jaccard_distance_cpu", [&] {
    SparseRows<scalar_t> v;
    v.offsets.assign(n + 1, 0);
    for (int64_t e = 0; e < entries; ++e) ++v.offsets[row[e] + 1];
    for (int64_t i = 0; i < n; ++i) v.offsets[i + 1] += v.offsets[i];
    v.cols.assign(col, col + entries);
    const scalar_t* val = vals.data_ptr<scalar_t>();
    v.vals.assign(val, val + entries);
    if (k2 > 1) v = expand(v, ranks.data_ptr<int64_t>(), ranks.size(1), n, kq);
    jaccard(v, n, num_query, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) { m.impl("_jaccard_distance", &jaccard_distance_cpu); }

}  // namespace cpu
}  // namespace reid_ext
