// unified_triplet_loss on CPU.
//
// Forward: anchor blocks in parallel; each streams tiles of references, takes
// their dot products with one BLAS call per tile and folds the tile into
// per-anchor online log-sum-exps. Backward: recomputes the tiles, turns them
// into dL/dS with the saved statistics and multiplies back. Neither holds more
// than a tile of the N x M similarity matrix.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

constexpr double kNormEps = 1e-12;

// Labels and modalities of both sides, and the pair rule between them.
struct PairRule {
  const int64_t* labels;
  const int64_t* modalities;
  const int64_t* ref_labels;
  const int64_t* ref_modalities;
  int mode;
  bool self_ref;

  int kind(int64_t i, int64_t j) const {
    return pair_kind(mode, self_ref && i == j, labels[i], ref_labels[j], modalities ? modalities[i] : 0,
                     ref_modalities ? ref_modalities[j] : 0);
  }
};

PairRule make_rule(const UnifiedInputs& in, int64_t mode) {
  return PairRule{in.labels.data_ptr<int64_t>(),
                  in.modalities.defined() ? in.modalities.data_ptr<int64_t>() : nullptr,
                  in.ref_labels.data_ptr<int64_t>(),
                  in.ref_modalities.defined() ? in.ref_modalities.data_ptr<int64_t>() : nullptr,
                  static_cast<int>(mode), in.self_ref};
}

template <typename scalar_t>
void forward_impl(const UnifiedInputs& in, scalar_t gamma, scalar_t margin, int64_t mode, at::Tensor& loss,
                  at::Tensor& valid, at::Tensor& lse_neg, at::Tensor& lse_pos) {
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  std::vector<scalar_t> inv_x, inv_ref;
  inverse_norms<scalar_t>(in.x, scalar_t(kNormEps), inv_x, nullptr);
  if (in.self_ref) inv_ref = inv_x;
  else inverse_norms<scalar_t>(in.ref, scalar_t(kNormEps), inv_ref, nullptr);
  const PairRule rule = make_rule(in, mode);
  scalar_t* loss_out = loss.data_ptr<scalar_t>();
  bool* valid_out = valid.data_ptr<bool>();
  scalar_t* neg_out = lse_neg.data_ptr<scalar_t>();
  scalar_t* pos_out = lse_pos.data_ptr<scalar_t>();

  parallel_over_blocks((n + kRowBlock - 1) / kRowBlock, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({kRowBlock * kColBlock}, in.x.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kRowBlock, rows = std::min(kRowBlock, n - i0);
      OnlineLSE<scalar_t> neg[kRowBlock], pos[kRowBlock];
      bool has_neg[kRowBlock] = {}, has_pos[kRowBlock] = {};
      for (int64_t j0 = 0; j0 < m; j0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, m - j0);
        const scalar_t* dots = tile_dots(scratch, in.x, i0, rows, in.ref, j0, cols).data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t j = j0 + c;
            const int kind = rule.kind(i, j);
            if (kind == 0) continue;
            const scalar_t s = dots[r * cols + c] * inv_x[i] * inv_ref[j];
            if (kind < 0) {
              neg[r].push(gamma * (s + margin));
              has_neg[r] = true;
            } else {
              pos[r].push(-gamma * s);
              has_pos[r] = true;
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const bool ok = has_neg[r] && has_pos[r];
        neg_out[i] = neg[r].value();
        pos_out[i] = pos[r].value();
        valid_out[i] = ok;
        loss_out[i] = unified_anchor_loss(neg_out[i], pos_out[i], ok);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_triplet_loss_cpu(
    const at::Tensor& x, const at::Tensor& labels, const c10::optional<at::Tensor>& modalities,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin, int64_t mode) {
  const UnifiedInputs in = check_unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, mode);
  const int64_t n = in.x.size(0);
  at::Tensor loss = at::empty({n}, in.x.options());
  at::Tensor valid = at::empty({n}, in.x.options().dtype(at::kBool));
  at::Tensor lse_neg = at::empty({n}, in.x.options());
  at::Tensor lse_pos = at::empty({n}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "unified_triplet_loss_cpu", [&] {
    forward_impl<scalar_t>(in, scalar_t(gamma), scalar_t(margin), mode, loss, valid, lse_neg, lse_pos);
  });
  return {loss, valid, lse_neg, lse_pos};
}

// Gradient of one side. With rows = anchors it is grad_x (and, for the batch
// as its own reference, dL/dS_ij + dL/dS_ji, since S is symmetric there); with
// rows = references it is grad_ref, a column reduction of dL/dS.
template <typename scalar_t>
void backward_side(const UnifiedInputs& in, const PairRule& rule, const std::vector<scalar_t>& weight,
                   const scalar_t* lse_neg, const scalar_t* lse_pos, scalar_t gamma, scalar_t margin,
                   bool rows_are_anchors, at::Tensor& grad) {
  const at::Tensor& a = rows_are_anchors ? in.x : in.ref;
  const at::Tensor& b = rows_are_anchors ? in.ref : in.x;
  const int64_t rows_total = a.size(0), cols_total = b.size(0), d = a.size(1);
  std::vector<scalar_t> inv_a, radial_a, inv_b;
  inverse_norms<scalar_t>(a, scalar_t(kNormEps), inv_a, &radial_a);
  if (in.self_ref) inv_b = inv_a;
  else inverse_norms<scalar_t>(b, scalar_t(kNormEps), inv_b, nullptr);
  scalar_t* out = grad.data_ptr<scalar_t>();
  const scalar_t* a_data = a.data_ptr<scalar_t>();

  auto pair_grad = [&](int64_t anchor, int64_t reference, scalar_t s) {
    return unified_pair_grad(rule.kind(anchor, reference), s, weight[anchor], lse_neg[anchor], lse_pos[anchor],
                             gamma, margin);
  };

  parallel_over_blocks((rows_total + kRowBlock - 1) / kRowBlock, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({kRowBlock * kColBlock}, a.options());
    at::Tensor coef = at::empty({kRowBlock, kColBlock}, a.options());
    at::Tensor acc = at::empty({kRowBlock, d}, a.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kRowBlock, rows = std::min(kRowBlock, rows_total - i0);
      scalar_t radial_sum[kRowBlock] = {};
      at::Tensor acc_rows = acc.narrow(0, 0, rows);
      acc_rows.zero_();
      for (int64_t j0 = 0; j0 < cols_total; j0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, cols_total - j0);
        const scalar_t* dots = tile_dots(scratch, a, i0, rows, b, j0, cols).data_ptr<scalar_t>();
        at::Tensor coef_tile = coef.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
        scalar_t* c = coef_tile.data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          scalar_t radial = 0;
          for (int64_t q = 0; q < cols; ++q) {
            const int64_t j = j0 + q;
            const scalar_t s = dots[r * cols + q] * inv_a[i] * inv_b[j];
            scalar_t g;
            if (!rows_are_anchors) g = pair_grad(j, i, s);
            else if (in.self_ref) g = pair_grad(i, j, s) + pair_grad(j, i, s);
            else g = pair_grad(i, j, s);
            c[r * cols + q] = g * inv_b[j];
            radial += g * s;
          }
          radial_sum[r] += radial;
        }
        acc_rows.addmm_(coef_tile, b.narrow(0, j0, cols));
      }
      const scalar_t* p = acc_rows.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const scalar_t shrink = radial_a[i] * radial_sum[r];
        for (int64_t k = 0; k < d; ++k) out[i * d + k] = inv_a[i] * p[r * d + k] - shrink * a_data[i * d + k];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> unified_triplet_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels,
    const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
    const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& ref_modalities,
    const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos, double gamma, double margin,
    int64_t mode, bool ref_requires_grad) {
  const UnifiedInputs in = check_unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, mode);
  const int64_t n = in.x.size(0);
  for (const auto* t : {&grad_loss, &valid, &lse_neg, &lse_pos}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "per-anchor tensors of the backward must be Tensor[N]");
  }
  const at::Tensor grad_c = grad_loss.to(in.x.scalar_type()).contiguous();
  const at::Tensor valid_c = valid.to(at::kBool).contiguous();
  const at::Tensor neg_c = lse_neg.to(in.x.scalar_type()).contiguous();
  const at::Tensor pos_c = lse_pos.to(in.x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(in.x);
  const bool want_ref = !in.self_ref && ref_requires_grad;
  at::Tensor grad_ref = want_ref ? at::empty_like(in.ref) : at::empty({0, in.x.size(1)}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "unified_triplet_loss_backward_cpu", [&] {
    const scalar_t* g = grad_c.data_ptr<scalar_t>();
    const bool* ok = valid_c.data_ptr<bool>();
    const scalar_t* neg = neg_c.data_ptr<scalar_t>();
    const scalar_t* pos = pos_c.data_ptr<scalar_t>();
    std::vector<scalar_t> weight(n);
    for (int64_t i = 0; i < n; ++i) weight[i] = unified_anchor_weight(g[i], neg[i], pos[i], ok[i]);
    const PairRule rule = make_rule(in, mode);
    backward_side<scalar_t>(in, rule, weight, neg, pos, scalar_t(gamma), scalar_t(margin), true, grad_x);
    if (want_ref) {
      backward_side<scalar_t>(in, rule, weight, neg, pos, scalar_t(gamma), scalar_t(margin), false, grad_ref);
    }
  });
  return {grad_x, grad_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("unified_triplet_loss", &unified_triplet_loss_cpu);
  m.impl("_unified_triplet_loss_backward", &unified_triplet_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
