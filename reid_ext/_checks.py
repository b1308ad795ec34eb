"""Argument checks shared by the fused ops and the plain-PyTorch references.

Every public function validates its input here first, so the fused path and
the reference raise the same error, naming the argument and what was expected.
"""
import torch

MODES = ("all", "cross", "intra")
REDUCTIONS = ("mean", "sum", "none")
METRICS = ("euclidean", "sqeuclidean", "cosine")

# Whose kernels a tensor's op runs: its device's, unless tools/cudasim runs the CUDA kernels on
# CPU tensors (reid_ext.ops._calling sets this to "cuda" then).
KERNEL_DEVICE = None


def kernel_device(t: torch.Tensor) -> str:
    return KERNEL_DEVICE or t.device.type


_FLOAT_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _float_dtypes(t: torch.Tensor):
    # With the emulated CUDA kernels, CPU tensors may be of either device's dtypes: the
    # references compute in any of them, and the kernels' own checks reject float64.
    if KERNEL_DEVICE == "cuda" and t.device.type == "cpu":
        return _FLOAT_DTYPES["cpu"] + _FLOAT_DTYPES["cuda"][1:]
    return _FLOAT_DTYPES.get(t.device.type, _FLOAT_DTYPES["cpu"])


def check_features(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor[N, D], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D Tensor[N, D], got shape {tuple(t.shape)}")
    if t.size(1) == 0:
        raise ValueError(f"{name} must have a non-empty feature dimension D, got shape {tuple(t.shape)}")
    allowed = _float_dtypes(t)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be one of {names} on {t.device.type}, got {t.dtype}")


def check_index(name: str, t, n: int, like: torch.Tensor, n_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer Tensor[N], got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer Tensor[N], got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries but {n_name} has {n} rows")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {n_name} is on {like.device}")


def check_same(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}")
    if t.size(1) != like.size(1):
        raise ValueError(f"{name} has D={t.size(1)} but {like_name} has D={like.size(1)}")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def check_cosine_similarity(x, y, eps) -> None:
    check_features("x", x)
    if y is not None:
        check_features("y", y)
        check_same("y", y, x, "x")
    check_eps(eps)


def check_unified(x, labels, gamma, modalities, mode, ref, ref_labels, ref_modalities, reduction) -> None:
    check_features("x", x)
    check_index("labels", labels, x.size(0), x, "x")
    check_positive("gamma", gamma)
    check_choice("mode", mode, MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    if modalities is not None:
        check_index("modalities", modalities, x.size(0), x, "x")
    elif mode != "all":
        raise ValueError(f"modalities is required when mode={mode!r}")
    if ref is None:
        for name, t in (("ref_labels", ref_labels), ("ref_modalities", ref_modalities)):
            if t is not None:
                raise ValueError(f"{name} was given without ref")
        return
    check_features("ref", ref)
    check_same("ref", ref, x, "x")
    if ref_labels is None:
        raise ValueError("ref_labels is required when ref is given")
    check_index("ref_labels", ref_labels, ref.size(0), ref, "ref")
    if mode != "all":
        if ref_modalities is None:
            raise ValueError(f"ref_modalities is required when ref is given and mode={mode!r}")
    if ref_modalities is not None:
        check_index("ref_modalities", ref_modalities, ref.size(0), ref, "ref")


def check_batch_hard(x, labels, margin, metric, reduction) -> None:
    check_features("x", x)
    check_index("labels", labels, x.size(0), x, "x")
    check_choice("metric", metric, METRICS)
    check_choice("reduction", reduction, REDUCTIONS)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def check_centers(x, labels, modalities) -> None:
    check_features("x", x)
    check_index("labels", labels, x.size(0), x, "x")
    if modalities is None:
        raise ValueError("modalities is required")
    check_index("modalities", modalities, x.size(0), x, "x")


def check_cosine_softmax(x, weight, labels, scale, label_smoothing, reduction) -> None:
    check_features("x", x)
    check_features("weight", weight)
    check_same("weight", weight, x, "x")
    check_index("labels", labels, x.size(0), x, "x")
    check_positive("scale", scale)
    check_choice("reduction", reduction, REDUCTIONS)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def mode_id(mode: str) -> int:
    return MODES.index(mode)


def metric_id(metric: str) -> int:
    return METRICS.index(metric)


def reduce_loss(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over anchors, or that sum over max(#valid, 1); no host synchronisation."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)
