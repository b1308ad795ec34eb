"""Identity-balanced batch samplers for metric learning.

Both samplers are batch samplers (pass them as ``DataLoader(batch_sampler=...)``)
and are deterministic functions of (seed, epoch): call ``set_epoch`` before
each epoch, and a resumed run replays the same batches. With
``world_size > 1`` every rank draws the same epoch plan and takes every
``world_size``-th batch, so ranks see disjoint batches of equal count.
"""
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch

__all__ = ["PKSampler", "CrossModalityPKSampler"]


def _group(indices_by: Sequence[int]) -> Dict[int, np.ndarray]:
    groups: Dict[int, List[int]] = {}
    for index, key in enumerate(indices_by):
        groups.setdefault(int(key), []).append(index)
    return {key: np.asarray(value) for key, value in sorted(groups.items())}


class _EpochBatchSampler(torch.utils.data.Sampler):
    def __init__(self, seed: int, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._plan = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = epoch
        self._plan = None

    def _rank_batches(self) -> List[List[int]]:
        if self._plan is None:
            batches = self._epoch_batches(np.random.default_rng([self.seed, self.epoch]))
            per_rank = len(batches) // self.world_size
            self._plan = batches[self.rank : per_rank * self.world_size : self.world_size]
        return self._plan

    def _epoch_batches(self, rng: np.random.Generator) -> List[List[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())


class PKSampler(_EpochBatchSampler):
    """Batches of P identities x K images each (batch size P * K).

    An epoch walks through every image about once: each identity's images are
    shuffled and cut into chunks of K (an identity with fewer than K images is
    sampled with replacement up to K), then batches take one chunk from each of
    P distinct random identities until fewer than P identities have chunks left.

    Args:
        labels: identity of each dataset index.
        num_identities: P.
        num_instances: K.
    """

    def __init__(
        self,
        labels: Sequence[int],
        num_identities: int,
        num_instances: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(seed, rank, world_size)
        if num_identities < 2:
            raise ValueError(f"num_identities (P) must be >= 2 for triplet mining, got {num_identities}")
        if num_instances < 1:
            raise ValueError(f"num_instances (K) must be >= 1, got {num_instances}")
        self.groups = _group(labels)
        if len(self.groups) < num_identities:
            raise ValueError(f"labels has {len(self.groups)} identities, fewer than num_identities={num_identities}")
        self.num_identities = num_identities
        self.num_instances = num_instances

    def _epoch_batches(self, rng: np.random.Generator) -> List[List[int]]:
        k = self.num_instances
        chunks: Dict[int, List[np.ndarray]] = {}
        for pid, indices in self.groups.items():
            if len(indices) < k:
                indices = rng.choice(indices, size=k, replace=True)
            else:
                indices = rng.permutation(indices)
            chunks[pid] = [indices[i : i + k] for i in range(0, len(indices) - k + 1, k)]
        batches = []
        while len(chunks) >= self.num_identities:
            pids = sorted(chunks)
            chosen = rng.choice(len(pids), size=self.num_identities, replace=False)
            batch = []
            for i in chosen:
                pid = pids[i]
                batch.extend(int(j) for j in chunks[pid].pop())
                if not chunks[pid]:
                    del chunks[pid]
            batches.append(batch)
        return batches


class CrossModalityPKSampler(_EpochBatchSampler):
    """Batches of P identities x (K visible + K infrared) images (batch size 2 * P * K).

    Only identities seen in both modalities are drawn. An epoch has as many
    batches as the larger modality has images / (P * K); each batch draws P
    distinct identities and K images of each modality per identity, without
    replacement when the identity has enough.

    Args:
        labels: identity of each dataset index.
        modalities: modality (0 visible, 1 infrared) of each dataset index.
        num_identities: P.
        num_instances: K.
    """

    def __init__(
        self,
        labels: Sequence[int],
        modalities: Sequence[int],
        num_identities: int,
        num_instances: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(seed, rank, world_size)
        if len(labels) != len(modalities):
            raise ValueError(f"labels has {len(labels)} entries but modalities has {len(modalities)}")
        if set(int(m) for m in modalities) != {0, 1}:
            raise ValueError("modalities must contain both 0 (visible) and 1 (infrared)")
        if num_identities < 2:
            raise ValueError(f"num_identities (P) must be >= 2 for triplet mining, got {num_identities}")
        if num_instances < 1:
            raise ValueError(f"num_instances (K) must be >= 1, got {num_instances}")
        labels = [int(v) for v in labels]
        by_modality = [
            _group([pid if int(m) == mod else -1 for pid, m in zip(labels, modalities)]) for mod in (0, 1)
        ]
        for groups in by_modality:
            groups.pop(-1, None)
        self.pids = sorted(set(by_modality[0]) & set(by_modality[1]))
        if len(self.pids) < num_identities:
            raise ValueError(
                f"{len(self.pids)} identities have both modalities, fewer than num_identities={num_identities}"
            )
        self.by_modality = by_modality
        self.num_identities = num_identities
        self.num_instances = num_instances
        largest = max(sum(len(g) for g in groups.values()) for groups in by_modality)
        self.num_batches = max(1, largest // (num_identities * num_instances))

    def _epoch_batches(self, rng: np.random.Generator) -> List[List[int]]:
        k = self.num_instances
        batches = []
        for _ in range(self.num_batches):
            batch = []
            for i in rng.choice(len(self.pids), size=self.num_identities, replace=False):
                for groups in self.by_modality:
                    indices = groups[self.pids[i]]
                    batch.extend(int(j) for j in rng.choice(indices, size=k, replace=len(indices) < k))
            batches.append(batch)
        return batches
