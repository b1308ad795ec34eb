// unified_triplet_loss on CUDA: checks, device guard, scratch from the caching
// allocator, and launches on the current stream (no host synchronisation).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include "cuda/cuda_glue.h"
#include "reduction.h"

namespace reid_ext {
namespace cuda {
namespace {

// Splits of the forward's reference range; partial statistics are tiny.
constexpr int kMaxForwardSplits = 64;
// Splits of the backward's column range; each costs a float32 copy of the gradient.
constexpr int kMaxBackwardSplits = 8;

const int64_t* index_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }

// The problem as the kernels read it; `norms` receives the buffer of the rows' RowNorms, which the
// launchers fill, and must outlive the launches.
UnifiedProblem problem_of(const UnifiedInputs& in, double gamma, double margin, PairMode mode, at::Tensor& norms) {
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  norms = at::empty({2 * (n + (in.self_ref ? 0 : m))}, in.x.options().dtype(at::kFloat));
  float* inv_x = norms.data_ptr<float>();
  float* inv_ref = in.self_ref ? inv_x : inv_x + 2 * n;
  UnifiedProblem pb{};
  pb.x = in.x.data_ptr();
  pb.ref = in.ref.data_ptr();
  pb.labels = index_ptr(in.labels);
  pb.modalities = index_ptr(in.modalities);
  pb.ref_labels = index_ptr(in.ref_labels);
  pb.ref_modalities = index_ptr(in.ref_modalities);
  pb.inv_x = inv_x;
  pb.radial_x = inv_x + n;
  pb.inv_ref = inv_ref;
  pb.radial_ref = in.self_ref ? inv_x + n : inv_ref + m;
  pb.n = n;
  pb.m = m;
  pb.d = in.x.size(1);
  pb.gamma = static_cast<float>(gamma);
  pb.margin = static_cast<float>(margin);
  pb.mode = static_cast<int>(mode);
  pb.self_ref = in.self_ref;
  pb.kind = scalar_kind(in.x, "x");
  return pb;
}

at::Tensor backward_side(const UnifiedInputs& in, const UnifiedProblem& problem, const at::Tensor& grad_loss,
                         const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos,
                         bool rows_are_anchors) {
  const at::Tensor& side = rows_are_anchors ? in.x : in.ref;
  const int64_t rows = side.size(0), cols = rows_are_anchors ? in.ref.size(0) : in.x.size(0), d = side.size(1);
  const int splits = column_splits(rows, cols, side.get_device(), kMaxBackwardSplits);
  const auto float_options = side.options().dtype(at::kFloat);
  at::Tensor partial_grad = at::zeros({splits, rows, d}, float_options);
  at::Tensor partial_radial = at::empty({splits, rows}, float_options);
  at::Tensor grad = at::empty_like(side);
  const UnifiedBackwardParams params{grad_loss.data_ptr<float>(), valid.data_ptr<bool>(), lse_neg.data_ptr<float>(),
                                     lse_pos.data_ptr<float>(),   rows_are_anchors,      partial_grad.data_ptr<float>(),
                                     partial_radial.data_ptr<float>(), splits,            grad.data_ptr()};
  check_launch(launch_unified_backward(problem, params, current_stream()));
  return grad;
}

// The forward's per-anchor outputs: loss, validity and the two log-sum-exps.
struct AnchorOutputs {
  at::Tensor loss, valid, lse_neg, lse_pos;

  explicit AnchorOutputs(const at::Tensor& x)
      : loss(at::empty({x.size(0)}, x.options())), valid(at::empty({x.size(0)}, x.options().dtype(at::kBool))),
        lse_neg(at::empty({x.size(0)}, x.options().dtype(at::kFloat))),
        lse_pos(at::empty({x.size(0)}, x.options().dtype(at::kFloat))) {}

  UnifiedForwardParams params(float* partial, int splits) {
    return UnifiedForwardParams{loss.data_ptr(), valid.data_ptr<bool>(), lse_neg.data_ptr<float>(),
                                lse_pos.data_ptr<float>(), partial, splits};
  }
};

// Bank- and global-batch-sized problems (use_cublas_products): the cosines of the anchors with
// a chunk of references at a time come from cuBLAS on the normalized rows, in x's dtype, into a
// buffer of N x chunk floats (chunk_references); the kernels of unified_chunks_kernel.cu fold them
// into the anchors' statistics, or turn them into dL/dS for the products that give the gradients.
class ChunkedProducts {
 public:
  ChunkedProducts(const UnifiedInputs& in, const UnifiedProblem& pb)
      : in_(in), pb_(pb), n_(in.x.size(0)), m_(in.ref.size(0)), d_(in.x.size(1)),
        cols_(chunk_references(n_, m_, d_, in.x.element_size())), anchors_(at::empty_like(in.x)),
        cosines_(at::empty({n_ * cols_}, in.x.options().dtype(at::kFloat))),
        references_(in.self_ref ? at::Tensor() : at::empty({cols_, d_}, in.x.options())) {
    check_launch(launch_normalized_rows(pb.kind, in.x.data_ptr(), n_, d_, norm_eps<float>(), pb.inv_x, pb.radial_x,
                                        anchors_.data_ptr(), true, current_stream()));
  }

  const at::Tensor& anchors() const { return anchors_; }  // the normalized anchors [n, d]

  // visit(chunk, references): the chunk's cosines computed, references its normalized rows [cols, d].
  template <typename Visit>
  void for_each_chunk(const Visit& visit) {
    for (int64_t j0 = 0; j0 < m_; j0 += cols_) {
      const int64_t cols = std::min(cols_, m_ - j0);
      const at::Tensor references = normalized_references(j0, cols);
      at::Tensor sim = cosines_.narrow(0, 0, n_ * cols).view({n_, cols});
      products_into(sim, anchors_, references);
      visit(UnifiedChunk{sim.data_ptr<float>(), j0, cols, j0 == 0}, references);
    }
  }

  int64_t chunk() const { return cols_; }

 private:
  // Rows [j0, j0 + cols) of the references, normalized (with their RowNorms into the problem's).
  at::Tensor normalized_references(int64_t j0, int64_t cols) {
    if (in_.self_ref) return anchors_.narrow(0, j0, cols);
    at::Tensor out = references_.narrow(0, 0, cols);
    check_launch(launch_normalized_rows(pb_.kind, in_.ref.narrow(0, j0, cols).data_ptr(), cols, d_, norm_eps<float>(),
                                        pb_.inv_ref + j0, pb_.radial_ref + j0, out.data_ptr(), true,
                                        current_stream()));
    return out;
  }

  const UnifiedInputs& in_;
  const UnifiedProblem& pb_;
  int64_t n_, m_, d_, cols_;
  at::Tensor anchors_, cosines_, references_;
};

AnchorOutputs chunked_forward(const UnifiedInputs& in, const UnifiedProblem& problem) {
  AnchorOutputs out(in.x);
  ChunkedProducts products(in, problem);
  // Each chunk merges into these running statistics; without references they stay empty.
  at::Tensor stats = at::zeros({5, in.x.size(0)}, in.x.options().dtype(at::kFloat));
  stats.select(0, 0).fill_(-std::numeric_limits<float>::infinity());
  stats.select(0, 2).fill_(-std::numeric_limits<float>::infinity());
  products.for_each_chunk([&](const UnifiedChunk& chunk, const at::Tensor&) {
    check_launch(launch_unified_chunk_forward(problem, chunk, stats.data_ptr<float>(), current_stream()));
  });
  check_launch(launch_unified_chunk_finish(problem, stats.data_ptr<float>(), out.params(nullptr, 1), current_stream()));
  return out;
}

// grad_x (if want_x) and grad_ref (if want_ref, against a bank), each [0, D] unless wanted.
std::tuple<at::Tensor, at::Tensor> chunked_backward(const UnifiedInputs& in, const UnifiedProblem& problem,
                                                    const at::Tensor& grad, const at::Tensor& valid,
                                                    const at::Tensor& lse_neg, const at::Tensor& lse_pos,
                                                    bool want_x, bool want_ref) {
  const int64_t n = in.x.size(0), d = in.x.size(1);
  const auto float_options = in.x.options().dtype(at::kFloat);
  const auto stream = current_stream();
  ChunkedProducts products(in, problem);
  const UnifiedBackwardParams stats{grad.data_ptr<float>(), valid.data_ptr<bool>(), lse_neg.data_ptr<float>(),
                                    lse_pos.data_ptr<float>(), true, nullptr, nullptr, 1, nullptr};
  at::Tensor acc_x = want_x ? at::zeros({n, d}, float_options) : at::Tensor();
  at::Tensor row_radial = at::zeros({n}, float_options);
  at::Tensor coef = at::empty({n * products.chunk()}, in.x.options());
  at::Tensor grad_ref = want_ref ? at::empty_like(in.ref) : no_gradient(in.x);
  at::Tensor acc_ref = want_ref ? at::empty({products.chunk(), d}, float_options) : at::Tensor();
  at::Tensor col_radial = want_ref ? at::empty({products.chunk()}, float_options) : at::Tensor();
  products.for_each_chunk([&](const UnifiedChunk& chunk, const at::Tensor& references) {
    at::Tensor g = coef.narrow(0, 0, n * chunk.cols).view({n, chunk.cols});
    check_launch(launch_unified_chunk_backward(problem, stats, chunk, g.data_ptr(), row_radial.data_ptr<float>(),
                                               want_ref ? col_radial.data_ptr<float>() : nullptr, stream));
    if (want_x) accumulate_product(acc_x, g, references);  // acc_x += dL/dS @ refs
    if (!want_ref) return;
    at::Tensor acc = acc_ref.narrow(0, 0, chunk.cols);
    products_into(acc, g.t(), products.anchors().t());  // acc = dL/dS^T @ anchors
    check_launch(launch_normalization_finish(problem.kind, references.data_ptr(), chunk.cols, d,
                                             acc.data_ptr<float>(), problem.inv_ref + chunk.j0,
                                             problem.radial_ref + chunk.j0, col_radial.data_ptr<float>(),
                                             grad_ref.narrow(0, chunk.j0, chunk.cols).data_ptr(), stream));
  });
  at::Tensor grad_x = no_gradient(in.x);
  if (want_x) {
    grad_x = at::empty_like(in.x);
    check_launch(launch_normalization_finish(problem.kind, products.anchors().data_ptr(), n, d, acc_x.data_ptr<float>(),
                                             problem.inv_x, problem.radial_x, row_radial.data_ptr<float>(),
                                             grad_x.data_ptr(), stream));
  }
  return {grad_x, grad_ref};
}

// The per-anchor forward of batch-sized problems: the tile kernels.
AnchorOutputs tile_forward(const UnifiedInputs& in, const UnifiedProblem& problem) {
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  const auto stats_options = in.x.options().dtype(at::kFloat);
  AnchorOutputs out(in.x);
  const int splits = column_splits(n, m, in.x.get_device(), kMaxForwardSplits);
  at::Tensor partial = splits > 1 ? at::empty({splits, 5, n}, stats_options) : at::Tensor();
  check_launch(launch_unified_forward(problem, out.params(splits > 1 ? partial.data_ptr<float>() : nullptr, splits),
                                      current_stream()));
  return out;
}

// Which path: chunked products for bank- and global-batch-sized problems, else the tile kernels.
bool chunked(const UnifiedInputs& in) {
  return use_cublas_products(in.x.size(0), in.ref.size(0), in.x.size(1), scalar_kind(in.x, "x"));
}

// grad_x and grad_ref (as chunked_backward) from the per-anchor gradient (float32 Tensor[N]).
std::tuple<at::Tensor, at::Tensor> backward(const UnifiedInputs& in, const UnifiedProblem& problem,
                                            const at::Tensor& grad, const at::Tensor& valid, const at::Tensor& lse_neg,
                                            const at::Tensor& lse_pos, bool want_x, bool want_ref) {
  if (chunked(in)) return chunked_backward(in, problem, grad, valid, lse_neg, lse_pos, want_x, want_ref);
  return {want_x ? backward_side(in, problem, grad, valid, lse_neg, lse_pos, true) : no_gradient(in.x),
          want_ref ? backward_side(in, problem, grad, valid, lse_neg, lse_pos, false) : no_gradient(in.x)};
}

// The loss, reduced, and with a scalar reduction the gradients that grad_x / grad_ref ask for (the
// backward kernels run in the forward with the reduction's weights: no host synchronisation).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_triplet_loss_cuda(
    const at::Tensor& x, const at::Tensor& labels, const c10::optional<at::Tensor>& modalities,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin, c10::string_view mode,
    c10::string_view reduction, bool grad_x, bool grad_ref) {
  const UnifiedArgs args =
      check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
  check_on_device(x, "x");
  scalar_kind(x, "x");
  const DeviceGuard guard(x.device());
  const UnifiedInputs in = unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, args.mode);
  at::Tensor norms;
  const UnifiedProblem problem = problem_of(in, gamma, margin, args.mode, norms);
  const AnchorOutputs out = chunked(in) ? chunked_forward(in, problem) : tile_forward(in, problem);
  const bool want_ref = !in.self_ref && grad_ref;
  at::Tensor grad_x_out = no_gradient(in.x), grad_ref_out = no_gradient(in.x);
  if (args.reduction != Reduction::kNone && (grad_x || want_ref)) {
    std::tie(grad_x_out, grad_ref_out) = backward(in, problem, reduction_weights(out.lse_neg, out.valid, args.reduction),
                                                  out.valid, out.lse_neg, out.lse_pos, grad_x, want_ref);
  }
  return {reduce_anchors(out.loss, out.valid, args.reduction), grad_x_out, grad_ref_out, out.valid, out.lse_neg,
          out.lse_pos};
}

std::tuple<at::Tensor, at::Tensor> unified_triplet_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels,
    const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
    const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& ref_modalities,
    const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos, double gamma, double margin,
    c10::string_view mode, c10::string_view reduction, bool grad_ref) {
  const UnifiedArgs args =
      check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
  check_on_device(x, "x");
  scalar_kind(x, "x");
  for (const auto& [t, name] : {std::pair{&valid, "valid"}, {&lse_neg, "lse_neg"}, {&lse_pos, "lse_pos"}}) {
    check_per_row(*t, name, x);
  }
  const DeviceGuard guard(x.device());
  const UnifiedInputs in = unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, args.mode);
  const at::Tensor valid_c = valid.to(at::kBool).contiguous();
  const at::Tensor grad_c = anchor_grads(grad_loss, in.x, valid_c, args.reduction).to(at::kFloat).contiguous();
  const at::Tensor neg_c = lse_neg.to(at::kFloat).contiguous();
  const at::Tensor pos_c = lse_pos.to(at::kFloat).contiguous();
  at::Tensor norms;
  const UnifiedProblem problem = problem_of(in, gamma, margin, args.mode, norms);
  return backward(in, problem, grad_c, valid_c, neg_c, pos_c, true, !in.self_ref && grad_ref);
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("unified_triplet_loss", &unified_triplet_loss_cuda);
  m.impl("_unified_triplet_loss_backward", &unified_triplet_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
