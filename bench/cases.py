"""What the loss benchmark runs: the losses (reid_ext, its eager reference, torch.compile of it, and
pytorch-metric-learning where it has the same loss), their inputs, the check that they agree, and
the sizes of a run."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import reid_ext
from reid_ext import reference
from harness import Step

IMPLS = ("reid_ext", "eager", "compile", "pml")
K = 4  # samples per identity in a P x K batch, K / 2 of them in each of the two modalities
CLASSES = 751  # cosine_softmax_loss classes: the identities of Market-1501's training set


@dataclass
class Inputs:
    """One case's tensors; `leaves` receive gradients, `grad_out` seeds a non-scalar output."""

    x: torch.Tensor
    labels: torch.Tensor
    modalities: torch.Tensor
    ref: Optional[torch.Tensor] = None
    ref_labels: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    grad_out: Optional[torch.Tensor] = None

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.x, self.weight) if t is not None]


def make_inputs(n: int, d: int, m: Optional[int], kind: str, device: torch.device, seed: int = 0) -> Inputs:
    """A P x K batch laid out as a visible-infrared re-ID sampler does: the first half of the
    batch is modality 0, the second half modality 1, and every identity has K / 2 samples in
    each half, so that each anchor has positives in its own and in the other modality."""
    gen = torch.Generator().manual_seed(seed)
    halves = (n // 2, n - n // 2)
    labels = torch.cat([torch.arange(h) // (K // 2) for h in halves])
    modalities = torch.cat([torch.full((h,), i) for i, h in enumerate(halves)])
    t = Inputs(x=torch.randn(n, d, generator=gen), labels=labels, modalities=modalities)
    if kind == "bank":
        # A detached memory bank (as CrossBatchMemory holds, so it takes no gradient) in which
        # every identity of the batch has M / P entries.
        t.ref = torch.randn(m, d, generator=gen)
        t.ref_labels = torch.arange(m) % (int(labels.max()) + 1)
    elif kind == "classes":
        t.weight = torch.randn(m, d, generator=gen)
        t.labels = labels % m
    elif kind == "matrix":
        t.grad_out = torch.randn(n, n, generator=gen)
    for name in ("x", "labels", "modalities", "ref", "ref_labels", "weight", "grad_out"):
        value = getattr(t, name)
        if value is not None:
            setattr(t, name, value.to(device))
    for leaf in t.leaves:
        leaf.requires_grad_(True)
    return t


@dataclass(frozen=True)
class LossSpec:
    """A benchmarked loss: which function, how to call it, and its pytorch-metric-learning twin."""

    name: str
    fn: str  # the function's name in reid_ext and in reid_ext.reference
    call: Callable[[Callable, Inputs], torch.Tensor]
    kind: str = "batch"  # "batch": the batch is its own reference set; "bank", "classes", "matrix"
    triplet: bool = True  # a triplet loss: gets the extra memory row and the triplet targets
    pml: Optional[Callable[[Inputs], Step]] = None
    no_pml: str = ""  # why there is no pml equivalent, when pml is None


def _pml_cosine_similarity(t: Inputs) -> Step:
    from pytorch_metric_learning.distances import CosineSimilarity

    similarity = CosineSimilarity()
    return Step(lambda: similarity(t.x), [t.x], t.grad_out)


def _pml_batch_hard(t: Inputs) -> Step:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    # Raw (non-normalized) euclidean distances for both the miner and the loss, as
    # metric="euclidean" is. The miner emits one triplet per anchor that has a positive and a
    # negative, so MeanReducer divides by the number of valid anchors, as reduction="mean"
    # does; pml's default AvgNonZeroReducer would drop the anchors with zero loss.
    def distance():
        return LpDistance(normalize_embeddings=False, p=2, power=1)

    miner = BatchHardMiner(distance=distance())
    loss = TripletMarginLoss(margin=0.3, distance=distance(), reducer=MeanReducer())
    return Step(lambda: loss(t.x, t.labels, miner(t.x, t.labels)), [t.x])


def _pml_cosface(t: Inputs) -> Step:
    from pytorch_metric_learning.losses import CosFaceLoss
    from pytorch_metric_learning.reducers import MeanReducer

    classes, dim = t.weight.shape
    loss = CosFaceLoss(classes, dim, margin=0.35, scale=64.0, reducer=MeanReducer()).to(t.x.device)
    # pml keeps its class weights as W[D, C]: start from the same weights as the others.
    with torch.no_grad():
        loss.W.copy_(t.weight.t())
    return Step(lambda: loss(t.x, t.labels), [t.x, loss.W])


_NO_UNIFIED = "pml has no unified batch-all loss; its CircleLoss adds adaptive per-pair weights"

LOSSES: Dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cosine_similarity", "cosine_similarity", lambda f, t: f(t.x),
                 kind="matrix", triplet=False, pml=_pml_cosine_similarity),
        LossSpec("unified_triplet_loss/all", "unified_triplet_loss", lambda f, t: f(t.x, t.labels),
                 no_pml=_NO_UNIFIED),
        LossSpec("unified_triplet_loss/cross", "unified_triplet_loss",
                 lambda f, t: f(t.x, t.labels, modalities=t.modalities, mode="cross"), no_pml=_NO_UNIFIED),
        LossSpec("unified_triplet_loss/bank", "unified_triplet_loss",
                 lambda f, t: f(t.x, t.labels, ref=t.ref, ref_labels=t.ref_labels), kind="bank",
                 no_pml=_NO_UNIFIED),
        LossSpec("batch_hard_triplet_loss", "batch_hard_triplet_loss", lambda f, t: f(t.x, t.labels),
                 pml=_pml_batch_hard),
        LossSpec("hetero_center_triplet_loss", "hetero_center_triplet_loss",
                 lambda f, t: f(t.x, t.labels, t.modalities), no_pml="pml has no modality-center loss"),
        LossSpec("cosine_softmax_loss", "cosine_softmax_loss", lambda f, t: f(t.x, t.weight, t.labels),
                 kind="classes", triplet=False, pml=_pml_cosface),
    )
}


def make_step(spec: LossSpec, impl: str, t: Inputs) -> Step:
    if impl == "pml":
        return spec.pml(t)
    if impl == "reid_ext":
        fn = getattr(reid_ext, spec.fn)
    elif impl == "eager":
        fn = getattr(reference, spec.fn)
    else:
        # One static graph per case, the most favourable setting for compile. The reset keeps
        # earlier sizes from counting against dynamo's recompile limit, past which it would
        # silently fall back to eager.
        torch._dynamo.reset()
        fn = torch.compile(getattr(reference, spec.fn), dynamic=False)
    return Step(lambda: spec.call(fn, t), t.leaves, t.grad_out)


def check_agreement(specs: Sequence[LossSpec], impls: Sequence[str], device: torch.device, classes: int) -> List[str]:
    """Before timing anything: reid_ext and pml must compute the eager reference's loss and
    gradient, or the comparison would not be between equals. Half of the identities are tight
    clusters, so that many anchors have a zero loss: a reducer that drops those (pml's
    default AvgNonZeroReducer) or a distance that normalizes would then disagree. Returns the
    disagreements."""
    failures = []
    for spec in specs:
        m = {"bank": 64, "classes": classes}.get(spec.kind)
        t = make_inputs(32, 64, m, spec.kind, device, seed=1)
        centers = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).to(device)
        tight = t.labels % 2 == 0
        with torch.no_grad():
            t.x[tight] = centers[t.labels[tight]] + 0.05 * t.x[tight]
        expected_step = make_step(spec, "eager", t)
        expected_step.clear()
        expected = expected_step.run().detach()
        expected_grad = t.x.grad.clone()
        for impl in impls:
            if impl not in ("reid_ext", "pml") or (impl == "pml" and spec.pml is None):
                continue
            step = make_step(spec, impl, t)
            step.clear()
            try:
                torch.testing.assert_close(step.run().detach(), expected, rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(t.x.grad, expected_grad, rtol=1e-3, atol=1e-4)
            except AssertionError as err:
                failures.append(f"{spec.name}, {impl} vs eager: {err}")
    return failures


@dataclass(frozen=True)
class Case:
    loss: str
    n: int
    d: int
    m: Optional[int]  # bank rows or classes; None when the batch is its own reference set


# The largest peak bytes per (anchor, reference) pair among eager, compile and pml, measured
# at N = 1024, D = 256 on CPU and rounded up: N x M times this is about what they allocate.
PAIR_BYTES = {"matrix": 12, "batch": 32, "bank": 32, "classes": 24}


def plan(specs: Sequence[LossSpec], args) -> List[Case]:
    cases = []
    for spec in specs:
        if spec.kind == "bank":
            cases += [Case(spec.name, args.bank_n, d, m) for m in args.bank_m for d in args.d]
            continue
        m = args.classes if spec.kind == "classes" else None
        cases += [Case(spec.name, n, d, m) for n in args.n for d in args.d]
        if spec.triplet and args.memory_row:
            n, d = args.memory_row
            if Case(spec.name, n, d, m) not in cases:
                cases.append(Case(spec.name, n, d, m))
    return cases


def why_skip(spec: LossSpec, impl: str, case: Case, max_gb: float) -> Optional[str]:
    if impl == "reid_ext":
        return None  # O(N + M) extra memory by design: that is what the benchmark shows
    pairs = case.n * (case.m or case.n)
    need_gb = PAIR_BYTES[spec.kind] * pairs / 1e9
    if need_gb > max_gb:
        return f"would need about {need_gb:.3g} GB for its N x M matrices (> --max-gb {max_gb:g})"
    return None
