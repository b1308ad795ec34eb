// batch_hard_triplet_loss on CPU.
//
// Forward: anchor blocks in parallel; each streams tiles of the batch past its
// anchors (one BLAS call per tile), turns the dot products into distances and
// keeps each anchor's running hardest positive and negative. Only a tile of the
// N x N distance matrix ever exists. The cosine metric works on the rows with
// the large ones scaled (see RowNorms); the euclidean ones on the rows as they are.
// Backward: the loss depends on two distances per anchor, so the gradient is
// O(N * D): every row collects its own two pairs and the pairs in which other
// anchors selected it, found through a counting sort of the selected indices,
// in a fixed order (deterministic, no scatter races).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu/tiles_cpu.h"
#include "reduction.h"

namespace reid_ext {
namespace cpu {
namespace {

// The norms of x that metric needs: of x itself for the euclidean metrics, which are not
// scale-invariant, and of x with its large rows scaled for the cosine one.
template <typename scalar_t>
RowNorms<scalar_t> metric_norms(const at::Tensor& x, int metric) {
  return RowNorms<scalar_t>(x, norm_eps<scalar_t>(), metric == kMetricCosine);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const int64_t* labels, scalar_t margin, int metric, bool soft,
                  at::Tensor& loss, at::Tensor& valid, at::Tensor& pos_idx, at::Tensor& neg_idx,
                  at::Tensor& dist_ap, at::Tensor& dist_an) {
  const int64_t n = x.size(0);
  const RowNorms<scalar_t> norms = metric_norms<scalar_t>(x, metric);
  const scalar_t* sq = norms.sq.data();
  const scalar_t* inv = norms.inv.data();
  scalar_t* loss_out = loss.data_ptr<scalar_t>();
  bool* valid_out = valid.data_ptr<bool>();
  int64_t* pos_out = pos_idx.data_ptr<int64_t>();
  int64_t* neg_out = neg_idx.data_ptr<int64_t>();
  scalar_t* ap_out = dist_ap.data_ptr<scalar_t>();
  scalar_t* an_out = dist_an.data_ptr<scalar_t>();

  for_each_row_block<scalar_t>(norms.rows, norms.rows, [&](TileStream<scalar_t>& tiles, int64_t i0, int64_t rows) {
    Hardest<scalar_t> pos[kBlockRows], neg[kBlockRows];
    scalar_t dist[kTileCols];
    for (int64_t j0 = 0; j0 < n; j0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, n - j0);
      const scalar_t* dots = tiles.dots(i0, rows, j0, cols);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const int64_t label = labels[i];
        // Distances first, in a loop the compiler vectorizes; then the selection, which branches.
        for (int64_t c = 0; c < cols; ++c) {
          dist[c] = pair_distance<scalar_t>(metric, dots[r * cols + c], sq[i], sq[j0 + c], inv[i], inv[j0 + c]);
        }
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = j0 + c;
          if (j == i) continue;
          if (labels[j] == label) {
            pos[r].offer_in_order(dist[c], j, true);
          } else {
            neg[r].offer_in_order(dist[c], j, false);
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const bool ok = pos[r].index >= 0 && neg[r].index >= 0;
      valid_out[i] = ok;
      pos_out[i] = pos[r].index;
      neg_out[i] = neg[r].index;
      // An anchor without a positive (negative) has no such distance; 0 keeps the outputs finite.
      ap_out[i] = pos[r].index >= 0 ? pos[r].dist : scalar_t(0);
      an_out[i] = neg[r].index >= 0 ? neg[r].dist : scalar_t(0);
      loss_out[i] = batch_hard_anchor_loss(ap_out[i], an_out[i], margin, soft, ok, sq[i]);
    }
  });
}

// The 2N selected pairs: pair p < N is (anchor p, pos_idx[p]), pair p >= N is
// (anchor p - N, neg_idx[p - N]). offsets/pairs list, for every row k, the pairs
// that selected k as their reference, in increasing pair order (a counting sort).
struct IncomingPairs {
  std::vector<int64_t> offsets, pairs;

  IncomingPairs(const int64_t* pos, const int64_t* neg, int64_t n) : offsets(n + 1, 0), pairs(2 * n) {
    auto target = [&](int64_t p) { return p < n ? pos[p] : neg[p - n]; };
    for (int64_t p = 0; p < 2 * n; ++p) {
      if (target(p) >= 0) ++offsets[target(p) + 1];
    }
    for (int64_t k = 0; k < n; ++k) offsets[k + 1] += offsets[k];
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < 2 * n; ++p) {
      if (target(p) >= 0) pairs[next[target(p)]++] = p;
    }
  }
};

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& x, const int64_t* pos, const int64_t* neg,
                   const scalar_t* dist_ap, const scalar_t* dist_an, scalar_t margin, int metric, bool soft,
                   at::Tensor& grad_x) {
  const int64_t n = x.size(0), d = x.size(1);
  const RowNorms<scalar_t> norms = metric_norms<scalar_t>(x, metric);
  const scalar_t* g = grad_loss.data_ptr<scalar_t>();
  // w[i] = dL/d(d_ap) of anchor i, = -dL/d(d_an).
  std::vector<scalar_t> w(n);
  for (int64_t i = 0; i < n; ++i) {
    w[i] = batch_hard_anchor_weight(g[i], dist_ap[i], dist_an[i], margin, soft, pos[i] >= 0 && neg[i] >= 0);
  }
  const IncomingPairs incoming(pos, neg, n);
  const scalar_t* xd = norms.rows.template data_ptr<scalar_t>();
  scalar_t* out = grad_x.data_ptr<scalar_t>();

  // Each row adds about 4 other rows (its own two pairs, and on average two that selected it).
  at::parallel_for(0, n, rows_per_task(4 * d), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      scalar_t* row = out + k * d;
      std::fill(row, row + d, scalar_t(0));
      scalar_t self = 0;  // coefficient of x_k itself, applied once at the end
      // The pair (k, other) at distance dist contributes coef * d dist / d x_k.
      auto add_pair = [&](int64_t other, scalar_t coef, scalar_t dist) {
        if (coef == scalar_t(0)) return;
        const PairGrad<scalar_t> pg =
            distance_grad<scalar_t>(metric, dist, norms.inv[k], norms.inv[other], norms.radial[k]);
        self += coef * pg.self;
        add_scaled(row, coef * pg.other, xd + other * d, d);
      };
      if (pos[k] >= 0) add_pair(pos[k], w[k], dist_ap[k]);
      if (neg[k] >= 0) add_pair(neg[k], -w[k], dist_an[k]);
      for (int64_t e = incoming.offsets[k]; e < incoming.offsets[k + 1]; ++e) {
        const int64_t p = incoming.pairs[e];
        if (p < n) add_pair(p, w[p], dist_ap[p]);
        else add_pair(p - n, -w[p - n], dist_an[p - n]);
      }
      add_scaled(row, self, xd + k * d, d);
    }
  });
  norms.unscale(grad_x);  // the gradient of the rows that the distances were computed from
}

at::Tensor batch_hard_triplet_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                                const at::Tensor& pos_idx, const at::Tensor& neg_idx,
                                                const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin,
                                                c10::string_view metric_name, bool soft_margin,
                                                c10::string_view reduction) {
  check_features(x_in, "x");
  check_cpu_dtype(x_in, "x");
  check_finite_nonnegative(margin, "margin");
  const Metric metric = parse_metric(metric_name);
  check_index(pos_idx, "pos_idx", x_in, "x");
  check_index(neg_idx, "neg_idx", x_in, "x");
  check_per_row(dist_ap, "dist_ap", x_in);
  check_per_row(dist_an, "dist_an", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  const at::Tensor pos = pos_idx.to(at::kLong).contiguous();
  const at::Tensor neg = neg_idx.to(at::kLong).contiguous();
  const int64_t* pos_data = pos.data_ptr<int64_t>();
  const int64_t* neg_data = neg.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(pos_data[i] >= -1 && pos_data[i] < n && neg_data[i] >= -1 && neg_data[i] < n,
                      "pos_idx and neg_idx must be in [-1, N)");
  }
  at::Tensor grad_x = at::empty_like(x);
  const at::Tensor grads = anchor_grads(grad_loss, x, pos.ge(0).logical_and(neg.ge(0)), parse_reduction(reduction));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_hard_triplet_loss_backward_cpu", [&] {
    const at::Tensor g = grads.to(x.scalar_type()).contiguous();
    const at::Tensor ap = dist_ap.to(x.scalar_type()).contiguous();
    const at::Tensor an = dist_an.to(x.scalar_type()).contiguous();
    backward_impl<scalar_t>(g, x, pos_data, neg_data, ap.data_ptr<scalar_t>(), an.data_ptr<scalar_t>(),
                            static_cast<scalar_t>(margin), metric, soft_margin, grad_x);
  });
  return grad_x;
}

// The loss, reduced, the hardest pairs, and with a scalar reduction and grad_x the gradient
// (two distances per anchor: the backward pass is O(N * D)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_hard_triplet_loss_cpu(const at::Tensor& x_in, const at::Tensor& labels_in, double margin,
                            c10::string_view metric_name, bool soft_margin, c10::string_view reduction,
                            bool grad_x) {
  const BatchHardArgs args = check_batch_hard_args(x_in, labels_in, margin, metric_name, reduction);
  check_cpu_dtype(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = x.size(0);
  at::Tensor loss = at::empty({n}, x.options());
  at::Tensor valid = at::empty({n}, x.options().dtype(at::kBool));
  at::Tensor pos_idx = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor neg_idx = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor dist_ap = at::empty({n}, x.options());
  at::Tensor dist_an = at::empty({n}, x.options());
  const bool with_grad = grad_x && args.reduction != Reduction::kNone;
  at::Tensor grad = with_grad ? at::empty_like(x) : no_gradient(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_hard_triplet_loss_cpu", [&] {
    forward_impl<scalar_t>(x, labels.data_ptr<int64_t>(), static_cast<scalar_t>(margin), args.metric, soft_margin,
                           loss, valid, pos_idx, neg_idx, dist_ap, dist_an);
    if (with_grad) {
      backward_impl<scalar_t>(reduction_weights(loss, valid, args.reduction), x, pos_idx.data_ptr<int64_t>(),
                              neg_idx.data_ptr<int64_t>(), dist_ap.data_ptr<scalar_t>(),
                              dist_an.data_ptr<scalar_t>(), static_cast<scalar_t>(margin), args.metric, soft_margin,
                              grad);
    }
  });
  return {reduce_anchors(loss, valid, args.reduction), grad, valid, pos_idx, neg_idx, dist_ap, dist_an};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("batch_hard_triplet_loss", &batch_hard_triplet_loss_cpu);
  m.impl("_batch_hard_triplet_loss_backward", &batch_hard_triplet_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
