// The schedule of unified_triplet_loss on CPU: which tiles of the N x M pair matrix are visited
// and in what order (a single tile, symmetric block pairs of the batch against itself, row
// blocks against tiles of a bank, panels of anchors against a whole bank), the problem that
// every tile reads, and its scratch. Included by unified_triplet_loss_cpu.cpp only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/tiles_cpu.h"
#include "cpu/unified_pairs_cpu.h"

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

// Anchors per panel of a bank of m rows.
inline int64_t panel_rows(int64_t n, int64_t m) {
  return std::min(n, std::max(kMinPanelRows, std::min(kPanelRows, kPanelPairs / m)));
}

// Everything the tile loops need about one problem. x and ref are the rows the GEMMs read: the
// inputs with their large rows scaled (RowNorms), ref the same tensor as x for the batch itself.
template <typename scalar_t>
struct Problem {
  const UnifiedInputs& in;
  int mode;
  scalar_t gamma, margin;
  Codes labels;
  std::optional<Codes> modalities;  // modes "cross" and "intra" only
  RowNorms<scalar_t> norms_x;
  std::optional<RowNorms<scalar_t>> norms_bank;  // against a bank only
  at::Tensor x, ref;

  Problem(const UnifiedInputs& inputs, PairMode mode_, double gamma_, double margin_)
      : in(inputs), mode(static_cast<int>(mode_)), gamma(scalar_t(gamma_)), margin(scalar_t(margin_)),
        labels(in.labels, in.ref_labels, in.self_ref), norms_x(in.x) {
    if (in.modalities.defined()) modalities.emplace(in.modalities, in.ref_modalities, in.self_ref);
    if (!in.self_ref) norms_bank.emplace(in.ref);
    x = norms_x.rows;
    ref = norms_ref().rows;
  }

  const RowNorms<scalar_t>& norms_ref() const { return in.self_ref ? norms_x : *norms_bank; }

  Side<scalar_t> anchors(int64_t first) const {
    const int32_t* l = labels.anchors.data();
    const int32_t* m = modalities ? modalities->anchors.data() : l;
    return {l + first, m + first, norms_x.inv.data() + first};
  }

  Side<scalar_t> references(int64_t first) const {
    const int32_t* l = labels.reference_codes();
    const int32_t* m = modalities ? modalities->reference_codes() : l;
    return {l + first, m + first, norms_ref().inv.data() + first};
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

// Calls visit(tile) for every tile the anchors need. Two calls may run at once
// only if they write to disjoint anchors: rows, and the columns of mirrored tiles.
// Beyond a single tile, the batch against itself visits each pair of blocks once (half the dot
// products); a single tile (whole_dots) is visited as anchor blocks of whole rows.
template <typename F>
void for_each_tile(int64_t n, int64_t m, bool self_ref, const F& visit) {
  if (self_ref && !single_tile(n, m)) {
    for_each_block_pair(n, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      visit(Tile{i0, rows, j0, cols, i0 != j0, j0 - i0});
    });
    return;
  }
  const int64_t tile = single_tile(n, m) ? m : kBankTile;
  for_each_row_tile(n, anchor_block(n), m, tile, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    visit(Tile{i0, rows, j0, cols, false, self_ref ? j0 - i0 : kNoSelfPairs});
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
// shared by the forward and the backward; undefined otherwise.
template <typename scalar_t>
at::Tensor whole_dots(const Problem<scalar_t>& pb) {
  const int64_t n = pb.x.size(0);
  if (!single_tile(n, pb.ref.size(0))) return at::Tensor();
  if (!pb.in.self_ref || n < kHalfDotsFrom) return at::mm(pb.x, pb.ref.t());
  // X X^T is symmetric: the top half of the rows and the bottom-right block, then a mirrored
  // copy of the bottom-left block: 3/4 of the multiply-adds.
  const int64_t h = n / 2;
  const at::Tensor top = pb.x.narrow(0, 0, h), bottom = pb.x.narrow(0, h, n - h);
  at::Tensor dots = at::empty({n, n}, pb.x.options());
  at::Tensor top_rows = dots.narrow(0, 0, h), bottom_right = dots.narrow(0, h, n - h).narrow(1, h, n - h);
  at::mm_out(top_rows, top, pb.x.t());
  at::mm_out(bottom_right, bottom, bottom.t());
  dots.narrow(0, h, n - h).narrow(1, 0, h).copy_(dots.narrow(0, 0, h).narrow(1, h, n - h).t());
  return dots;
}

}  // namespace
}  // namespace cpu
}  // namespace reid_ext
