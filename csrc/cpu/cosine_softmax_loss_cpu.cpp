// cosine_softmax_loss on CPU.
//
// Forward: anchor blocks in parallel stream tiles of class weights past their
// anchors (one BLAS call per tile of dot products), normalize in the epilogue
// and fold the logits into an online log-sum-exp, the target logit and the sum
// of logits, which give the label-smoothed cross-entropy. The N x C logits are
// never stored. Backward: recomputes the tiles, turns them into dL/dcos with the
// saved log-sum-exp, and multiplies back: anchor blocks against the weights for
// grad_x, class blocks against the anchors for grad_weight (no scatter).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu/family_tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

using family::kBlockRows;
using family::kTileCols;

// Labels as int64, each checked to be a class index in [0, C).
at::Tensor checked_labels(const at::Tensor& labels, int64_t num_classes) {
  at::Tensor l = labels.to(at::kLong).contiguous();
  const int64_t* data = l.data_ptr<int64_t>();
  for (int64_t i = 0; i < l.numel(); ++i) {
    TORCH_CHECK(data[i] >= 0 && data[i] < num_classes, "labels[", i, "] = ", data[i],
                " is not a class index in [0, C=", num_classes, ")");
  }
  return l;
}

template <typename scalar_t>
struct Logits {
  const int64_t* labels;
  scalar_t scale, margin, smoothing;
  int64_t num_classes;
};

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const Logits<scalar_t>& lg, at::Tensor& loss,
                  at::Tensor& lse) {
  const int64_t num_classes = weight.size(0);
  const family::RowNorms<scalar_t> nx(x), nw(weight);
  scalar_t* loss_out = loss.data_ptr<scalar_t>();
  scalar_t* lse_out = lse.data_ptr<scalar_t>();
  family::for_each_row_block<scalar_t>(x, weight, [&](family::TileStream<scalar_t>& tiles, int64_t i0, int64_t rows) {
    OnlineLSE<scalar_t> row_lse[kBlockRows];
    scalar_t target[kBlockRows] = {}, logit_sum[kBlockRows] = {};
    for (int64_t j0 = 0; j0 < num_classes; j0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, num_classes - j0);
      const scalar_t* dots = tiles.dots(i0, rows, j0, cols);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r, label = lg.labels[i];
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = j0 + c;
          const scalar_t z = cosine_logit(dots[r * cols + c] * nx.inv[i] * nw.inv[j], j == label, lg.scale, lg.margin);
          row_lse[r].push(z);
          logit_sum[r] += z;
          if (j == label) target[r] = z;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t value = row_lse[r].value();
      lse_out[i0 + r] = value;
      loss_out[i0 + r] = smoothed_cross_entropy(value, target[r], logit_sum[r], lg.smoothing, num_classes);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cosine_softmax_loss_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                           const at::Tensor& labels_in, double scale, double margin,
                                                           double label_smoothing) {
  check_cosine_softmax_inputs(x_in, weight_in, labels_in, scale, label_smoothing);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = checked_labels(labels_in, weight.size(0));
  at::Tensor loss = at::empty({x.size(0)}, x.options());
  at::Tensor lse = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_softmax_loss_cpu", [&] {
    const Logits<scalar_t> lg{labels.data_ptr<int64_t>(), static_cast<scalar_t>(scale),
                              static_cast<scalar_t>(margin), static_cast<scalar_t>(label_smoothing),
                              weight.size(0)};
    forward_impl<scalar_t>(x, weight, lg, loss, lse);
  });
  return {loss, lse};
}

// One side of the backward. G_ic = grad_i * scale * dCE_i/dz_ic is dL/dcos_ic; with rows = anchors
// grad_x[i] = inv_i * sum_c G_ic inv_c w_c - x_i * radial_i * sum_c G_ic cos_ic, and with
// rows = classes the same with the roles of x and weight swapped (a column reduction of G).
template <typename scalar_t>
void backward_side(const at::Tensor& x, const at::Tensor& weight, const Logits<scalar_t>& lg, const scalar_t* grad,
                   const scalar_t* lse, const family::RowNorms<scalar_t>& nx,
                   const family::RowNorms<scalar_t>& nw, bool rows_are_anchors, at::Tensor& out) {
  const at::Tensor& a = rows_are_anchors ? x : weight;
  const at::Tensor& b = rows_are_anchors ? weight : x;
  const family::RowNorms<scalar_t>& na = rows_are_anchors ? nx : nw;
  const family::RowNorms<scalar_t>& nb = rows_are_anchors ? nw : nx;
  const int64_t cols_total = b.size(0), d = a.size(1);
  const scalar_t* a_data = a.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  family::for_each_row_block<scalar_t>(a, b, [&](family::TileStream<scalar_t>& tiles, int64_t i0, int64_t rows) {
    scalar_t radial_sum[kBlockRows] = {};
    tiles.clear_accumulator(rows);
    for (int64_t j0 = 0; j0 < cols_total; j0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, cols_total - j0);
      const scalar_t* dots = tiles.dots(i0, rows, j0, cols);
      scalar_t* coef = tiles.coefficients();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t anchor = rows_are_anchors ? i0 + r : j0 + c;
          const int64_t cls = rows_are_anchors ? j0 + c : i0 + r;
          const bool is_target = lg.labels[anchor] == cls;
          const scalar_t cos = dots[r * cols + c] * na.inv[i0 + r] * nb.inv[j0 + c];
          const scalar_t z = cosine_logit(cos, is_target, lg.scale, lg.margin);
          const scalar_t g = grad[anchor] * lg.scale *
                             smoothed_cross_entropy_grad(z, lse[anchor], is_target, lg.smoothing, lg.num_classes);
          coef[r * cols + c] = g * nb.inv[j0 + c];
          radial_sum[r] += g * cos;
        }
      }
      tiles.accumulate(rows, j0, cols);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const scalar_t* acc = tiles.accumulated(r);
      const scalar_t shrink = na.radial[i] * radial_sum[r];
      for (int64_t k = 0; k < d; ++k) out_data[i * d + k] = na.inv[i] * acc[k] - shrink * a_data[i * d + k];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cosine_softmax_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
    const at::Tensor& lse_in, double scale, double margin, double label_smoothing, bool x_requires_grad,
    bool weight_requires_grad) {
  check_cosine_softmax_inputs(x_in, weight_in, labels_in, scale, label_smoothing);
  check_per_row(grad_loss, "grad_loss", x_in);
  check_per_row(lse_in, "lse", x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = checked_labels(labels_in, weight.size(0));
  const int64_t d = x.size(1);
  at::Tensor grad_x = x_requires_grad ? at::empty_like(x) : at::empty({0, d}, x.options());
  at::Tensor grad_w = weight_requires_grad ? at::empty_like(weight) : at::empty({0, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_softmax_loss_backward_cpu", [&] {
    const at::Tensor g = grad_loss.to(x.scalar_type()).contiguous();
    const at::Tensor lse = lse_in.to(x.scalar_type()).contiguous();
    const Logits<scalar_t> lg{labels.data_ptr<int64_t>(), static_cast<scalar_t>(scale),
                              static_cast<scalar_t>(margin), static_cast<scalar_t>(label_smoothing),
                              weight.size(0)};
    const family::RowNorms<scalar_t> nx(x), nw(weight);
    if (x_requires_grad) {
      backward_side<scalar_t>(x, weight, lg, g.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), nx, nw, true, grad_x);
    }
    if (weight_requires_grad) {
      backward_side<scalar_t>(x, weight, lg, g.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), nx, nw, false,
                              grad_w);
    }
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("cosine_softmax_loss", &cosine_softmax_loss_cpu);
  m.impl("_cosine_softmax_loss_backward", &cosine_softmax_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
