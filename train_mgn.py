#!/usr/bin/env python
"""Train MGN (or the UBAT network) for person re-identification with reid-ext's losses.

    python train_mgn.py                      # MGN, synthetic data, CPU preset, CPU: a few minutes
    python train_mgn.py --dataset market1501 --data-root data/Market-1501-v15.09.15 \\
        --preset paper --backbone-weights resnet50-0676ba61.pth
    torchrun --nproc_per_node 4 train_mgn.py --dataset sysu-mm01 --data-root data/SYSU-MM01 \\
        --model ubat --preset paper --global-mining --backbone-weights resnet50-0676ba61.pth

The output directory gets checkpoint.pt (written atomically after every epoch;
``--resume`` continues from it exactly), metrics.jsonl (one JSON object per
evaluation and epoch), curves.png, and results.json = {"initial": {"rank1",
"mAP", "mINP"}, "final": {...}, "train_seconds": ...} with the evaluation
before the first step and after the last one, as fractions in [0, 1]. With
``--rerank`` every evaluation also reports the same metrics after k-reciprocal
re-ranking of the same features, as "rerank": {"rank1", "mAP", "mINP"}.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import reid_ext
from reid_ext import defaults
from reid_ext.data import (
    CrossModalityPKSampler,
    ImageDataset,
    PKSampler,
    ReIDDataset,
    ReIDTransform,
    load_market1501,
    load_regdb,
    load_sysu_mm01,
    make_synthetic,
)
from reid_ext.evaluation import check_re_ranking_options, evaluate_dataset
from reid_ext.models import MODELS, PRESETS, build_model, load_backbone_weights
from reid_ext.recipes import build_recipe
from reid_ext.training import (
    METRIC_KEYS,
    load_checkpoint,
    plot_curves,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
    write_jsonl,
)

DATASETS = ("synthetic", "synthetic-vi", "market1501", "sysu-mm01", "regdb")

# Training defaults of each model preset; every one can be overridden on the command line.
TRAIN_DEFAULTS = {
    # The MGN paper: SGD, lr 1e-2 divided by 10 at epochs 40 and 60 of 80, P = K = 4.
    "paper": dict(
        optimizer="sgd", lr=0.01, weight_decay=5e-4, epochs=80, warmup_epochs=0.0, schedule="step",
        milestones=[40, 60], ids_per_batch=4, instances=4, eval_every=10,
    ),
    # From scratch on two CPU cores: Adam with warm-up and cosine decay, bigger batches.
    "cpu": dict(
        optimizer="adam", lr=6e-3, weight_decay=5e-4, epochs=16, warmup_epochs=1.0, schedule="cosine",
        milestones=[], ids_per_batch=16, instances=4, eval_every=4,
    ),
}
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "rng", "history", "initial", "train_seconds", "args", "recipe")
# Arguments a resumed run may change: how long it trains, how often it evaluates, where its
# files are, how it runs. Every other one shapes the model, the data or the optimisation.
RESUME_MAY_CHANGE = frozenset((
    "epochs", "eval_every", "eval_batch_size", "output_dir", "resume", "eval_only", "threads", "workers", "device",
    "data_root", "backbone_weights", "rerank", "rerank_k1", "rerank_k2", "rerank_lambda",
))
# --eval-only only needs the same network.
EVAL_MUST_MATCH = ("model", "mgn_triplet_on", "preset", "input_size")
PROGRESS_EVERY = 5  # steps between progress-bar updates (each one synchronises with the device)


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in TRAIN_DEFAULTS.items()
    )
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"training defaults of each --preset (every one can be set explicitly):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="synthetic", help="default: synthetic")
    data.add_argument("--data-root", help="dataset folder (not needed for the synthetic datasets)")
    data.add_argument("--sysu-mode", choices=("all", "indoor"), default="all",
                      help="SYSU-MM01 search mode (default: all)")
    data.add_argument("--regdb-trial", type=int, default=1, help="RegDB split, 1..10 (default: 1)")
    data.add_argument("--regdb-query", choices=("visible", "thermal"), default="visible",
                      help="RegDB query modality (default: visible, i.e. visible-to-thermal)")
    data.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic dataset (default: 0)")
    data.add_argument("--synthetic-ids", type=int, nargs=2, default=[200, 100], metavar=("TRAIN", "TEST"),
                      help="identities of the synthetic train and test splits (default: 200 100)")
    data.add_argument("--erasing-p", type=float, default=0.5, help="random erasing probability (default: 0.5; 0: off)")
    data.add_argument("--pad", type=int, help="pixels of padding before the random crop (default: H / 32; 0: off)")
    data.add_argument("--workers", type=int, default=None,
                      help="data loader processes (default: 0 for synthetic data, 4 otherwise)")

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODELS), default="mgn",
                       help="mgn (Wang et al. 2018) or ubat (a shared ResNet-50 with one embedding, Li et al. 2021; "
                            "default: mgn)")
    model.add_argument("--mgn-triplet-on", choices=("reduced", "pooled"),
                       help="mgn: 'reduced' (the paper, the default: triplet on the 3 reduced global features, "
                            "softmax on the 3 pooled ones and the 5 parts) or 'pooled' (a variant: triplet on the 3 "
                            "pooled global features, softmax on all 8 reduced ones)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                       help="model size: 'paper' (ResNet-50, 256-d reductions, 384x128) or 'cpu' (1/8 width, "
                            "64-d reductions, 96x32; the default)")
    model.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="override the preset's input size")
    model.add_argument("--backbone-weights", help="local torchvision ResNet-50 state dict (e.g. ImageNet weights)")

    train = p.add_argument_group("training (unset values come from the --preset's defaults, listed below)")
    train.add_argument("--recipe", choices=("mgn", "ubat"), help="loss recipe (default: the --model's name)")
    train.add_argument("--margin", type=float,
                       help=f"triplet margin (default: {defaults.MGN_TRIPLET_MARGIN} for mgn's batch-hard loss, "
                            f"{defaults.UNIFIED_MARGIN} for ubat's unified loss)")
    train.add_argument("--cos-scale", type=float, default=defaults.UBAT_COS_SCALE,
                       help="ubat: cosine-softmax scale (default: %(default)s)")
    train.add_argument("--cos-margin", type=float, default=defaults.UBAT_COS_MARGIN,
                       help="ubat: cosine-softmax margin (default: %(default)s)")
    train.add_argument("--optimizer", choices=("sgd", "adam"))
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0.1 x lr")
    train.add_argument("--schedule", choices=("step", "cosine"))
    train.add_argument("--milestones", type=int, nargs="*", help="epochs where a step schedule multiplies lr by --lr-gamma")
    train.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule factor (default: 0.1)")
    train.add_argument("--ids-per-batch", type=int, help="P identities per batch")
    train.add_argument("--instances", type=int, help="K images per identity (per modality for two-modality data)")
    train.add_argument("--global-mining", action="store_true",
                       help="with DDP, mine triplets over the batches of all ranks")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="bfloat16 autocast (CUDA only; default: on)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling, augmentation (default: 0)")

    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="default auto: CUDA if available, except for the cpu preset")
    run.add_argument("--threads", type=int,
                     help="CPU threads for intra-op parallelism (default: half the cores, at most torch's default; "
                          "OpenMP slows down badly when its threads compete with other processes for cores)")
    run.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always after the last)")
    run.add_argument("--eval-batch-size", type=int, default=256, help="default: 256")
    run.add_argument("--rerank", action="store_true",
                     help="also evaluate with k-reciprocal re-ranking (Zhong et al. 2017) of the same features")
    run.add_argument("--rerank-k1", type=int, help=f"re-ranking's k1 (default: {defaults.RERANK_K1}; needs --rerank)")
    run.add_argument("--rerank-k2", type=int, help=f"re-ranking's k2 (default: {defaults.RERANK_K2}; needs --rerank)")
    run.add_argument("--rerank-lambda", type=float, help=f"re-ranking's lambda (default: {defaults.RERANK_LAMBDA}; needs --rerank)")
    run.add_argument("--output-dir", help="default: runs/mgn-<dataset>")
    run.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                     help="continue from CHECKPOINT (default: <output-dir>/checkpoint.pt)")
    run.add_argument("--eval-only", action="store_true",
                     help="only evaluate the --resume checkpoint (e.g. SYSU-MM01 indoor-search after "
                          "all-search training) and write <output-dir>/evaluation.json")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments, with every unset one given its default (the --preset's, the model's) and checked."""
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.input_size is None:
        args.input_size = list(PRESETS[args.preset].input_size)
    if args.recipe is None:
        args.recipe = MODELS[args.model][1]
    if args.model == "mgn" and args.mgn_triplet_on is None:
        args.mgn_triplet_on = "reduced"
    elif args.model != "mgn" and args.mgn_triplet_on is not None:
        p.error(f"--mgn-triplet-on is an option of --model mgn, not of --model {args.model}")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.model}-{args.dataset}")
    if args.margin is None:
        args.margin = defaults.MGN_TRIPLET_MARGIN if args.recipe == "mgn" else defaults.UNIFIED_MARGIN
    if args.threads is None:
        args.threads = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // 2))
    if args.workers is None:
        args.workers = 0 if args.dataset.startswith("synthetic") else 4
    if args.dataset not in ("synthetic", "synthetic-vi") and not args.data_root:
        p.error(f"--data-root is required for --dataset {args.dataset}")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.eval_every < 1:
        p.error(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.eval_only and args.resume is None:
        p.error("--eval-only needs --resume [CHECKPOINT]")
    rerank_defaults = (("rerank_k1", defaults.RERANK_K1), ("rerank_k2", defaults.RERANK_K2),
                       ("rerank_lambda", defaults.RERANK_LAMBDA))
    for key, default in rerank_defaults:
        if getattr(args, key) is not None and not args.rerank:
            p.error(f"{_flag(key)} is an option of --rerank")
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.rerank:
        try:
            check_re_ranking_options(args.rerank_k1, args.rerank_k2, args.rerank_lambda)
        except ValueError as err:
            p.error(f"--rerank: {err}")
    return args


# --------------------------------------------------------------------------- distributed


def init_distributed(args):
    """(rank, world_size, device); torchrun's environment starts a process group (nccl / gloo)."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and args.preset != "cpu" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), world_size, device


# --------------------------------------------------------------------------- data


def load_dataset(args) -> ReIDDataset:
    if args.dataset in ("synthetic", "synthetic-vi"):
        train_ids, test_ids = args.synthetic_ids
        return make_synthetic(
            args.synthetic_seed, num_train_ids=train_ids, num_test_ids=test_ids,
            infrared=args.dataset == "synthetic-vi",
        )
    if args.dataset == "market1501":
        return load_market1501(args.data_root)
    if args.dataset == "sysu-mm01":
        return load_sysu_mm01(args.data_root, mode=args.sysu_mode)
    return load_regdb(args.data_root, trial=args.regdb_trial, query=args.regdb_query)


def make_loaders(args, data: ReIDDataset, rank: int, world_size: int, device: torch.device):
    size = tuple(args.input_size)
    two_modalities = data.num_modalities == 2
    augment = ReIDTransform(size, train=True, pad=args.pad, erasing_p=args.erasing_p)
    if two_modalities:
        # Random grayscale (p = 0.5) of visible images, so that colour cannot be all that
        # identifies a person; infrared images are grey already.
        augment = {0: ReIDTransform(size, train=True, pad=args.pad, erasing_p=args.erasing_p, grayscale_p=0.5),
                   1: augment}
    train_set = ImageDataset(data.train, augment, data.images)
    labels = [s.pid for s in data.train]
    if two_modalities:
        sampler = CrossModalityPKSampler(
            labels, [s.modality for s in data.train], args.ids_per_batch, args.instances,
            seed=args.seed, rank=rank, world_size=world_size,
        )
    else:
        sampler = PKSampler(
            labels, args.ids_per_batch, args.instances, seed=args.seed, rank=rank, world_size=world_size
        )
    pin = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=args.workers, pin_memory=pin
    )
    test_transform = ReIDTransform(size, train=False)
    query_loader, gallery_loader = (
        torch.utils.data.DataLoader(
            ImageDataset(samples, test_transform, data.images), batch_size=args.eval_batch_size,
            num_workers=args.workers, pin_memory=pin,
        )
        for samples in (data.query, data.gallery)
    )
    return train_loader, query_loader, gallery_loader


# --------------------------------------------------------------------------- model and recipe


class Trainee(torch.nn.Module):
    """The network and its loss recipe (which owns the classifiers) as one module, so that DDP
    averages the gradients of both. forward(images, labels, modalities, gather) -> (loss, parts)."""

    def __init__(self, model: torch.nn.Module, recipe: torch.nn.Module, amp_dtype: Optional[torch.dtype]):
        super().__init__()
        self.model, self.recipe, self.amp_dtype = model, recipe, amp_dtype

    def forward(self, images, labels, modalities, gather):
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = self.model(images)
        return self.recipe(output, labels, modalities, gather)  # the losses run in float32


def build_trainee(args, num_classes: int, device: torch.device, log) -> Trainee:
    """The model of --model with the loss recipe of --recipe, on ``device``."""
    options = {"triplet_on": args.mgn_triplet_on} if args.model == "mgn" else {}
    model = build_model(args.model, args.preset, **options)
    if args.recipe == "mgn":
        recipe = build_recipe("mgn", num_classes, model.id_feature_dims, margin=args.margin)
    else:
        recipe = build_recipe("ubat", num_classes, model.id_feature_dims, scale=args.cos_scale,
                              cos_margin=args.cos_margin, margin=args.margin)
    if args.backbone_weights and args.resume is None:  # a resumed model gets its weights from the checkpoint
        load_backbone_weights(model, args.backbone_weights)
        log(f"loaded backbone weights from {args.backbone_weights}")
    amp_dtype = torch.bfloat16 if args.amp and device.type == "cuda" else None
    return Trainee(model.to(device, memory_format=torch.channels_last), recipe.to(device), amp_dtype)


# --------------------------------------------------------------------------- optimisation


def build_optimizer(args, module: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on batch-norm parameters (1-D tensors), as is usual.
    decay = [p for p in module.parameters() if p.dim() > 1]
    no_decay = [p for p in module.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    return torch.optim.Adam(groups, lr=args.lr)


def lr_factor(args, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` epochs (fractional): warm-up, then step or cosine."""
    if progress < args.warmup_epochs:
        return 0.1 + 0.9 * progress / args.warmup_epochs
    if args.schedule == "step":
        return args.lr_gamma ** sum(progress >= m for m in args.milestones)
    span = max(args.epochs - args.warmup_epochs, 1e-8)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - args.warmup_epochs) / span, 1.0)))


def train_epoch(args, epoch: int, trainee, optimizer, loader, device, two_modalities: bool, gather, world_size: int,
                show_progress: bool) -> Dict[str, object]:
    """One epoch of steps; its history record (the mean loss and its parts, lr, speed)."""
    trainee.train()
    loader.batch_sampler.set_epoch(epoch)
    steps = len(loader)
    sums: Dict[str, torch.Tensor] = {}
    images_seen = 0
    t_epoch = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show_progress,
               leave=True, dynamic_ncols=True, file=sys.stdout)
    for i, (images, labels, _, modalities) in enumerate(bar):
        factor = lr_factor(args, epoch + i / steps)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        modalities = modalities.to(device, non_blocking=True) if two_modalities else None
        loss, parts = trainee(images, labels, modalities, gather)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images_seen += images.size(0) * world_size
        # Running sums stay on the device: no host synchronisation but for the progress bar.
        for key, value in (("loss", loss.detach()), *((f"loss_{k}", v) for k, v in parts.items())):
            sums[key] = sums[key] + value if key in sums else value
        if i % PROGRESS_EVERY == 0 or i + 1 == steps:
            rate = images_seen / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}", lr=f"{args.lr * factor:.2e}")
    bar.close()
    epoch_seconds = time.perf_counter() - t_epoch
    record = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "lr": args.lr * factor}
    record.update({k: v.item() / steps for k, v in sums.items()})
    record.update({"images_per_second": images_seen / epoch_seconds, "epoch_seconds": epoch_seconds})
    return record


# --------------------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    """What an evaluation needs: the test loaders, the protocol, where and how the model runs, and
    the re-ranking options (None: no re-ranking)."""

    query_loader: torch.utils.data.DataLoader
    gallery_loader: torch.utils.data.DataLoader
    protocol: str
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    rerank: Optional[Dict[str, float]]


def evaluate(model, ev: Evaluation) -> Dict[str, object]:
    """The METRIC_KEYS of an evaluation and, with re-ranking, "rerank": the same after re-ranking."""
    options = {"rerank": True, **ev.rerank} if ev.rerank is not None else {}
    result = evaluate_dataset(model, ev.query_loader, ev.gallery_loader, ev.protocol, ev.device,
                              amp_dtype=ev.amp_dtype, **options)
    return metrics_of(result)


def metrics_of(record: Dict[str, object]) -> Dict[str, object]:
    """The METRIC_KEYS of an evaluation or history record, and its "rerank" ones where it has them."""
    metrics = {k: record[k] for k in METRIC_KEYS}
    if "rerank" in record:
        metrics["rerank"] = {k: record["rerank"][k] for k in METRIC_KEYS}
    return metrics


def describe(metrics: Dict[str, object]) -> str:
    text = "  ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS if k in metrics)
    if "rerank" in metrics:
        text += "  re-ranked: " + "  ".join(f"{k} {metrics['rerank'][k]:.4f}" for k in METRIC_KEYS)
    return text


# --------------------------------------------------------------------------- checkpoints


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resume_state(args, ckpt_path: str, log) -> Optional[Dict[str, object]]:
    """The checkpoint to resume from (None without --resume), refused at once if it does not fit."""
    if args.resume is None:
        return None
    path = args.resume or ckpt_path
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    try:
        state = load_checkpoint(path, CHECKPOINT_KEYS)
    except ValueError as err:
        raise SystemExit(f"--resume: {err}") from None
    check_resume_args(args, state["args"], state["epoch"], log)
    log(f"resuming from {path} after epoch {state['epoch']}")
    return state


def check_resume_args(args, saved: Dict[str, object], start_epoch: int, log) -> None:
    """Refuses a checkpoint written with other arguments (naming them), or with nothing left to train."""
    new = vars(args)
    keys = EVAL_MUST_MATCH if args.eval_only else sorted((set(saved) | set(new)) - RESUME_MAY_CHANGE)
    differ = [f"{_flag(k)} {saved.get(k)!r} (now {new.get(k)!r})" for k in keys if saved.get(k) != new.get(k)]
    if differ:
        raise SystemExit(
            f"--resume: the checkpoint was written with other arguments: {', '.join(differ)}; resume with the "
            "checkpoint's values, or train into a new --output-dir"
        )
    if args.eval_only:
        return
    if args.epochs <= start_epoch:
        raise SystemExit(
            f"--resume: nothing to train: the checkpoint is after epoch {start_epoch} and --epochs is {args.epochs}; "
            "raise --epochs to train on, or evaluate it with --eval-only"
        )
    if args.epochs != saved.get("epochs"):
        log(f"--epochs {args.epochs} differs from the checkpoint's {saved.get('epochs')}: training continues to "
            f"epoch {args.epochs}, and the learning-rate schedule now spans {args.epochs} epochs")


def restore(state: Dict[str, object], trainee: Trainee, optimizer, rank: int, world_size: int, log) -> None:
    """The weights, optimizer state and this rank's RNG state of a checkpoint."""
    for name, module in (("model", trainee.model), ("recipe", trainee.recipe)):
        try:
            module.load_state_dict(state[name])
        except RuntimeError as err:
            raise SystemExit(f"--resume: the checkpoint's {name} does not fit this one ({err})") from None
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    else:
        log(f"checkpoint has RNG states of {len(state['rng'])} ranks, not {world_size}: augmentations will differ")


def gathered_rng_states(world_size: int) -> List[Dict[str, object]]:
    """Every rank's RNG state (an exact resume needs them all)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


# --------------------------------------------------------------------------- the run


def train(args) -> Optional[Dict[str, object]]:
    """Run the training of ``args``; returns the results dict on rank 0 (None on other ranks)."""
    rank, world_size, device = init_distributed(args)
    is_main = rank == 0
    torch.set_num_threads(args.threads)
    log = tqdm.write if is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    log_path = os.path.join(args.output_dir, "metrics.jsonl")
    state = resume_state(args, ckpt_path, log)  # before anything slow

    # Data.
    t0 = time.perf_counter()
    data = load_dataset(args)
    log(f"{data.summary()}\n  ({time.perf_counter() - t0:.1f} s to load)")
    two_modalities = data.num_modalities == 2
    train_loader, query_loader, gallery_loader = make_loaders(args, data, rank, world_size, device)

    # Model and recipe.
    trainee = build_trainee(args, data.num_train_pids, device, log)
    optimizer = build_optimizer(args, trainee)
    step = trainee
    if world_size > 1:
        step = torch.nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None
        )
    # The metric losses then mine over the global batch; their gradients reach
    # each rank's own rows (reid_ext.gather_batch's backward), DDP averages the rest.
    gather = reid_ext.gather_batch if args.global_mining and world_size > 1 else None
    rerank = dict(k1=args.rerank_k1, k2=args.rerank_k2, lambda_value=args.rerank_lambda) if args.rerank else None
    ev = Evaluation(query_loader, gallery_loader, data.protocol, device, trainee.amp_dtype, rerank)
    torch.manual_seed(args.seed + rank)  # augmentations differ between ranks

    # The starting point: a checkpoint's, or the initial evaluation.
    start_epoch, history, initial, train_seconds = 0, [], None, 0.0
    if state is not None:
        restore(state, trainee, optimizer, rank, world_size, log)
        start_epoch, history, initial = state["epoch"], state["history"], state["initial"]
        train_seconds = state["train_seconds"]
        if args.eval_only:
            return evaluate_only(args, trainee.model, ev, data, is_main, world_size)
    elif is_main:
        initial = evaluate(trainee.model, ev)
        history.append({"epoch": 0, **initial})
        log("initial: " + describe(initial))
    if is_main:
        write_jsonl(log_path, history)
    if world_size > 1:
        dist.barrier()

    # The loop: train an epoch, evaluate when due, checkpoint.
    for epoch in range(start_epoch, args.epochs):
        record = train_epoch(args, epoch, step, optimizer, train_loader, device, two_modalities, gather, world_size,
                             is_main)
        train_seconds += record["epoch_seconds"]
        if is_main and (epoch + 1 == args.epochs or (epoch + 1) % args.eval_every == 0):
            record.update(evaluate(trainee.model, ev))
        log(f"epoch {epoch + 1}: loss {record['loss']:.4f}  " + describe(record))
        history.append(record)
        rng = gathered_rng_states(world_size)
        if is_main:
            write_jsonl(log_path, history)
            plot_curves(os.path.join(args.output_dir, "curves.png"), history)
            save_checkpoint(ckpt_path, {
                "epoch": epoch + 1, "model": trainee.model.state_dict(), "recipe": trainee.recipe.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng, "history": history, "initial": initial,
                "train_seconds": train_seconds, "args": vars(args),
            })
        if world_size > 1:
            dist.barrier()

    results = None
    if is_main:
        results = {
            "initial": metrics_of(initial),
            "final": metrics_of(history[-1]),  # the last epoch is always evaluated
            "train_seconds": train_seconds,
        }
        write_json(os.path.join(args.output_dir, "results.json"), results)
        log(f"results: {json.dumps(results)}  ({args.output_dir})")
    if world_size > 1:
        dist.destroy_process_group()
    return results


def evaluate_only(args, model, ev: Evaluation, data: ReIDDataset, is_main: bool, world_size: int):
    """--eval-only: metrics of the loaded model on ``data``'s protocol, written to evaluation.json."""
    results = None
    if is_main:
        results = {"dataset": data.name, "protocol": data.protocol, **evaluate(model, ev)}
        write_json(os.path.join(args.output_dir, "evaluation.json"), results)
        tqdm.write(json.dumps(results))
    if world_size > 1:
        dist.destroy_process_group()
    return results


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, object]]:
    """Command-line entry point; returns the results dict on rank 0 (None on other ranks)."""
    t0 = time.perf_counter()
    results = train(parse_args(argv))
    if results is not None:
        print(f"total {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
