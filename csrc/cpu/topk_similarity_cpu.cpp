// topk_similarity on CPU: for every row of x, the k rows of y of largest (or smallest) cosine
// similarity and the row's extreme at the other end, without the N x M matrix. Tiles of dot
// products come from the BLAS (large rows scaled, see RowNorms), are scaled by the inverse norms,
// and fold into one bounded heap per row, kept in that row of the outputs; y = None visits each
// pair of row blocks once and folds the tile into both blocks' rows.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <utility>

#include "cpu/tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

// Columns per tile against another set: with up to 128 rows, 256 KiB of float32 dot products
// that stay in L2 while they are folded.
constexpr int64_t kColTile = 512;

// Running top-k of every row: row i's heap is values[i, :size[i]] / indices[i, :size[i]], its root
// the entry that ranks last (the first to go), and `far` the running extreme at the other end
// (the minimum with largest, the maximum without), NaN once any NaN was seen.
template <typename scalar_t>
struct RowTopK {
  scalar_t* values;
  int64_t* indices;
  int64_t k;
  bool largest;
  std::vector<int64_t> size;
  std::vector<scalar_t> far;

  RowTopK(at::Tensor& v, at::Tensor& idx, int64_t n, int64_t k_, bool largest_)
      : values(v.data_ptr<scalar_t>()), indices(idx.data_ptr<int64_t>()), k(k_), largest(largest_), size(n, 0),
        far(n, largest_ ? std::numeric_limits<scalar_t>::infinity() : -std::numeric_limits<scalar_t>::infinity()) {}

  // Offers similarity s with column j to row i.
  REID_EXT_ALWAYS_INLINE void offer(int64_t i, scalar_t s, int64_t j) {
    scalar_t* v = values + i * k;
    int64_t* idx = indices + i * k;
    int64_t& n = size[i];
    if (n < k) {
      sift_up(v, idx, n++, s, j);
      return;
    }
    // The common case once the heap is full: s ranks below the root (false if either is NaN).
    if (largest ? s < v[0] : s > v[0]) return;
    if (topk_before(s, j, v[0], idx[0], largest)) sift_down(v, idx, n, s, j);
  }

  // (s, j) enters at slot `pos` and moves up past every parent that ranks before it.
  void sift_up(scalar_t* v, int64_t* idx, int64_t pos, scalar_t s, int64_t j) const {
    while (pos > 0) {
      const int64_t parent = (pos - 1) / 2;
      if (!topk_before(v[parent], idx[parent], s, j, largest)) break;
      v[pos] = v[parent];
      idx[pos] = idx[parent];
      pos = parent;
    }
    v[pos] = s;
    idx[pos] = j;
  }

  // (s, j) replaces the root of a heap of n entries and moves down past every child that ranks after it.
  void sift_down(scalar_t* v, int64_t* idx, int64_t n, scalar_t s, int64_t j) const {
    int64_t pos = 0;
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= n) break;
      if (child + 1 < n && topk_before(v[child], idx[child], v[child + 1], idx[child + 1], largest)) ++child;
      if (!topk_before(s, j, v[child], idx[child], largest)) break;
      v[pos] = v[child];
      idx[pos] = idx[child];
      pos = child;
    }
    v[pos] = s;
    idx[pos] = j;
  }

  // The running far extreme of row i with `count` more values, `stride` apart.
  void update_far(int64_t i, const scalar_t* s, int64_t count, int64_t stride) {
    scalar_t e = far[i];
    bool nan = e != e;
    for (int64_t c = 0; c < count; ++c) {
      const scalar_t v = s[c * stride];
      nan |= v != v;
      e = (largest ? v < e : v > e) ? v : e;
    }
    far[i] = nan ? std::numeric_limits<scalar_t>::quiet_NaN() : e;
  }

  // Rows [begin, end) sorted, first-ranked first (a heap sort in place), and their far extremes.
  void finish(int64_t begin, int64_t end, scalar_t* far_out) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* v = values + i * k;
      int64_t* idx = indices + i * k;
      for (int64_t last = k - 1; last > 0; --last) {
        const scalar_t s = v[last];
        const int64_t j = idx[last];
        v[last] = v[0];
        idx[last] = idx[0];
        sift_down(v, idx, last, s, j);
      }
      far_out[i] = far[i];
    }
  }
};

// dots[r, c] <- cos(a_{i0+r}, b_{j0+c}) = dots[r, c] * (inv_a[i0 + r] * inv_b[j0 + c]), as cosine_similarity.
template <typename scalar_t>
void scale_tile(scalar_t* dots, int64_t rows, int64_t cols, const scalar_t* inv_a, const scalar_t* inv_b) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t ra = inv_a[r];
    for (int64_t c = 0; c < cols; ++c) dots[r * cols + c] *= ra * inv_b[c];
  }
}

// Folds a tile of similarities of rows [i0, i0+rows) with columns [j0, j0+cols) into its rows
// and, when `mirrored` (x against itself, a block pair above the diagonal), into rows [j0, j0+cols).
template <typename scalar_t>
void fold_tile(RowTopK<scalar_t>& st, const scalar_t* s, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
               bool mirrored) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = s + r * cols;
    for (int64_t c = 0; c < cols; ++c) st.offer(i0 + r, row[c], j0 + c);
    st.update_far(i0 + r, row, cols, 1);
  }
  if (!mirrored) return;
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) st.offer(j0 + c, s[r * cols + c], i0 + r);
    st.update_far(j0 + c, s + c, rows, cols);
  }
}

template <typename scalar_t>
void topk_impl(const at::Tensor& x, const at::Tensor& y, bool self, double eps, RowTopK<scalar_t>& st) {
  const int64_t n = x.size(0), m = y.size(0);
  const RowNorms<scalar_t> nx(x, static_cast<scalar_t>(eps));
  const std::optional<RowNorms<scalar_t>> ny =
      self ? std::nullopt : std::make_optional<RowNorms<scalar_t>>(y, static_cast<scalar_t>(eps));
  const RowNorms<scalar_t>& nb = self ? nx : *ny;
  const int64_t block = self ? kSymmetricBlock : anchor_block(n), cols_max = self ? kSymmetricBlock : kColTile;
  // One scratch tile per worker thread.
  std::vector<at::Tensor> scratch(at::get_num_threads());
  auto visit = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    at::Tensor& buf = scratch[at::get_thread_num()];
    if (!buf.defined()) buf = at::empty({block * cols_max}, x.options());
    scalar_t* s = tile_dots(buf, nx.rows, i0, rows, nb.rows, j0, cols).template data_ptr<scalar_t>();
    scale_tile(s, rows, cols, nx.inv.data() + i0, nb.inv.data() + j0);
    // Against itself, a block pair above the diagonal also serves the rows of its second block.
    fold_tile(st, s, i0, rows, j0, cols, self && i0 != j0);
  };
  if (self) {
    for_each_block_pair(n, visit);
  } else {
    for_each_row_tile(n, block, m, kColTile, visit);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_similarity_cpu(const at::Tensor& x_in,
                                                                    const c10::optional<at::Tensor>& y_in, int64_t k,
                                                                    bool largest, double eps) {
  check_topk_similarity_args(x_in, y_in, k, eps);
  check_cpu_dtype(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  const int64_t n = x.size(0);
  at::Tensor values = at::empty({n, k}, x.options());
  at::Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor far = at::empty({n}, x.options());
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the tile GEMMs are internal
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk_similarity_cpu", [&] {
    RowTopK<scalar_t> st(values, indices, n, k, largest);
    topk_impl<scalar_t>(x, y, !y_in.has_value(), eps, st);
    scalar_t* far_out = far.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) { st.finish(begin, end, far_out); });
  });
  return {values, indices, far};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) { m.impl("topk_similarity", &topk_similarity_cpu); }

}  // namespace cpu
}  // namespace reid_ext
