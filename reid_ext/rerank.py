"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the semantics of the implementation
fast-reid and torchreid ship, on a sparse V instead of dense (Q+G) x (Q+G) matrices:
``re_ranking`` from features, ``re_ranking_distances`` from distance matrices. Both are also
reid_ext.evaluation's, which evaluates with them.
"""
import contextlib
import numbers
from typing import Callable, Tuple

import numpy as np
import torch
from tqdm import tqdm

import reid_ext
from reid_ext import defaults

__all__ = ["re_ranking", "re_ranking_distances", "check_re_ranking_options"]

# The standard algorithm (Zhong et al., CVPR 2017, as fast-reid and torchreid ship it) on N = Q + G
# samples, from A = [[q_q, q_g], [q_g^T, g_g]] (N x N input distances):
#   original = (A^2 / column maxima of A^2)^T: row i is column i of A, squared and divided by its
#       largest value (for symmetric q_q and g_g, row i of A);
#   rank[i] = every sample by increasing original[i, :];
#   R(i, k) = {j in rank[i, :k+1] : i in rank[j, :k+1]}, the k-reciprocal neighbours;
#   E(i) = R(i, k1) and every R(c, round(k1 / 2)), c in R(i, k1), that has more than 2/3 of its
#       members in R(i, k1);
#   V[i, j] = exp(-original[i, j]) / sum_{j' in E(i)} exp(-original[i, j']) for j in E(i), else 0;
#   with k2 != 1, V[i] <- mean_{r < k2} V[rank[i, r]] (local query expansion);
#   final[i, j] = (1 - lambda) * (1 - m / (2 - m)) + lambda * original[i, j], m = sum_f min(V[i, f], V[j, f]),
#       for queries i and gallery samples j.
# Each row needs only its max(k1 + 1, k2) nearest samples, its largest distance and a sparse V:
# here V is a list of (row, column, value) entries sorted by (row, column), never an N x N matrix,
# and the query expansion and the Jaccard sums are one compiled op over its entries
# (torch.ops.reid_ext._jaccard_distance, csrc/cpu/jaccard_distance_cpu.cpp).

# Elements per temporary block (the gathered features of pair_distance): small enough to stay in cache and to be reused by the allocator instead of being mapped afresh.
_BLOCK_ELEMENTS = 1 << 18
# Elements of the buffer that holds row blocks of the distance matrix while they are ranked, and of
# each bitmap of _members.
_RANK_BLOCK_ELEMENTS = 1 << 21
# From this many samples on, re-ranking takes seconds and shows its stages in a progress bar.
_PROGRESS_FROM = 8192


def _check_features(qf, gf) -> None:
    for name, t in (("qf", qf), ("gf", gf)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point Tensor[N, D], got {getattr(t, 'shape', type(t).__name__)}")
    if gf.size(1) != qf.size(1):
        raise ValueError(f"gf has D={gf.size(1)} but qf has D={qf.size(1)}")
    if gf.device != qf.device or gf.dtype != qf.dtype:
        raise TypeError(f"gf is {gf.dtype} on {gf.device} but qf is {qf.dtype} on {qf.device}")


def check_re_ranking_options(k1, k2, lambda_value) -> None:
    """Raises ValueError, naming the option, unless k1 and k2 are ints >= 1 and lambda_value is in [0, 1]."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")


def _lookup(sorted_keys: torch.Tensor, queries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(position, found) of each query in the sorted 1-D sorted_keys."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(queries), torch.zeros_like(queries, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return pos, sorted_keys.take(pos) == queries


def _pair_keys(neighbours: torch.Tensor) -> torch.Tensor:
    """row * N + neighbours[row, r] for every entry of neighbours (Tensor[N, k])."""
    n = neighbours.size(0)
    return torch.arange(n, device=neighbours.device).unsqueeze(1) * n + neighbours


def _reciprocal_ranks(near: torch.Tensor) -> torch.Tensor:
    """back[i, r]: the rank of i among the neighbours of j = near[i, r] (Tensor[N, k], rows of
    distinct indices, nearest first), or k where i is not among them."""
    n, k = near.shape
    keys, order = _pair_keys(near).reshape(-1).sort()
    pos, found = _lookup(keys, near * n + torch.arange(n, device=near.device).unsqueeze(1))
    return torch.where(found, order.take(pos) % k, k)


def _members(keys: torch.Tensor, queries: torch.Tensor, n: int) -> torch.Tensor:
    """found[p, s]: whether queries[p, s] is among the sorted keys i * N + j, where queries[p] has
    the row i of keys[p]. A bitmap of each block of rows answers with one gather per query, where a
    binary search costs a cache miss per step."""
    found = torch.empty(queries.shape, dtype=torch.bool, device=keys.device)
    step = max(1, _RANK_BLOCK_ELEMENTS // n)
    bounds = torch.searchsorted(keys, torch.arange(0, n + step, step, device=keys.device) * n).tolist()
    for block, begin in enumerate(range(0, n, step)):
        lo, hi = bounds[block], bounds[block + 1]
        bitmap = torch.zeros(min(step, n - begin) * n, dtype=torch.bool, device=keys.device)
        bitmap[keys[lo:hi] - begin * n] = True
        found[lo:hi] = bitmap.take(queries[lo:hi] - begin * n)
    return found


def _expanded_sets(ranks: torch.Tensor, k1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The members of every E(i) as (rows, columns), sorted by row then column."""
    n = ranks.size(0)
    near = ranks[:, : min(k1 + 1, n)].contiguous()
    half = min(round(k1 / 2) + 1, n)  # round() as np.around: half to even
    back = _reciprocal_ranks(near)
    # the half neighbourhoods are prefixes: i is among the `half` nearest of j when its rank there is below
    recip, half_recip = back < near.size(1), back[:, :half] < half
    recip_keys = _pair_keys(near)[recip].sort().values  # R(i, k1) as keys i * N + j
    # Each candidate c in R(i, k1), with R(c, round(k1 / 2)) = the members cand[p, cand_in[p]].
    owner, candidate = recip_keys // n, recip_keys % n
    cand, cand_in = near[:, :half].index_select(0, candidate), half_recip.index_select(0, candidate)
    cand_keys = owner.unsqueeze(1) * n + cand
    shared = (cand_in & _members(recip_keys, cand_keys, n)).sum(1)
    expand = 3 * shared > 2 * cand_in.sum(1)  # |R(c) & R(i)| > 2/3 |R(c)|, in integers
    keys = torch.unique(torch.cat([recip_keys, cand_keys[cand_in & expand.unsqueeze(1)]]))
    return keys // n, keys % n


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to 1 inside (restored after; process-wide). For the memory-bound
    stages (ranking rows of distances, the sparse stages: hundreds of ops on blocks of at most a
    few MiB), 2 threads cost more than they saved, 4x to 10x more when other processes held the
    cores (measured on 2 cores); the products with the features keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _re_rank(ranks, pair_distance: Callable, original_qg: torch.Tensor, k1, k2, lambda_value, bar) -> torch.Tensor:
    """The re-ranked Tensor[Q, G], written over original_qg (original[:Q, Q:]), from each row's
    nearest samples ranks (Tensor[N, >= min(max(k1 + 1, k2), N)], nearest first) and
    pair_distance(rows, cols), original[rows, cols]."""
    n, num_query = ranks.size(0), original_qg.size(0)
    cpu = torch.device("cpu")
    with _one_thread():
        bar.set_postfix_str("k-reciprocal sets")
        rows, cols = _expanded_sets(ranks, k1)
        weights = torch.exp(-pair_distance(rows, cols))
        totals = torch.zeros(n, dtype=weights.dtype, device=weights.device).index_add_(0, rows, weights)
        vals = weights / totals.take(rows)
        bar.update()
        # The query expansion and the Jaccard sums: compiled loops over the entries of V (a CPU op;
        # V has O(N k) entries, so moving it there costs little).
        bar.set_postfix_str("query expansion, jaccard")
        jaccard = torch.ops.reid_ext._jaccard_distance(rows.to(cpu), cols.to(cpu), vals.to(cpu), ranks.to(cpu),
                                                       num_query, k2)
        bar.update()
        original_qg.mul_(lambda_value).add_(jaccard.to(original_qg.device), alpha=1 - lambda_value)
    bar.update()
    bar.close()
    return original_qg


def _progress(n: int) -> tqdm:
    return tqdm(total=4, desc="re-ranking", disable=n < _PROGRESS_FROM, leave=False)


@torch.no_grad()
def re_ranking(
    qf: torch.Tensor, gf: torch.Tensor, k1: int = defaults.RERANK_K1, k2: int = defaults.RERANK_K2,
    lambda_value: float = defaults.RERANK_LAMBDA,
) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) from features, on the cosine distance.

    Equals ``re_ranking_distances(1 - S_qg, 1 - S_qq, 1 - S_gg, k1, k2, lambda_value)`` with
    S = cosine_similarity (the cosine distance of the L2-normalized features), without any
    (Q+G) x (Q+G) matrix: ``reid_ext.topk_similarity`` gives every sample's max(k1 + 1, k2)
    nearest and its largest distance, V is sparse, and one Q x G product gives the final
    original-distance term. Memory O((Q+G) x k) besides the result.

    The algorithm squares the distances and scales each row by its largest value, so any constant
    factor cancels: this is also the result on the squared Euclidean distances of the normalized
    features (2 - 2 S, torchreid's "euclidean" with normalize_feature). For the Euclidean
    distance of the raw features (the paper's), pass torch.cdist matrices to re_ranking_distances.
    Ties among equal similarities rank the lower index first.

    Args:
        qf (Tensor[Q, D]): query features.
        gf (Tensor[G, D]): gallery features.
        k1 (int): size of the k-reciprocal neighbourhoods, >= 1.
        k2 (int): neighbours averaged by the local query expansion, >= 1 (1: none).
        lambda_value (float): weight of the original distance, in [0, 1].

    Returns:
        Tensor[Q, G] of re-ranked distances (smaller = closer), for evaluate_rank.
    """
    _check_features(qf, gf)
    check_re_ranking_options(k1, k2, lambda_value)
    num_query, num_gallery = qf.size(0), gf.size(0)
    if num_query == 0 or num_gallery == 0:
        return qf.new_zeros(num_query, num_gallery)
    x = torch.cat([qf, gf])
    n = x.size(0)
    bar = _progress(n)
    bar.set_postfix_str("top-k similarity")
    top = reid_ext.topk_similarity(x, k=min(max(k1 + 1, k2), n))
    # d = 1 - S: a row's largest d^2 is at its smallest similarity, or at its largest if that exceeds 1.
    far_sq = torch.maximum((1 - top.far).square(), (1 - top.values[:, 0]).square())
    original_qg = reid_ext.cosine_similarity(qf, gf).neg_().add_(1).square_().div_(far_sq[:num_query, None])
    bar.update()
    keys, order = (torch.arange(n, device=x.device).unsqueeze(1) * n + top.indices).reshape(-1).sort()
    top_values = top.values.reshape(-1).take(order)
    inv_norm = 1 / x.norm(dim=1).clamp_min(1e-12)

    def pair_distance(rows, cols):
        # S from the top-k where it holds the pair, else the dot product of the two rows.
        pos, found = _lookup(keys, rows * n + cols)
        sim = torch.where(found, top_values.take(pos), 0)
        missing = (~found).nonzero().squeeze(1)
        for chunk in missing.split(max(1, _BLOCK_ELEMENTS // x.size(1))):
            r, c = rows.take(chunk), cols.take(chunk)
            dots = torch.linalg.vecdot(x.index_select(0, r), x.index_select(0, c))
            sim[chunk] = dots * (inv_norm.take(r) * inv_norm.take(c))
        return (1 - sim).square_().div_(far_sq.take(rows))

    return _re_rank(top.indices, pair_distance, original_qg, k1, k2, lambda_value, bar)


def _distance_tensor(name: str, value, shape) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t


def _transposed(columns: torch.Tensor) -> torch.Tensor:
    """columns.t() (columns: a column slice of a row-major matrix) as a contiguous tensor. Through a
    contiguous copy first: copy_ transposes a whole contiguous matrix in cache-sized tiles, a
    slice only element by element, one cache miss each."""
    return columns.contiguous().t().contiguous()


def _blocks_of_transposed(q_q, q_g, g_g):
    """Consecutive row blocks (begin, block) of A^T, A = [[q_q, q_g], [q_g^T, g_g]]: rows [q_q^T, q_g]
    for queries, [q_g^T, g_g^T] for gallery samples, each copied into the same buffer."""
    num_query, n = q_q.size(0), q_q.size(0) + g_g.size(0)
    step = max(1, _RANK_BLOCK_ELEMENTS // n)
    buffer = q_g.new_empty(min(step, n), n)
    for begin in range(0, num_query, step):
        block = buffer[: min(step, num_query - begin)]
        block[:, :num_query].copy_(_transposed(q_q[:, begin : begin + step]))
        block[:, num_query:].copy_(q_g[begin : begin + step])
        yield begin, block
    for begin in range(0, n - num_query, step):
        block = buffer[: min(step, n - num_query - begin)]
        block[:, :num_query].copy_(_transposed(q_g[:, begin : begin + step]))
        block[:, num_query:].copy_(_transposed(g_g[:, begin : begin + step]))
        yield num_query + begin, block


@torch.no_grad()
def re_ranking_distances(
    q_g_dist, q_q_dist, g_g_dist, k1: int = defaults.RERANK_K1, k2: int = defaults.RERANK_K2,
    lambda_value: float = defaults.RERANK_LAMBDA,
) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) from distance matrices, with the
    semantics of the re_ranking function of fast-reid and torchreid.

    final = (1 - lambda) * jaccard(V) + lambda * original, with original = A^2 transposed and each
    row scaled by its largest value, A = [[q_q, q_g], [q_g^T, g_g]] (every step: docs/api.md,
    "topk_similarity and k-reciprocal re-ranking").
    The inputs are taken as given (not squared, not symmetrized). Computed in their dtype (the
    standard code in float32) with a sparse V and O((Q+G) x k) memory besides the inputs and the
    result. Equal distances within a row rank in an unspecified order, as np.argsort's.

    Args:
        q_g_dist (Tensor or ndarray [Q, G]): query-gallery distances.
        q_q_dist (Tensor or ndarray [Q, Q]): query-query distances.
        g_g_dist (Tensor or ndarray [G, G]): gallery-gallery distances.
        k1, k2, lambda_value: as in re_ranking.

    Returns:
        Tensor[Q, G] of re-ranked distances (smaller = closer), for evaluate_rank.
    """
    q_g = torch.as_tensor(q_g_dist)
    if q_g.dim() != 2:
        raise ValueError(f"q_g_dist must be 2-D [Q, G], got shape {tuple(q_g.shape)}")
    num_query, num_gallery = q_g.shape
    q_g = _distance_tensor("q_g_dist", q_g, (num_query, num_gallery))
    q_q = _distance_tensor("q_q_dist", q_q_dist, (num_query, num_query))
    g_g = _distance_tensor("g_g_dist", g_g_dist, (num_gallery, num_gallery))
    for name, t in (("q_q_dist", q_q), ("g_g_dist", g_g)):
        if t.dtype != q_g.dtype or t.device != q_g.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but q_g_dist is {q_g.dtype} on {q_g.device}")
    check_re_ranking_options(k1, k2, lambda_value)
    if num_query == 0 or num_gallery == 0:
        return q_g.new_zeros(num_query, num_gallery)
    n = num_query + num_gallery
    k = min(max(k1 + 1, k2), n)
    bar = _progress(n)
    bar.set_postfix_str("nearest samples")
    ranks = torch.empty(n, k, dtype=torch.long, device=q_g.device)
    far_sq = torch.empty(n, dtype=q_g.dtype, device=q_g.device)
    with _one_thread():
        for a, block in _blocks_of_transposed(q_q, q_g, g_g):
            squared = block.square_()
            far_sq[a : a + block.size(0)] = squared.amax(1)
            # Ranked before the scaling: dividing a row by its (positive) maximum keeps its order; a
            # zero or NaN maximum leaves the standard code a row of NaN, ranked in no defined order.
            ranks[a : a + block.size(0)] = torch.topk(squared, k, dim=1, largest=False).indices
    original_qg = q_g.square().div_(far_sq[:num_query, None])
    bar.update()

    def pair_distance(rows, cols):
        # A^T[rows, cols] from the block of A that holds it.
        out = torch.empty(rows.shape, dtype=q_g.dtype, device=q_g.device)
        row_q, col_q = rows < num_query, cols < num_query
        for sel, matrix, r, c in (
            (row_q & col_q, q_q, cols, rows),
            (row_q & ~col_q, q_g, rows, cols - num_query),
            (~row_q & col_q, q_g, cols, rows - num_query),
            (~row_q & ~col_q, g_g, cols - num_query, rows - num_query),
        ):
            out[sel] = matrix[r[sel], c[sel]]
        return out.square_().div_(far_sq[rows])

    return _re_rank(ranks, pair_distance, original_qg, k1, k2, lambda_value, bar)
