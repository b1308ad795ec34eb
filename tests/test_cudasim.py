"""The emulated GPU itself (tools/cudasim): CUDA's semantics as documented, the errors a misuse
gives, the defects its sanitizer builds report, and that the tier runs every kernel of csrc/cuda
on both its single-block and its split paths."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import features, make_labels

import cudasim

pytestmark = pytest.mark.cudasim

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim():
    return cudasim.load()


@pytest.fixture
def multiprocessors(sim):
    """Sets the emulated multiprocessor count for one test."""
    saved = sim.multiprocessor_count()
    yield sim.set_multiprocessor_count
    sim.set_multiprocessor_count(saved)


# ---------------------------------------------------------------- CUDA semantics, as documented


def expected_shuffle(op, lane, arg, width):
    """The lane whose value a 32-lane warp's shuffle returns (CUDA C++ Programming Guide)."""
    base, offset = lane - lane % width, lane % width
    if op == "indexed":  # srcLane modulo width, within the caller's sub-warp
        return base + arg % width
    if op == "up":  # the lower `delta` lanes of each sub-warp keep their own value
        return lane - arg if offset >= arg else lane
    if op == "down":  # the upper `delta` lanes keep theirs
        return lane + arg if offset + arg < width else lane
    source = lane ^ arg  # xor: earlier sub-warps are in reach, later ones give the own value
    return source if source < base + width else lane


@pytest.mark.parametrize("op", ["indexed", "up", "down", "xor"])
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_shuffles_follow_cuda(sim, op, width):
    code = ["indexed", "up", "down", "xor"].index(op)
    for arg in sorted({0, 1, 3, width - 1, width, 17, 31}):
        got = sim.selftest.shuffle(code, arg, width)
        expected = [1000 + 32 * (t // 32) + expected_shuffle(op, t % 32, arg, width) for t in range(64)]
        assert got == expected, (op, width, arg)


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0000FFFF, 0x80000001])
def test_votes_follow_cuda(sim, mask):
    gen = torch.Generator().manual_seed(mask % 1000)
    for _ in range(3):
        predicate = torch.randint(0, 2, (32,), generator=gen).tolist()
        ballot, any_, all_ = sim.selftest.vote(predicate, mask)
        lanes = [lane for lane in range(32) if mask >> lane & 1]
        expected_ballot = sum(1 << lane for lane in lanes if predicate[lane])
        for lane in range(32):
            if lane in lanes:
                assert (ballot[lane], any_[lane], all_[lane]) == (
                    expected_ballot, int(expected_ballot != 0), int(all(predicate[i] for i in lanes)))
            else:  # took no part
                assert (ballot[lane], any_[lane], all_[lane]) == (0, -1, -1)


@pytest.mark.parametrize("active", [1, 31, 100, 256])
def test_barrier_waits_only_for_threads_that_have_not_exited(sim, active):
    out = sim.selftest.barrier_exit(active)
    assert out == [active * (active + 1) // 2] * active + [0] * (256 - active)


MISUSES = [
    ("divergent_barrier", r"divergent __syncthreads\(\): thread \d+ waits at selftest.cu:\d+, thread \d+ arrived at "
                          r"selftest.cu:\d+"),
    ("deadlock", r"deadlock: 32 thread\(s\) wait in __syncthreads\(\) at selftest.cu:\d+; warp 0 lanes 16-31 wait "
                 r"in __shfl_xor_sync\(mask 0xffffffff\) at selftest.cu:\d+ for lanes 0-15"),
    ("exited_lane", r"lane 5 (of warp 0 exited while lanes .* wait for it in|.*naming lanes 5, which have exited)"),
    ("too_many_threads", r"invalid configuration argument: launch of exited_lane_kernel with grid \(1, 1, 1\) and "
                         r"block \(2048, 1, 1\): a block has 1 to 1024 threads"),
    ("empty_grid", r"invalid configuration argument: .* grid dimensions must be at least 1"),
]


@pytest.mark.parametrize("what,message", MISUSES, ids=[m[0] for m in MISUSES])
def test_misuse_fails_the_launch_with_a_clear_message(sim, what, message):
    with pytest.raises(RuntimeError, match=message):
        sim.selftest.misuse(what)
    sim.selftest.barrier_exit(64)  # and the emulator goes on working


def test_dynamic_shared_memory_is_per_block(sim):
    values = [float(v) for v in range(3 * 40)]
    out = sim.selftest.reverse_blocks(values, 40)
    assert out == [values[b * 40 + 39 - t] for b in range(3) for t in range(40)]


def test_atomics(sim):
    fsum, isum, imax, count = sim.selftest.atomics(3, 100)
    assert (fsum, isum, imax, count) == (150.0, 3 * sum(range(100)), 2099, 300)


def test_half_and_bfloat16_round_to_nearest_even_as_torch(sim):
    tricky = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
              2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8,
              1 + 3 * 2.0 ** -8, 3.3895e38, math.inf, -math.inf, 1e-40]
    values = torch.tensor(tricky + torch.randn(2000, generator=torch.Generator().manual_seed(0)).mul(300).tolist())
    half_bits, bf16_bits, from_half, from_bf16 = sim.selftest.conversions(values.tolist())
    assert half_bits == values.half().view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()
    assert bf16_bits == values.bfloat16().view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()
    assert from_half == values.half().float().tolist()
    assert from_bf16 == values.bfloat16().float().tolist()
    nan_half, nan_bf16, back_half, back_bf16 = sim.selftest.conversions([math.nan])
    assert math.isnan(back_half[0]) and math.isnan(back_bf16[0])


# ---------------------------------------------------------------- sanitizer builds report defects

# Per sanitizer: the defects its build must report (selftest.cu), and the report's words.
DEFECTS = {
    "address": [("out_of_bounds", "heap-buffer-overflow"), ("signed_overflow", "signed integer overflow")],
    "thread": [("race", "ThreadSanitizer: data race")],
}


def run_defect(sanitizer, what):
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import cudasim; cudasim.load().selftest.defect({what!r})"
    return subprocess.run([sys.executable, "-c", code], env=cudasim.environment(sanitizer), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(cudasim.sanitizer_from_environment() is None,
                    reason="runs in the sanitizer runs of the tier (python tools/cudasim.py pytest --sanitizer ...)")
def test_sanitizer_reports_injected_defects():
    """In a sanitizer run, the defects that its build must catch are caught, at their source line,
    and a correct kernel passes clean."""
    sanitizer = cudasim.sanitizer_from_environment()
    for what, words in DEFECTS[sanitizer]:
        result = run_defect(sanitizer, what)
        assert result.returncode != 0 and words in result.stderr and "selftest.cu" in result.stderr, (
            what, result.returncode, result.stderr[-3000:])
    clean = run_defect(sanitizer, "no_race")
    assert clean.returncode == 0 and "Sanitizer" not in clean.stderr, clean.stderr[-3000:]


# ---------------------------------------------------------------- the tier covers csrc/cuda


def global_functions():
    names = set()
    for path in list((ROOT / "csrc" / "cuda").glob("*.cu")) + list((ROOT / "csrc" / "cuda").glob("*.cuh")):
        text = path.read_text()
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


def kernel_tour(multiprocessors, monkeypatch):
    """Calls every op and backward op on the emulated GPU: its tile kernels' single-block paths (one
    multiprocessor) and split paths (eight), and the products path of large problems (forced)."""
    gen = torch.Generator().manual_seed(0)
    x = features(70, 12, gen, "cpu", torch.float32)
    bank = features(150, 12, gen, "cpu", torch.float32)
    labels = make_labels("pk", 70, gen)
    modalities = torch.arange(70) % 2
    bank_labels = torch.randint(0, 17, (150,), generator=gen)
    weight = features(11, 12, gen, "cpu", torch.float32)
    for count, products in ((1, False), (8, False), (1, True)):
        multiprocessors(count)
        if products:
            monkeypatch.setenv("REID_EXT_CUDA_PRODUCTS_FROM", "0")
            monkeypatch.setenv("REID_EXT_CUDA_CHUNK_BYTES", str(4 * 150 * 64))
        with cudasim.device():
            losses = [
                reid_ext.cosine_similarity(x, bank).sum(),
                reid_ext.cosine_similarity(x).sum(),
                reid_ext.unified_triplet_loss(x, labels, modalities=modalities, mode="cross"),
                reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels),
                reid_ext.batch_hard_triplet_loss(bank, bank_labels, metric="cosine"),
                reid_ext.modality_centers(x, labels, modalities)[0].sum(),
                reid_ext.hetero_center_triplet_loss(x, labels, modalities, mining="hard"),
                reid_ext.cosine_softmax_loss(x, weight, labels % 11),
            ]
            torch.autograd.grad(sum(losses), [x, bank, weight])
            reid_ext.topk_similarity(x, bank, k=5)  # not differentiable


def test_every_kernel_is_launched(sim, multiprocessors, monkeypatch):
    kernels = global_functions()
    assert len(kernels) >= 20, kernels  # the parse finds them
    sim.reset_launch_counts()
    kernel_tour(multiprocessors, monkeypatch)
    launched = set(sim.launch_counts())
    assert kernels - launched == set(), f"never launched: {sorted(kernels - launched)}"


# ---------------------------------------------------------------- split and single-block paths


def split_cases(gen):
    """(name, fn, inputs) of every op with a split reference range; sizes with 3 column tiles."""
    x = features(70, 12, gen, "cpu", torch.float32)
    bank = features(150, 12, gen, "cpu", torch.float32)
    labels = make_labels("pk", 70, gen)
    modalities = torch.arange(70) % 2
    bank_labels, bank_modalities = torch.randint(0, 17, (150,), generator=gen), torch.randint(0, 2, (150,), generator=gen)
    big = features(150, 12, gen, "cpu", torch.float32)
    return [
        ("unified_self", lambda lib: lib.unified_triplet_loss(big, bank_labels, gamma=8.0, reduction="none"), [big]),
        ("unified_bank", lambda lib: lib.unified_triplet_loss(x, labels, gamma=8.0, modalities=modalities, mode="intra", ref=bank,
                                                               ref_labels=bank_labels, ref_modalities=bank_modalities,
                                                               reduction="none"), [x, bank]),
        ("batch_hard", lambda lib: lib.batch_hard_triplet_loss(big, bank_labels, reduction="none"), [big]),
        ("batch_hard_cosine_soft", lambda lib: lib.batch_hard_triplet_loss(big, bank_labels, metric="cosine",
                                                                            soft_margin=True, reduction="none"), [big]),
    ]


def value_and_grads(fn, lib, inputs):
    out = fn(lib)
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view_as(out)
    return out.detach().double(), [g.double() for g in torch.autograd.grad((out * weight).sum(), inputs)]


@pytest.mark.parametrize("case", range(4), ids=["unified_self", "unified_bank", "batch_hard", "batch_hard_cosine_soft"])
def test_split_and_single_block_paths_match_the_reference(sim, multiprocessors, case):
    name, fn, inputs = split_cases(torch.Generator().manual_seed(case))[case]
    exact = value_and_grads(fn, reference, inputs)  # float32 inputs, as the kernels'; float32 tolerance
    results = {}
    for count in (1, 2, 8):
        multiprocessors(count)
        sim.reset_launch_counts()
        with cudasim.device():
            results[count] = value_and_grads(fn, reid_ext, inputs)
        merged = any("merge" in kernel for kernel in sim.launch_counts())
        assert merged == (count > 1), (name, count, sim.launch_counts())  # the split path is the one taken
        torch.testing.assert_close(results[count][0], exact[0], rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(results[count][1], exact[1]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # the hardest pairs are the same ones whatever the split
    if name.startswith("batch_hard"):
        with cudasim.device():
            picks = []
            for count in (1, 8):
                multiprocessors(count)
                _, pos, neg = reid_ext.batch_hard_triplet_loss(inputs[0], make_labels("pk", 150, torch.Generator()),
                                                               return_indices=True)
                picks.append((pos, neg))
        assert all(torch.equal(a, b) for a, b in zip(*picks))


def test_centers_bitwise_deterministic_across_runs_and_multiprocessor_counts(sim, multiprocessors):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=gen).requires_grad_(True)
    labels = torch.randint(0, 30, (300,), generator=gen)
    modalities = torch.randint(0, 3, (300,), generator=gen)
    runs = []
    for count in (1, 8, 1):
        multiprocessors(count)
        with cudasim.device():
            centers, _, _ = reid_ext.modality_centers(x, labels, modalities)
            (grad,) = torch.autograd.grad((centers * torch.linspace(-1, 1, centers.numel()).view_as(centers)).sum(), x)
        runs.append((centers.detach(), grad))
    for centers, grad in runs[1:]:
        assert torch.equal(centers, runs[0][0]) and torch.equal(grad, runs[0][1])
    expected = reference.modality_centers(x.detach().double(), labels, modalities)[0]
    torch.testing.assert_close(runs[0][0].double(), expected, rtol=1e-5, atol=1e-6)
