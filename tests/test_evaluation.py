"""reid_ext.evaluation on hand-computed cases."""
import numpy as np
import pytest
import torch

from reid_ext.evaluation import (
    distance_matrix,
    evaluate_rank,
    evaluate_sysu,
    extract_features,
    sysu_gallery_trials,
)


def test_single_query_hand_computed():
    # Gallery 0 has the query's identity and camera: removed. The remaining
    # ranking is pid 2, 1, 3, 1 -> matches at ranks 2 and 4.
    distmat = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])
    out = evaluate_rank(distmat, [1], [1, 2, 1, 3, 1], [0], [0, 1, 1, 1, 2], max_rank=5)
    np.testing.assert_allclose(out["cmc"], [0, 1, 1, 1, 1])
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(2 / 4)


def test_two_queries_average_and_skip_query_without_match():
    g_pids = [1, 2, 2, 1]
    g_cams = [1, 1, 2, 2]
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # pid 1: matches at ranks 1 and 4 -> AP (1 + 2/4)/2, INP 2/4
            [0.4, 0.3, 0.2, 0.1],  # pid 2: ranking 1, 2(cam 2), 2(cam 1), 1 -> matches at 2, 3
            [0.1, 0.1, 0.1, 0.1],  # pid 7: no match in the gallery, skipped
        ]
    )
    out = evaluate_rank(distmat, [1, 2, 7], g_pids, [0, 0, 0], g_cams, max_rank=3)
    ap1, ap2 = (1 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2
    assert out["mAP"] == pytest.approx((ap1 + ap2) / 2)
    assert out["mINP"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    np.testing.assert_allclose(out["cmc"], [0.5, 1.0, 1.0])


def test_perfect_ranking_and_cmc_padding_beyond_gallery():
    distmat = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = evaluate_rank(distmat, [1, 2], [1, 2], [0, 0], [1, 1], max_rank=5)
    np.testing.assert_allclose(out["cmc"], np.ones(5))
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0
    assert out["cmc"].shape == (5,)


def test_ties_rank_lower_gallery_index_first():
    # Equal distances: gallery 0 (a non-match) ranks first.
    out = evaluate_rank(np.zeros((1, 2)), [1], [2, 1], [0], [1, 1], max_rank=2)
    np.testing.assert_allclose(out["cmc"], [0, 1])
    assert out["mAP"] == pytest.approx(0.5)


def test_same_camera_other_identity_is_kept():
    # Only same identity AND same camera is removed: a distractor from the
    # query's camera still ranks above the match.
    out = evaluate_rank(np.array([[0.1, 0.2]]), [1], [5, 1], [0], [0, 1], max_rank=2)
    np.testing.assert_allclose(out["cmc"], [0, 1])


def test_tensor_inputs_match_numpy():
    rng = np.random.default_rng(0)
    distmat = rng.random((6, 20))
    q_pids, g_pids = rng.integers(0, 4, 6), rng.integers(0, 4, 20)
    q_cams, g_cams = rng.integers(0, 3, 6), rng.integers(0, 3, 20)
    a = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    b = evaluate_rank(*(torch.as_tensor(v) for v in (distmat, q_pids, g_pids, q_cams, g_cams)), max_rank=10)
    np.testing.assert_allclose(a["cmc"], b["cmc"])
    assert a["mAP"] == pytest.approx(b["mAP"]) and a["mINP"] == pytest.approx(b["mINP"])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="no query has a match"):
        evaluate_rank(np.zeros((1, 1)), [1], [1], [0], [0])
    with pytest.raises(ValueError, match="distmat"):
        evaluate_rank(np.zeros(3), [1], [1, 2, 3], [0], [0, 0, 0])
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_rank(np.zeros((1, 3)), [1], [1, 2], [0], [0, 0, 0])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(np.zeros((1, 1)), [1], [1], [0], [1], max_rank=0)


def test_sysu_rule_and_distinct_identity_cmc():
    # 0-based cameras: the query is from cam3 (2); gallery 0 is from cam2 (1)
    # and is ignored. Remaining ranking: pid 2, pid 2, pid 1 -> the match is
    # image rank 3 but identity rank 2.
    distmat = np.array([[0.0, 0.1, 0.2, 0.3]])
    g_pids, g_cams = np.array([1, 2, 2, 1]), np.array([1, 0, 3, 4])
    out = evaluate_sysu(distmat, [1], g_pids, [2], g_cams, trials=1, max_rank=3)
    np.testing.assert_allclose(out["cmc"], [0, 1, 1])
    assert out["mAP"] == pytest.approx(1 / 3)
    # From cam6 (5) the cam2 image counts.
    out = evaluate_sysu(distmat, [1], g_pids, [5], g_cams, trials=1, max_rank=3)
    np.testing.assert_allclose(out["cmc"], [1, 1, 1])


def test_sysu_gallery_trials_are_single_shot_and_seeded():
    g_pids = np.array([1, 1, 1, 2, 2, 3])
    g_cams = np.array([0, 0, 1, 0, 0, 0])
    trials = sysu_gallery_trials(g_pids, g_cams, trials=5, seed=3)
    assert len(trials) == 5
    for idx in trials:
        pairs = list(zip(g_pids[idx], g_cams[idx]))
        assert sorted(pairs) == [(1, 0), (1, 1), (2, 0), (3, 0)]
    again = sysu_gallery_trials(g_pids, g_cams, trials=5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(trials, again))


def test_distance_matrix_is_one_minus_cosine_in_chunks():
    torch.manual_seed(0)
    q, g = torch.randn(7, 5), torch.randn(11, 5)
    expected = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).t()
    for chunk in (1, 3, 100):
        np.testing.assert_allclose(distance_matrix(q, g, chunk_size=chunk), expected.numpy(), atol=1e-6)


class _LeftWeighted(torch.nn.Module):
    """Embedding that changes under a horizontal flip: per-column sums, weighted."""

    def forward(self, x):
        weights = torch.arange(1, x.size(-1) + 1, dtype=x.dtype)
        return (x.sum(dim=(1, 2)) * weights)


def test_extract_features_averages_the_flip():
    images = torch.randn(5, 3, 4, 6)
    loader = [(images, torch.arange(5), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))]
    model = _LeftWeighted()
    feats, pids, camids, mods = extract_features(model, loader, torch.device("cpu"))
    expected = (model(images) + model(images.flip(-1))) / 2
    torch.testing.assert_close(feats, expected)
    assert pids.tolist() == list(range(5)) and camids.shape == (5,) and mods.shape == (5,)
    plain, *_ = extract_features(model, loader, torch.device("cpu"), flip=False)
    torch.testing.assert_close(plain, model(images))
