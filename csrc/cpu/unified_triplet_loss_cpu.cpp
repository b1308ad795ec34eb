// unified_triplet_loss on CPU: the op entry points and the passes over the tiles.
//
// The references are visited in tiles (unified_schedule_cpu.h): one BLAS call gives a tile's
// dot products, and vectorized element loops (unified_pairs_cpu.h) fold it into per-anchor
// online log-sum-exps (forward) or turn it into dL/dS, which two more BLAS calls multiply back
// (backward). With the batch as its own reference, S is symmetric: each pair of blocks (I, J),
// I <= J, is computed once and serves anchors I (rows) and J (columns), in rounds of disjoint
// pairs. Nothing larger than a tile of the N x M similarity matrix is ever held.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <memory>

#include "cpu/unified_schedule_cpu.h"
#include "reduction.h"

namespace reid_ext {
namespace cpu {
namespace {

// Per-anchor running log-sum-exps of the forward: over its negatives and over its positives.
template <typename scalar_t>
struct Stats {
  std::vector<OnlineLSE<scalar_t>> neg, pos;

  explicit Stats(int64_t n) : neg(n), pos(n) {}

  // Folds the masked pair values of a tile (pair_values: neg, pos) into its row anchors, and into
  // its column anchors when it is mirrored (col_max, col_sum: scratch of t.cols entries).
  void fold(const Tile& t, const scalar_t* neg_values, const scalar_t* pos_values, scalar_t* col_max,
            scalar_t* col_sum) {
    fold_rows(neg_values, t.rows, t.cols, neg.data() + t.i0);
    fold_rows(pos_values, t.rows, t.cols, pos.data() + t.i0);
    if (!t.mirrored) return;
    fold_cols(neg_values, t.rows, t.cols, neg.data() + t.j0, col_max, col_sum);
    fold_cols(pos_values, t.rows, t.cols, pos.data() + t.j0, col_max, col_sum);
  }
};

// The forward's per-anchor outputs: loss, validity and the two log-sum-exps the backward reuses.
struct AnchorOutputs {
  at::Tensor loss, valid, lse_neg, lse_pos;

  explicit AnchorOutputs(const at::Tensor& x)
      : loss(at::empty({x.size(0)}, x.options())), valid(at::empty({x.size(0)}, x.options().dtype(at::kBool))),
        lse_neg(at::empty({x.size(0)}, x.options())), lse_pos(at::empty({x.size(0)}, x.options())) {}
};

// Anchors [begin, end) of the outputs from their complete running statistics. A NaN in an
// anchor's row (a NaN squared norm) makes its loss NaN even when it is not valid.
template <typename scalar_t>
void finish_anchors(const Problem<scalar_t>& pb, const Stats<scalar_t>& st, int64_t begin, int64_t end,
                    AnchorOutputs& out) {
  scalar_t* loss_out = out.loss.data_ptr<scalar_t>();
  bool* valid_out = out.valid.data_ptr<bool>();
  scalar_t* neg_out = out.lse_neg.data_ptr<scalar_t>();
  scalar_t* pos_out = out.lse_pos.data_ptr<scalar_t>();
  for (int64_t i = begin; i < end; ++i) {
    neg_out[i] = st.neg[i].value();
    pos_out[i] = st.pos[i].value();
    valid_out[i] = !st.neg[i].empty() && !st.pos[i].empty();
    loss_out[i] = unified_anchor_loss(neg_out[i], pos_out[i], valid_out[i], pb.norms_x.sq[i]);
  }
}

// The dot products of tile t: a view into all_dots (whole_dots) when it is defined, else a GEMM
// into the scratch.
template <typename scalar_t>
const scalar_t* dots_of(const Problem<scalar_t>& pb, const at::Tensor& all_dots, const Tile& t,
                        TileScratch<scalar_t>& s) {
  if (all_dots.defined()) return all_dots.data_ptr<scalar_t>() + t.i0 * pb.ref.size(0);  // tiles are whole rows
  return tile_dots(s.dots, pb.x, t.i0, t.rows, pb.ref, t.j0, t.cols).template data_ptr<scalar_t>();
}

// One scratch per worker thread, made by the thread that runs a tile.
template <typename scalar_t>
class ScratchPerThread {
 public:
  explicit ScratchPerThread(const Problem<scalar_t>& pb)
      : options_(pb.x.options()), size_(max_tile(pb.x.size(0), pb.ref.size(0), pb.in.self_ref)),
        scratch_(at::get_num_threads()) {}

  TileScratch<scalar_t>& get() {
    auto& s = scratch_[at::get_thread_num()];
    if (!s) s = std::make_unique<TileScratch<scalar_t>>(options_, size_.first, size_.second);
    return *s;
  }

 private:
  at::TensorOptions options_;
  std::pair<int64_t, int64_t> size_;
  std::vector<std::unique_ptr<TileScratch<scalar_t>>> scratch_;
};

template <typename scalar_t>
void forward_impl(const Problem<scalar_t>& pb, const at::Tensor& all_dots, AnchorOutputs& out) {
  const int64_t n = pb.x.size(0), m = pb.ref.size(0);
  Stats<scalar_t> st(n);
  ScratchPerThread<scalar_t> scratch(pb);
  for_each_tile(n, m, pb.in.self_ref, [&](const Tile& t) {
    TileScratch<scalar_t>& s = scratch.get();
    const Side<scalar_t> refs = pb.in.self_ref ? pb.anchors(t.j0) : pb.references(t.j0);
    pair_values(dots_of(pb, all_dots, t, s), t.rows, t.cols, t.self_shift, pb.anchors(t.i0), refs, pb.mode,
                pb.gamma, pb.margin, s.a.data(), s.b.data());
    st.fold(t, s.a.data(), s.b.data(), s.col_a.data(), s.col_b.data());
  });
  finish_anchors(pb, st, 0, n, out);
}

// Per-anchor factors of dL/dS from the forward's statistics and grad_loss.
template <typename scalar_t>
struct AnchorFactors {
  std::vector<scalar_t> weight, shift_neg, shift_pos;

  explicit AnchorFactors(int64_t n) : weight(n), shift_neg(n), shift_pos(n) {}

  void set(int64_t i, scalar_t grad, scalar_t lse_neg, scalar_t lse_pos, bool valid) {
    weight[i] = unified_anchor_weight(grad, lse_neg, lse_pos, valid);
    shift_neg[i] = unified_grad_shift(weight[i], lse_neg);
    shift_pos[i] = unified_grad_shift(weight[i], lse_pos);
  }

  AnchorGrad<scalar_t> from(int64_t first) const {
    return {weight.data() + first, shift_neg.data() + first, shift_pos.data() + first};
  }
};

// coef[r, c] = g[r, c] * inv[c] (inv_cols) or g[r, c] * inv[r] (by_rows): dL/dS times the other
// side's inverse norm, the coefficients of a gradient GEMM.
template <typename scalar_t>
void scale_coefficients(const scalar_t* g, int64_t rows, int64_t cols, const scalar_t* inv, bool by_rows,
                        scalar_t* coef) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) coef[r * cols + c] = g[r * cols + c] * inv[by_rows ? r : c];
}

// grad_x, and grad_ref when asked: acc_I += (g * inv_J) @ B_J per tile, then the Jacobian.
// all_dots: whole_dots(pb), which the caller may share with the forward.
template <typename scalar_t>
void backward_impl(const Problem<scalar_t>& pb, const at::Tensor& all_dots, const scalar_t* grad_loss,
                   const bool* valid, const scalar_t* lse_neg, const scalar_t* lse_pos, at::Tensor& grad_x,
                   at::Tensor* grad_ref) {
  const bool self_ref = pb.in.self_ref;
  const int64_t n = pb.x.size(0), m = pb.ref.size(0);
  AnchorFactors<scalar_t> factors(n);
  for (int64_t i = 0; i < n; ++i) factors.set(i, grad_loss[i], lse_neg[i], lse_pos[i], valid[i]);
  ScratchPerThread<scalar_t> scratch(pb);
  const bool whole = all_dots.defined();
  if (!whole) grad_x.zero_();
  if (grad_ref && !whole) grad_ref->zero_();
  // A single tile keeps its coefficients whole, for one GEMM per gradient after the loop.
  at::Tensor all_coef = whole ? at::empty({n, m}, pb.x.options()) : at::Tensor();
  at::Tensor all_ref_coef = whole && grad_ref ? at::empty({n, m}, pb.x.options()) : at::Tensor();
  for_each_tile(n, m, self_ref, [&](const Tile& t) {
    TileScratch<scalar_t>& s = scratch.get();
    const int64_t i0 = t.i0, j0 = t.j0, rows = t.rows, cols = t.cols;
    const Side<scalar_t> a = pb.anchors(i0);
    const Side<scalar_t> b = self_ref ? pb.anchors(j0) : pb.references(j0);
    const AnchorGrad<scalar_t> row_anchor = factors.from(i0), col_anchor = factors.from(j0);
    // For the batch against itself S is symmetric, so x_i receives dL/dS_ij + dL/dS_ji: g carries
    // both, and a mirrored tile also sends it back to its column anchors. Against a bank, rows are the anchors.
    pair_grads(dots_of(pb, all_dots, t, s), rows, cols, t.self_shift, a, b, &row_anchor,
               self_ref ? &col_anchor : nullptr, pb.mode, pb.gamma, pb.margin, s.a.data());
    // Row side: acc_I += (g * inv_J) @ B_J (for a single tile, after the loop, as one GEMM).
    const scalar_t* g = s.a.data();
    scalar_t* coef_data = whole ? all_coef.data_ptr<scalar_t>() + i0 * m : s.b.data();
    scale_coefficients(g, rows, cols, b.inv, false, coef_data);
    if (whole) {
      // bank side: acc_ref = (g * inv_x)^T @ X
      if (grad_ref) scale_coefficients(g, rows, cols, a.inv, true, all_ref_coef.data_ptr<scalar_t>() + i0 * m);
      return;
    }
    at::Tensor coef = at::from_blob(coef_data, {rows, cols}, pb.x.options());
    grad_x.narrow(0, i0, rows).addmm_(coef, pb.ref.narrow(0, j0, cols));
    if (t.mirrored) {  // column side: acc_J += (g * inv_I)^T @ X_I
      scale_coefficients(g, rows, cols, a.inv, true, coef_data);
      grad_x.narrow(0, j0, cols).addmm_(coef.t(), pb.x.narrow(0, i0, rows));
    }
  });
  if (whole) at::mm_out(grad_x, all_coef, pb.ref);
  if (whole && grad_ref) {
    at::mm_out(*grad_ref, all_ref_coef.t(), pb.x);
    normalization_backward<scalar_t>(pb.norms_ref(), *grad_ref);
  }
  // acc_i = sum_j dL/dS_ij inv_j b_j = dL/d(normalized x_i) becomes dL/dx_i.
  normalization_backward<scalar_t>(pb.norms_x, grad_x);
  if (!grad_ref || whole) return;

  // The bank's gradient is a column reduction: visit bank blocks in parallel as rows, anchors as columns.
  const int64_t ref_block = anchor_block(m);
  parallel_over((m + ref_block - 1) / ref_block, [&](int64_t begin, int64_t end) {
    TileScratch<scalar_t> s(pb.x.options(), ref_block, kBankTile);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * ref_block, rows = std::min(ref_block, m - r0);
      for (int64_t c0 = 0; c0 < n; c0 += kBankTile) {
        const int64_t cols = std::min(kBankTile, n - c0);
        const scalar_t* dots = tile_dots(s.dots, pb.ref, r0, rows, pb.x, c0, cols).template data_ptr<scalar_t>();
        const Side<scalar_t> refs = pb.references(r0), anchors = pb.anchors(c0);
        const AnchorGrad<scalar_t> col_anchor = factors.from(c0);
        pair_grads(dots, rows, cols, kNoSelfPairs, refs, anchors, nullptr, &col_anchor, pb.mode, pb.gamma, pb.margin,
                   s.a.data());
        scale_coefficients(s.a.data(), rows, cols, anchors.inv, false, s.b.data());
        at::Tensor coef = at::from_blob(s.b.data(), {rows, cols}, pb.x.options());
        grad_ref->narrow(0, r0, rows).addmm_(coef, pb.x.narrow(0, c0, cols));
      }
    }
  });
  normalization_backward<scalar_t>(pb.norms_ref(), *grad_ref);
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
    backward_impl<scalar_t>(pb, whole_dots(pb), grad_c.data_ptr<scalar_t>(), valid_c.data_ptr<bool>(),
                            neg_c.data_ptr<scalar_t>(), pos_c.data_ptr<scalar_t>(), grad_x,
                            want_ref ? &grad_ref_out : nullptr);
  });
  return {grad_x, grad_ref_out};
}

// The per-anchor outputs, and the gradients of sum_i L_i (grad_loss = 1), of a bank problem, in
// panels of anchors against the whole bank (see kPanelRows).
template <typename scalar_t>
void bank_panels_impl(const Problem<scalar_t>& pb, AnchorOutputs& out, at::Tensor& grad_x, at::Tensor* grad_ref) {
  const int64_t n = pb.x.size(0), m = pb.ref.size(0), panel = panel_rows(n, m);
  // The panel's dot products, overwritten by the anchors' coefficients once dL/dS is known; dL/dS,
  // overwritten by the bank's coefficients.
  at::Tensor dots = at::empty({panel, m}, pb.x.options()), coef = at::empty({panel, m}, pb.x.options());
  Stats<scalar_t> st(n);
  AnchorFactors<scalar_t> factors(n);
  const scalar_t* lse_neg = out.lse_neg.data_ptr<scalar_t>();
  const scalar_t* lse_pos = out.lse_pos.data_ptr<scalar_t>();
  const bool* valid = out.valid.data_ptr<bool>();
  const Side<scalar_t> refs = pb.references(0);
  if (grad_ref) grad_ref->zero_();
  for (int64_t p0 = 0; p0 < n; p0 += panel) {
    const int64_t rows = std::min(panel, n - p0);
    at::Tensor panel_dots = dots.narrow(0, 0, rows), bank_coef = coef.narrow(0, 0, rows);
    at::mm_out(panel_dots, pb.x.narrow(0, p0, rows), pb.ref.t());
    parallel_over((rows + kPanelRowsPerTask - 1) / kPanelRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> neg(kPanelRowsPerTask * m), pos(kPanelRowsPerTask * m);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r0 = task * kPanelRowsPerTask, count = std::min(kPanelRowsPerTask, rows - r0), i0 = p0 + r0;
        scalar_t* d = dots.data_ptr<scalar_t>() + r0 * m;
        scalar_t* g = coef.data_ptr<scalar_t>() + r0 * m;
        const Side<scalar_t> a = pb.anchors(i0);
        pair_values(d, count, m, kNoSelfPairs, a, refs, pb.mode, pb.gamma, pb.margin, neg.data(), pos.data());
        st.fold(Tile{i0, count, 0, m, false, kNoSelfPairs}, neg.data(), pos.data(), nullptr, nullptr);
        finish_anchors(pb, st, i0, i0 + count, out);
        for (int64_t i = i0; i < i0 + count; ++i) factors.set(i, scalar_t(1), lse_neg[i], lse_pos[i], valid[i]);
        const AnchorGrad<scalar_t> row_anchor = factors.from(i0);
        pair_grads(d, count, m, kNoSelfPairs, a, refs, &row_anchor, nullptr, pb.mode, pb.gamma, pb.margin, g);
        scale_coefficients(g, count, m, refs.inv, false, d);
        if (grad_ref) scale_coefficients(g, count, m, a.inv, true, g);
      }
    });
    at::Tensor panel_grad = grad_x.narrow(0, p0, rows);
    at::mm_out(panel_grad, panel_dots, pb.ref);  // acc_I = (g * inv_ref) @ ref
    if (grad_ref) grad_ref->addmm_(bank_coef.t(), pb.x.narrow(0, p0, rows));  // acc_ref += (g * inv_I)^T @ X_I
  }
  normalization_backward<scalar_t>(pb.norms_x, grad_x);
  if (grad_ref) normalization_backward<scalar_t>(pb.norms_ref(), *grad_ref);
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
    const at::Tensor all_dots = panels ? at::Tensor() : whole_dots(pb);
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
