"""Cross-batch memory: a ring buffer of past embeddings that the losses mine against.

Wang et al., "Cross-Batch Memory for Embedding Learning" (CVPR 2020): embeddings
drift slowly once training has warmed up, so the detached embeddings of the last
few thousand samples are good references for the current batch, far more than
one batch holds, at the cost of a copy per step.
"""
import operator
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn


__all__ = ["CrossBatchMemory"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class CrossBatchMemory(nn.Module):
    """A ring buffer of the last ``size`` embeddings with their labels (and modalities).

    Enqueued rows are detached copies; once ``size`` rows are in, each new batch
    overwrites the oldest. The write position is kept on the host and advanced by
    batch shapes alone, so ``enqueue`` never waits for the device. The buffers move
    with ``.to()`` and are saved in ``state_dict`` together with the position.

    Its contents are the reference bank (``ref``, ``ref_labels``, ``ref_modalities``)
    of unified_triplet_loss; ``as_reference()`` returns them as keyword arguments.

    Args:
        size (int): capacity, in rows (>= 1).
        dim (int): embedding dimension D (>= 1).
        dtype (torch.dtype): floating dtype of the stored embeddings; enqueued embeddings must
            have it (the loss needs the batch's dtype for its reference).
        device: where the buffers live; enqueued tensors must be there.
        with_modalities (bool): also store an integer modality per row.

    Example:
        >>> memory = CrossBatchMemory(size=4096, dim=2048, device="cuda")
        >>> for images, labels in loader:
        ...     emb = model(images)
        ...     loss = reid_ext.unified_triplet_loss(emb, labels)                 # within the batch
        ...     loss = loss + reid_ext.unified_triplet_loss(emb, labels, **memory.as_reference())
        ...     loss.backward()
        ...     memory.enqueue(emb, labels)        # after the loss: a batch is not its own reference
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 with_modalities: bool = False):
        super().__init__()
        size, dim = _positive_int("size", size), _positive_int("dim", dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
        try:
            device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda:0'), got {device!r}: {err}") from None
        self.size, self.dim, self.with_modalities = size, dim, with_modalities
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("bank_labels", torch.zeros(size, dtype=torch.long, device=device))
        self.register_buffer(
            "bank_modalities", torch.zeros(size, dtype=torch.long, device=device) if with_modalities else None
        )
        self._next = 0  # row the next enqueue writes first
        self._filled = 0  # rows in use: bank[:_filled]

    def __len__(self) -> int:
        return self._filled

    @property
    def embeddings(self) -> Tensor:
        """Tensor[M, D], M = len(self): the stored embeddings (a view, no copy)."""
        return self.bank[: self._filled]

    @property
    def labels(self) -> Tensor:
        """Tensor[M]: their labels (int64)."""
        return self.bank_labels[: self._filled]

    @property
    def modalities(self) -> Optional[Tensor]:
        """Tensor[M] of modalities (int64), or None unless with_modalities."""
        return None if self.bank_modalities is None else self.bank_modalities[: self._filled]

    def as_reference(self) -> Dict[str, Optional[Tensor]]:
        """The contents as the ref, ref_labels and ref_modalities arguments of unified_triplet_loss."""
        return {"ref": self.embeddings, "ref_labels": self.labels, "ref_modalities": self.modalities}

    @torch.no_grad()
    def enqueue(self, x: Tensor, labels: Tensor, modalities: Optional[Tensor] = None) -> None:
        """Stores detached copies of x (Tensor[B, D]) with labels (Tensor[B]) and modalities.

        A batch larger than the memory keeps its last ``size`` rows. No host synchronisation.
        """
        # What the losses accept as an anchor batch, with the errors they give.
        torch.ops.reid_ext._check_unified_triplet_loss.default(x, labels, modalities, None, None, None, 1.0, 0.0,
                                                               "all", "none")
        if x.size(1) != self.dim:
            raise ValueError(f"x has D={x.size(1)} but the memory stores D={self.dim}")
        if x.device != self.bank.device:
            raise ValueError(f"x is on {x.device} but the memory is on {self.bank.device}")
        if x.dtype != self.bank.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the memory stores {self.bank.dtype}: convert x, or make the memory "
                f"with dtype={x.dtype}"
            )
        if self.with_modalities:
            if modalities is None:
                raise ValueError("modalities is required: the memory was made with with_modalities=True")
        elif modalities is not None:
            raise ValueError("modalities was given but the memory was made with with_modalities=False")
        rows = [(self.bank, x), (self.bank_labels, labels)]
        if self.with_modalities:
            rows.append((self.bank_modalities, modalities))
        b = min(x.size(0), self.size)
        first = min(b, self.size - self._next)  # rows up to the end of the buffer, the rest wraps to its start
        for buffer, values in rows:
            if values.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                values = values.clone()  # a view of the memory itself (re-enqueueing its contents)
            values = values[values.size(0) - b:]
            buffer[self._next: self._next + first].copy_(values[:first])
            buffer[: b - first].copy_(values[first:])
        self._next = (self._next + b) % self.size
        self._filled = min(self._filled + b, self.size)

    def reset(self) -> None:
        """Empties the memory (the buffers keep their storage)."""
        self._next = 0
        self._filled = 0

    def get_extra_state(self) -> Dict[str, Any]:
        return {"next": self._next, "filled": self._filled}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._next, self._filled = int(state["next"]), int(state["filled"])

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, dtype={self.bank.dtype}, filled={self._filled}, "
                f"with_modalities={self.with_modalities}")
