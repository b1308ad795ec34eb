// cosine_softmax_loss on CPU.
//
// The N x C logits are visited in chunks of at most kChunkLogits (whole rows of
// classes unless C is very large), never all at once: one multi-threaded GEMM
// gives a chunk's dot products, vectorized row loops (anchors in parallel) fold
// them into per-anchor online log-sum-exps (forward) or turn them into dL/dz
// (backward), and one GEMM per gradient multiplies each chunk back, in a fixed
// order (deterministic). When the chunks are whole rows, _cosine_softmax_loss_with_grad
// turns each chunk's logits into its anchors' loss and dL/dz at once, so that its dot
// products serve both directions. Large rows of x and of the weights are scaled
// (see RowNorms).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu/tiles_cpu.h"
#include "reduction.h"

namespace reid_ext {
namespace cpu {
namespace {

template <typename scalar_t>
struct Logits {
  const int64_t* labels;
  scalar_t scale, margin, smoothing;
  int64_t num_classes;
};

// At most this many logits (2 MiB in float32) are held at once, and at most kChunkClasses per row.
constexpr int64_t kChunkLogits = int64_t(1) << 19;
constexpr int64_t kChunkClasses = 4096;

// A chunk of the logits: anchors [i0, i0 + rows) against classes [j0, j0 + cols).
struct Chunk {
  int64_t i0, rows, j0, cols;
};

// Anchors and classes of the largest chunk.
inline std::pair<int64_t, int64_t> chunk_shape(int64_t n, int64_t num_classes) {
  const int64_t cols = std::min(num_classes, kChunkClasses);
  return {std::min(n, std::max<int64_t>(1, kChunkLogits / std::max<int64_t>(cols, 1))), cols};
}

// Calls visit(chunk) for every chunk, anchors outer, classes inner.
template <typename F>
void for_each_chunk(int64_t n, int64_t num_classes, const F& visit) {
  const auto [rows, cols] = chunk_shape(n, num_classes);
  for (int64_t i0 = 0; i0 < n; i0 += rows)
    for (int64_t j0 = 0; j0 < num_classes; j0 += cols)
      visit(Chunk{i0, std::min(rows, n - i0), j0, std::min(cols, num_classes - j0)});
}

// Calls row(r, z) for the rows r of a chunk, anchors in parallel, z a scratch row of logits.
template <typename scalar_t, typename F>
void for_each_chunk_row(const Chunk& ch, const F& row) {
  at::parallel_for(0, ch.rows, rows_per_task(ch.cols), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> z(ch.cols);
    for (int64_t r = begin; r < end; ++r) row(r, z.data());
  });
}

inline bool single_chunk(int64_t n, int64_t num_classes) {
  return num_classes <= kChunkClasses && n * num_classes <= kChunkLogits;
}

// The dot products of a chunk, by a GEMM into scratch.
template <typename scalar_t>
const scalar_t* chunk_dots(const at::Tensor& x, const at::Tensor& weight, const Chunk& ch, at::Tensor& scratch) {
  if (!scratch.defined()) scratch = at::empty({ch.rows * ch.cols}, x.options());  // the first chunk is the largest
  return tile_dots(scratch, x, ch.i0, ch.rows, weight, ch.j0, ch.cols).template data_ptr<scalar_t>();
}

// z[c] = cosine_logit of one anchor against classes c in [0, cols), its target at column
// target (outside [0, cols) when the target class is not among them).
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void row_logits_impl(const scalar_t* dots, int64_t cols, int64_t target, scalar_t inv_row,
                                            const scalar_t* inv_cols, scalar_t scale, scalar_t margin, scalar_t* z) {
  for (int64_t c = 0; c < cols; ++c) z[c] = cosine_logit(dots[c] * inv_row * inv_cols[c], c == target, scale, margin);
}

// Folds z[0, cols) into lse (online) and adds it to logit_sum.
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void fold_logits_impl(const scalar_t* z, int64_t cols, OnlineLSE<scalar_t>& lse,
                                             scalar_t& logit_sum) {
  // A NaN logit is skipped by the max but makes the sum of exponentials NaN, which merge() keeps.
  const scalar_t m = lanes_max(z, cols);
  lse.merge(m, lanes_sum(z, cols, ShiftedExp<scalar_t>{m}));
  logit_sum += lanes_sum(z, cols, Identity());
}

// From the logits z[0, cols) of one anchor: g_c = grad_scale * dCE/dz_c, then
// coef_x[c] = g_c * inv_cols[c] and coef_w[c] = g_c * inv_row (each when wanted).
template <typename scalar_t, bool kX, bool kW>
REID_EXT_ALWAYS_INLINE void row_coefficients_impl(const scalar_t* z, int64_t cols, int64_t target, scalar_t lse,
                                                  scalar_t grad_scale, scalar_t smoothing, int64_t num_classes,
                                                  scalar_t inv_row, const scalar_t* inv_cols, scalar_t* coef_x,
                                                  scalar_t* coef_w) {
  for (int64_t c = 0; c < cols; ++c) {
    const scalar_t g = grad_scale * smoothed_cross_entropy_grad(z[c], lse, c == target, smoothing, num_classes, VExp());
    if (kX) coef_x[c] = g * inv_cols[c];
    if (kW) coef_w[c] = g * inv_row;
  }
}

// The vectorized row loops, compiled per ISA (see REID_EXT_CPU_CLONES).
#define REID_EXT_ROW_LOOPS(T)                                                                                     \
  REID_EXT_CPU_CLONES void row_logits(const T* dots, int64_t cols, int64_t target, T inv_row, const T* inv_cols,   \
                                      T scale, T margin, T* z) {                                                   \
    row_logits_impl<T>(dots, cols, target, inv_row, inv_cols, scale, margin, z);                                   \
  }                                                                                                               \
  REID_EXT_CPU_CLONES void fold_logits(const T* z, int64_t cols, OnlineLSE<T>& lse, T& logit_sum) {               \
    fold_logits_impl<T>(z, cols, lse, logit_sum);                                                                  \
  }                                                                                                               \
  REID_EXT_CPU_CLONES void row_coefficients(const T* z, int64_t cols, int64_t target, T lse, T grad_scale,          \
                                            T smoothing, int64_t num_classes, T inv_row, const T* inv_cols,        \
                                            T* coef_x, T* coef_w) {                                                \
    if (coef_x && coef_w)                                                                                         \
      row_coefficients_impl<T, true, true>(z, cols, target, lse, grad_scale, smoothing, num_classes, inv_row,     \
                                           inv_cols, coef_x, coef_w);                                              \
    else if (coef_x)                                                                                              \
      row_coefficients_impl<T, true, false>(z, cols, target, lse, grad_scale, smoothing, num_classes, inv_row,    \
                                            inv_cols, coef_x, coef_w);                                             \
    else if (coef_w) /* neither wanted (a private op's caller may ask for none): nothing to write */              \
      row_coefficients_impl<T, false, true>(z, cols, target, lse, grad_scale, smoothing, num_classes, inv_row,    \
                                            inv_cols, coef_x, coef_w);                                             \
  }
REID_EXT_ROW_LOOPS(float)
REID_EXT_ROW_LOOPS(double)
#undef REID_EXT_ROW_LOOPS

// Per-anchor statistics of the logits, folded over chunks of classes.
template <typename scalar_t>
struct AnchorFold {
  OnlineLSE<scalar_t> lse;
  scalar_t target = 0, logit_sum = 0;
};

// Everything the chunk loops need about one problem.
// x and weight are the rows the kernels work on: the inputs with their large rows scaled.
template <typename scalar_t>
struct Problem {
  Logits<scalar_t> lg;
  RowNorms<scalar_t> nx, nw;
  at::Tensor x, weight;

  Problem(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& labels, double scale, double margin,
          double smoothing)
      : lg{labels.data_ptr<int64_t>(), scalar_t(scale), scalar_t(margin), scalar_t(smoothing), weight_.size(0)},
        nx(x_), nw(weight_), x(nx.rows), weight(nw.rows) {}
};

// Folds the logits of anchor i against the chunk's classes (written to z) into fold.
template <typename scalar_t>
REID_EXT_ALWAYS_INLINE void fold_anchor(const Problem<scalar_t>& pb, const scalar_t* dots_row, const Chunk& ch,
                                        int64_t i, scalar_t* z, AnchorFold<scalar_t>& fold) {
  const int64_t target = pb.lg.labels[i] - ch.j0;
  row_logits(dots_row, ch.cols, target, pb.nx.inv[i], pb.nw.inv.data() + ch.j0, pb.lg.scale, pb.lg.margin, z);
  fold_logits(z, ch.cols, fold.lse, fold.logit_sum);
  if (target >= 0 && target < ch.cols) fold.target = z[target];
}

template <typename scalar_t>
REID_EXT_ALWAYS_INLINE scalar_t anchor_loss(const Problem<scalar_t>& pb, const AnchorFold<scalar_t>& fold,
                                            scalar_t lse) {
  return smoothed_cross_entropy(lse, fold.target, fold.logit_sum, pb.lg.smoothing, pb.lg.num_classes);
}

template <typename scalar_t>
void forward_impl(const Problem<scalar_t>& pb, at::Tensor& loss, at::Tensor& lse) {
  const int64_t n = pb.x.size(0), num_classes = pb.weight.size(0);
  std::vector<AnchorFold<scalar_t>> folds(n);
  at::Tensor scratch;
  for_each_chunk(n, num_classes, [&](const Chunk& ch) {
    const scalar_t* dots = chunk_dots<scalar_t>(pb.x, pb.weight, ch, scratch);
    for_each_chunk_row<scalar_t>(ch, [&](int64_t r, scalar_t* z) {
      fold_anchor(pb, dots + r * ch.cols, ch, ch.i0 + r, z, folds[ch.i0 + r]);
    });
  });
  scalar_t* loss_out = loss.data_ptr<scalar_t>();
  scalar_t* lse_out = lse.data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) {
    lse_out[i] = folds[i].lse.value();
    loss_out[i] = anchor_loss(pb, folds[i], lse_out[i]);
  }
}

// Coefficient rows of the gradients, one per chunk-sized buffer (undefined when not wanted).
template <typename scalar_t>
struct Coefficients {
  at::Tensor x, w;

  Coefficients(const Problem<scalar_t>& pb, bool want_x, bool want_w) {
    const auto [rows, cols] = chunk_shape(pb.x.size(0), pb.weight.size(0));
    if (want_x) x = at::empty({rows * cols}, pb.x.options());
    if (want_w) w = at::empty({rows * cols}, pb.x.options());
  }
  scalar_t* x_row(int64_t r, const Chunk& ch) const { return x.defined() ? x.data_ptr<scalar_t>() + r * ch.cols : nullptr; }
  scalar_t* w_row(int64_t r, const Chunk& ch) const { return w.defined() ? w.data_ptr<scalar_t>() + r * ch.cols : nullptr; }

  // grad_x[I] (+)= coef_x @ W[J] and grad_w[J] (+)= coef_w^T @ X[I]; a gradient that this chunk
  // covers alone is written, not accumulated (no zero-filled pass over it first).
  void multiply_back(const Problem<scalar_t>& pb, const Chunk& ch, at::Tensor* grad_x, bool write_x, at::Tensor* grad_w,
                     bool write_w) const {
    if (grad_x) {
      const at::Tensor c = x.narrow(0, 0, ch.rows * ch.cols).view({ch.rows, ch.cols});
      const at::Tensor w_rows = pb.weight.narrow(0, ch.j0, ch.cols);
      at::Tensor out = grad_x->narrow(0, ch.i0, ch.rows);
      write_x ? at::mm_out(out, c, w_rows) : out.addmm_(c, w_rows);
    }
    if (grad_w) {
      const at::Tensor c = w.narrow(0, 0, ch.rows * ch.cols).view({ch.rows, ch.cols}).t();
      const at::Tensor x_rows = pb.x.narrow(0, ch.i0, ch.rows);
      at::Tensor out = grad_w->narrow(0, ch.j0, ch.cols);
      write_w ? at::mm_out(out, c, x_rows) : out.addmm_(c, x_rows);
    }
  }
};

// grad_x and/or grad_w (either may be null): per chunk, coefficient rows in parallel, then
// multiplied back; last the normalization Jacobian, whose radial term is an_i . p_i (no
// second pass over the logits).
template <typename scalar_t>
void backward_impl(const Problem<scalar_t>& pb, const scalar_t* grad, const scalar_t* lse, at::Tensor* grad_x,
                   at::Tensor* grad_w) {
  if (!grad_x && !grad_w) return;  // no gradient wanted: no logits to recompute
  const int64_t n = pb.x.size(0), num_classes = pb.weight.size(0);
  // A single chunk writes each gradient once; accumulation across chunks (or none) needs zeros.
  const bool write = single_chunk(n, num_classes) && n > 0;
  if (grad_x && !write) grad_x->zero_();
  if (grad_w && !write) grad_w->zero_();
  at::Tensor scratch;
  const Coefficients<scalar_t> coef(pb, grad_x != nullptr, grad_w != nullptr);
  for_each_chunk(n, num_classes, [&](const Chunk& ch) {
    const scalar_t* dots = chunk_dots<scalar_t>(pb.x, pb.weight, ch, scratch);
    const scalar_t* inv_w = pb.nw.inv.data() + ch.j0;
    for_each_chunk_row<scalar_t>(ch, [&](int64_t r, scalar_t* z) {
      const int64_t i = ch.i0 + r, target = pb.lg.labels[i] - ch.j0;
      row_logits(dots + r * ch.cols, ch.cols, target, pb.nx.inv[i], inv_w, pb.lg.scale, pb.lg.margin, z);
      row_coefficients(z, ch.cols, target, lse[i], grad[i] * pb.lg.scale, pb.lg.smoothing, num_classes,
                       pb.nx.inv[i], inv_w, coef.x_row(r, ch), coef.w_row(r, ch));
    });
    coef.multiply_back(pb, ch, grad_x, write, grad_w, write);
  });
  if (grad_x) normalization_backward<scalar_t>(pb.nx, *grad_x);
  if (grad_w) normalization_backward<scalar_t>(pb.nw, *grad_w);
}

// Loss, log-sum-exps and gradients (dL/dloss_i = factor) when the chunks are whole rows
// (C <= kChunkClasses): a chunk's logits give its anchors' loss and dL/dz at once, so its dot
// products serve both directions: three GEMMs of N*C*D, as eager PyTorch, instead of four.
template <typename scalar_t>
void fused_impl(const Problem<scalar_t>& pb, scalar_t factor, at::Tensor& loss, at::Tensor& lse, at::Tensor* grad_x,
                at::Tensor* grad_w) {
  const int64_t n = pb.x.size(0), num_classes = pb.weight.size(0);
  TORCH_CHECK(num_classes <= kChunkClasses, "fused_impl needs chunks of whole rows");
  // grad_x gets whole rows from each chunk; grad_w is summed over the chunks unless there is one.
  const bool write_w = single_chunk(n, num_classes) && n > 0;
  if (grad_w && !write_w) grad_w->zero_();
  at::Tensor scratch;
  const Coefficients<scalar_t> coef(pb, grad_x != nullptr, grad_w != nullptr);
  scalar_t* loss_out = loss.data_ptr<scalar_t>();
  scalar_t* lse_out = lse.data_ptr<scalar_t>();
  for_each_chunk(n, num_classes, [&](const Chunk& ch) {
    const scalar_t* dots = chunk_dots<scalar_t>(pb.x, pb.weight, ch, scratch);
    for_each_chunk_row<scalar_t>(ch, [&](int64_t r, scalar_t* z) {
      const int64_t i = ch.i0 + r;
      AnchorFold<scalar_t> fold;
      fold_anchor(pb, dots + r * ch.cols, ch, i, z, fold);
      lse_out[i] = fold.lse.value();
      loss_out[i] = anchor_loss(pb, fold, lse_out[i]);
      row_coefficients(z, ch.cols, pb.lg.labels[i], lse_out[i], factor * pb.lg.scale, pb.lg.smoothing, num_classes,
                       pb.nx.inv[i], pb.nw.inv.data(), coef.x_row(r, ch), coef.w_row(r, ch));
    });
    coef.multiply_back(pb, ch, grad_x, true, grad_w, write_w);
  });
  if (grad_x) normalization_backward<scalar_t>(pb.nx, *grad_x);
  if (grad_w) normalization_backward<scalar_t>(pb.nw, *grad_w);
}

std::tuple<at::Tensor, at::Tensor> cosine_softmax_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
    const at::Tensor& lse_in, double scale, double margin, double label_smoothing, c10::string_view reduction,
    bool x_requires_grad, bool weight_requires_grad) {
  const Reduction r = check_cosine_softmax_args(x_in, weight_in, labels_in, scale, margin, label_smoothing, reduction);
  check_cpu_dtype(x_in, "x");
  check_per_row(lse_in, "lse", x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = checked_indices(labels_in, "labels", "a class index in", "C", weight.size(0));
  at::Tensor grad_x = x_requires_grad ? at::empty_like(x) : no_gradient(x);
  at::Tensor grad_w = weight_requires_grad ? at::empty_like(weight) : no_gradient(x);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_softmax_loss_backward_cpu", [&] {
    const at::Tensor g = anchor_grads(grad_loss, x, at::Tensor(), r).to(x.scalar_type()).contiguous();
    const at::Tensor lse = lse_in.to(x.scalar_type()).contiguous();
    const Problem<scalar_t> pb(x, weight, labels, scale, margin, label_smoothing);
    backward_impl<scalar_t>(pb, g.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), x_requires_grad ? &grad_x : nullptr,
                            weight_requires_grad ? &grad_w : nullptr);
  });
  return {grad_x, grad_w};
}

// The loss, reduced ("mean" over the N anchors), and with a scalar reduction the gradients that
// grad_x / grad_weight ask for: fused_impl when the chunks are whole rows, else the forward and
// the backward passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_softmax_loss_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& labels_in, double scale, double margin,
    double label_smoothing, c10::string_view reduction_name, bool grad_x, bool grad_weight) {
  const Reduction reduction =
      check_cosine_softmax_args(x_in, weight_in, labels_in, scale, margin, label_smoothing, reduction_name);
  check_cpu_dtype(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = checked_indices(labels_in, "labels", "a class index in", "C", weight.size(0));
  const int64_t n = x.size(0);
  const bool want_x = grad_x && reduction != Reduction::kNone, want_w = grad_weight && reduction != Reduction::kNone;
  at::Tensor loss = at::empty({n}, x.options());
  at::Tensor lse = at::empty({n}, x.options());
  at::Tensor grad_x_out = want_x ? at::empty_like(x) : no_gradient(x);
  at::Tensor grad_w_out = want_w ? at::empty_like(weight) : no_gradient(x);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the GEMMs inside are not part of the graph
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_softmax_loss_cpu", [&] {
    const Problem<scalar_t> pb(x, weight, labels, scale, margin, label_smoothing);
    if (!want_x && !want_w) {
      forward_impl<scalar_t>(pb, loss, lse);
      return;
    }
    at::Tensor* gx = want_x ? &grad_x_out : nullptr;
    at::Tensor* gw = want_w ? &grad_w_out : nullptr;
    // Without validity, the weights of a reduction are known before the loss.
    const at::Tensor weights = reduction_weights(loss, at::Tensor(), reduction);
    if (weight.size(0) <= kChunkClasses) {
      fused_impl<scalar_t>(pb, n > 0 ? weights.data_ptr<scalar_t>()[0] : scalar_t(1), loss, lse, gx, gw);
    } else {
      forward_impl<scalar_t>(pb, loss, lse);
      backward_impl<scalar_t>(pb, weights.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), gx, gw);
    }
  });
  return {reduce_anchors(loss, at::Tensor(), reduction), grad_x_out, grad_w_out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("cosine_softmax_loss", &cosine_softmax_loss_cpu);
  m.impl("_cosine_softmax_loss_backward", &cosine_softmax_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
