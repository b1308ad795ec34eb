"""Benchmark: reid_ext's k-reciprocal re-ranking against the dense numpy algorithm.

The dense algorithm below (``dense_re_ranking``) is a transcription of the re_ranking function
that fast-reid and torchreid ship; tests/test_rerank.py checks reid_ext against it too.
"""
import numpy as np


def dense_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, dtype=np.float32):
    """The standard k-reciprocal re-ranking on dense (Q+G) x (Q+G) matrices, in ``dtype``
    (float32 as the standard code; float64 for the tests). Returns ndarray[Q, G]."""
    num_query = q_g_dist.shape[0]
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    squared = np.square(full).astype(dtype)
    original = (squared / squared.max(axis=0)).T  # each column by its maximum, then transposed
    n = original.shape[0]
    rank = np.argsort(original, axis=1)

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        return forward[(rank[forward, : k + 1] == i).any(axis=1)]

    half = int(np.around(k1 / 2.0))
    V = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        members = reciprocal(i, k1)
        expansion = members
        for c in members:
            candidate = reciprocal(c, half)
            if len(np.intersect1d(candidate, members)) > 2.0 / 3 * len(candidate):
                expansion = np.append(expansion, candidate)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        expanded = np.zeros_like(V)
        for i in range(n):
            expanded[i] = V[rank[i, :k2]].mean(axis=0)
        V = expanded
    holders = [np.flatnonzero(V[:, f]) for f in range(n)]  # the rows that hold column f
    jaccard = np.zeros((num_query, n), dtype=dtype)
    for i in range(num_query):
        overlap = np.zeros(n, dtype=dtype)
        for f in np.flatnonzero(V[i]):
            overlap[holders[f]] += np.minimum(V[i, f], V[holders[f], f])
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]
