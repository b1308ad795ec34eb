"""Re-ID evaluation: CMC, mAP and mINP under the Market-1501, SYSU-MM01 and RegDB protocols.

``evaluate_rank`` implements the Market-1501 protocol on a distance matrix.
``evaluate_sysu`` adds SYSU-MM01's camera rule and single-shot gallery trials.
RegDB's visible-to-thermal protocol is ``evaluate_rank`` between modalities
(one camera each, so nothing is removed). ``extract_features`` and
``distance_matrix`` produce the inputs (flip-averaged features; distances
1 - cosine similarity through ``reid_ext.cosine_similarity``, in chunks), and
``evaluate_dataset`` runs the whole protocol of a ``ReIDDataset``.
``re_ranking`` and ``re_ranking_distances`` (reid_ext.rerank, also exported here)
are the k-reciprocal re-ranking of Zhong et al. (CVPR 2017).
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

import reid_ext
from reid_ext import defaults
from reid_ext.rerank import check_re_ranking_options, re_ranking, re_ranking_distances


__all__ = [
    "evaluate_rank",
    "evaluate_sysu",
    "sysu_gallery_trials",
    "distance_matrix",
    "extract_features",
    "evaluate_dataset",
    "re_ranking",
    "re_ranking_distances",
    "check_re_ranking_options",
]

def _to_numpy(name: str, value, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    return array


def _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    distmat = _to_numpy("distmat", distmat, 2)
    q_pids, g_pids = _to_numpy("q_pids", q_pids, 1), _to_numpy("g_pids", g_pids, 1)
    q_camids, g_camids = _to_numpy("q_camids", q_camids, 1), _to_numpy("g_camids", g_camids, 1)
    num_q, num_g = distmat.shape
    for name, array, n, what in (
        ("q_pids", q_pids, num_q, "rows"),
        ("q_camids", q_camids, num_q, "rows"),
        ("g_pids", g_pids, num_g, "columns"),
        ("g_camids", g_camids, num_g, "columns"),
    ):
        if len(array) != n:
            raise ValueError(f"{name} has {len(array)} entries but distmat has {n} {what}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return distmat, q_pids, g_pids, q_camids, g_camids


def _summarize(first_match_ranks: Sequence[int], aps, inps, max_rank: int) -> Dict[str, object]:
    """CMC from the 0-based rank of every valid query's first match, mAP and mINP."""
    if not len(aps):
        raise ValueError("no query has a match in the gallery: cannot evaluate")
    first = np.minimum(np.asarray(first_match_ranks), max_rank)
    cmc = np.cumsum(np.bincount(first, minlength=max_rank + 1)[:max_rank]) / len(aps)
    return {"cmc": cmc.astype(np.float64), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps))}


def _ap_inp(matches: np.ndarray) -> Tuple[float, float]:
    """AP (mean precision at each match) and INP (matches / rank of the last) of a boolean ranking."""
    hits = np.flatnonzero(matches)
    precision = np.arange(1, len(hits) + 1) / (hits + 1.0)
    return float(precision.mean()), float(len(hits) / (hits[-1] + 1.0))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> Dict[str, object]:
    """Market-1501 protocol on distances (smaller = closer).

    Args:
        distmat: ndarray or Tensor[num_q, num_g] of distances.
        q_pids, q_camids: identity and camera of each query, [num_q].
        g_pids, g_camids: identity and camera of each gallery sample, [num_g].
        max_rank: length of the CMC curve.

    For each query, gallery samples of the same identity and the same camera
    are removed; a query with no remaining match is skipped. Ties rank the
    lower gallery index first.

    Returns {"cmc": ndarray[max_rank], the fraction of queries whose first
    match is within rank k + 1 at index k; "mAP": the mean over queries of
    the mean precision at each match; "mINP": the mean of (number of
    matches) / (rank of the last match)}. Raises ValueError if no query has
    a match.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank
    )
    firsts, aps, inps = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        same_pid = g_pids[order] == q_pids[i]
        keep = ~(same_pid & (g_camids[order] == q_camids[i]))
        matches = same_pid[keep]
        if not matches.any():
            continue
        firsts.append(int(np.argmax(matches)))
        ap, inp = _ap_inp(matches)
        aps.append(ap)
        inps.append(inp)
    return _summarize(firsts, aps, inps, max_rank)


# SYSU-MM01's rule (0-based camera ids): queries from cam3 (infrared, indoor)
# ignore the whole cam2 gallery (visible, the same room).
_SYSU_CAM3, _SYSU_CAM2 = 2, 1


def _evaluate_sysu_single(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    firsts, aps, inps = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((q_camids[i] == _SYSU_CAM3) & (g_camids[order] == _SYSU_CAM2))
        ranked_pids = g_pids[order][keep]
        matches = ranked_pids == q_pids[i]
        if not matches.any():
            continue
        # CMC as the dataset authors compute it: over the ranking of distinct
        # identities (each identity at its best-ranked image).
        _, first_seen = np.unique(ranked_pids, return_index=True)
        distinct = ranked_pids[np.sort(first_seen)]
        firsts.append(int(np.argmax(distinct == q_pids[i])))
        ap, inp = _ap_inp(matches)
        aps.append(ap)
        inps.append(inp)
    return _summarize(firsts, aps, inps, max_rank)


def sysu_gallery_trials(g_pids, g_camids, trials: int = 10, seed: int = 0) -> Sequence[np.ndarray]:
    """SYSU-MM01 single-shot galleries: per trial, one random image per (identity, camera).

    Returns ``trials`` sorted index arrays into the full gallery; trial t uses seed + t.
    """
    g_pids, g_camids = _to_numpy("g_pids", g_pids, 1), _to_numpy("g_camids", g_camids, 1)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    keys = np.stack([g_pids, g_camids], axis=1)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    members = [np.flatnonzero(group == k) for k in range(group.max() + 1)] if len(group) else []
    out = []
    for t in range(trials):
        rng = np.random.default_rng(seed + t)
        out.append(np.sort(np.array([rng.choice(m) for m in members], dtype=np.int64)))
    return out


def evaluate_sysu(
    distmat, q_pids, g_pids, q_camids, g_camids, *, trials: int = 10, seed: int = 0, max_rank: int = 20
) -> Dict[str, object]:
    """SYSU-MM01 protocol, averaged over ``trials`` single-shot galleries.

    ``distmat`` [num_q, num_g] holds the distances from the infrared queries to
    every visible test image of the search mode (cameras 1, 2, 4, 5 for
    all-search, 1, 2 for indoor-search; ``load_sysu_mm01`` builds both). Each
    trial keeps one random image per (identity, camera) (``sysu_gallery_trials``);
    queries from cam3 ignore cam2; CMC ranks distinct identities, as the dataset
    authors' code does; AP and INP are as in ``evaluate_rank``.
    Returns the trial means {"cmc": ndarray[max_rank], "mAP", "mINP"}.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank
    )
    results = []
    for columns in sysu_gallery_trials(g_pids, g_camids, trials, seed):
        results.append(
            _evaluate_sysu_single(distmat[:, columns], q_pids, g_pids[columns], q_camids, g_camids[columns], max_rank)
        )
    return {
        "cmc": np.mean([r["cmc"] for r in results], axis=0),
        "mAP": float(np.mean([r["mAP"] for r in results])),
        "mINP": float(np.mean([r["mINP"] for r in results])),
    }


def distance_matrix(query: torch.Tensor, gallery: torch.Tensor, chunk_size: int = 4096) -> np.ndarray:
    """1 - cosine similarity between query Tensor[num_q, D] and gallery Tensor[num_g, D].

    Computed by ``reid_ext.cosine_similarity`` on the tensors' device, ``chunk_size``
    queries at a time, so that only one chunk of the matrix lives there.
    Returns float32 ndarray[num_q, num_g].
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = np.empty((query.size(0), gallery.size(0)), dtype=np.float32)
    for start in range(0, query.size(0), chunk_size):
        sim = reid_ext.cosine_similarity(query[start : start + chunk_size], gallery)
        out[start : start + sim.size(0)] = (1.0 - sim).float().cpu().numpy()
    return out


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    flip: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings of every image of ``loader`` (batches of (images, pids, camids, modalities)).

    ``model`` returns an object with an ``embedding`` Tensor[B, D] (``MGNOutput``)
    or a Tensor[B, D]. With ``flip`` the embedding is the mean of the image's
    and its mirror image's. ``amp_dtype`` runs the model under autocast on CUDA.
    Returns (features float32 Tensor[N, D] on ``device``, pids, camids, modalities).
    """
    was_training = model.training
    model.eval()
    feats, pids, camids, mods = [], [], [], []

    def embed(images):
        out = model(images)
        return (out.embedding if hasattr(out, "embedding") else out).float()

    try:
        for images, pid, camid, modality in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                f = embed(images)
                if flip:
                    f = (f + embed(images.flip(-1))) / 2
            feats.append(f)
            pids.append(np.asarray(pid))
            camids.append(np.asarray(camid))
            mods.append(np.asarray(modality))
    finally:
        model.train(was_training)
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids), np.concatenate(mods)


def evaluate_dataset(
    model: torch.nn.Module,
    query_loader: torch.utils.data.DataLoader,
    gallery_loader: torch.utils.data.DataLoader,
    protocol: str,
    device: torch.device,
    *,
    flip: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
    rerank: bool = False,
    k1: int = defaults.RERANK_K1,
    k2: int = defaults.RERANK_K2,
    lambda_value: float = defaults.RERANK_LAMBDA,
) -> Dict[str, object]:
    """Evaluate ``model`` under ``protocol`` ("market", "sysu-all", "sysu-indoor", "cross-modality").

    Returns {"rank1", "rank5", "rank10", "mAP", "mINP"} as fractions in [0, 1]
    and "cmc" (ndarray). With ``rerank``, also "rerank": the same metrics on the
    distances of ``re_ranking(qf, gf, k1, k2, lambda_value)`` from the same features.
    """
    if protocol not in ("market", "cross-modality", "sysu-all", "sysu-indoor"):
        raise ValueError(f"unknown protocol {protocol!r}")
    if rerank:
        check_re_ranking_options(k1, k2, lambda_value)
    qf, q_pids, q_camids, _ = extract_features(model, query_loader, device, flip=flip, amp_dtype=amp_dtype)
    gf, g_pids, g_camids, _ = extract_features(model, gallery_loader, device, flip=flip, amp_dtype=amp_dtype)

    def metrics(distmat) -> Dict[str, object]:
        if protocol in ("market", "cross-modality"):
            result = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
        else:
            result = evaluate_sysu(distmat, q_pids, g_pids, q_camids, g_camids)
        cmc = result["cmc"]
        return {
            "rank1": float(cmc[0]),
            "rank5": float(cmc[min(4, len(cmc) - 1)]),
            "rank10": float(cmc[min(9, len(cmc) - 1)]),
            "mAP": result["mAP"],
            "mINP": result["mINP"],
            "cmc": cmc,
        }

    out = metrics(distance_matrix(qf, gf))
    if rerank:
        out["rerank"] = metrics(re_ranking(qf, gf, k1, k2, lambda_value))
    return out
