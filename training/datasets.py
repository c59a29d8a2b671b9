"""Torch datasets over working-size images, and a stateless, resumable, shardable batch sampler.

Augmentation (random crop + horizontal/vertical flips) is drawn from a per-sample seed that the
sampler derives from (run seed, step, slot). The data stream is therefore a pure function of the
step counter: resuming at step N reproduces the exact batches of an uninterrupted run, with or
without DataLoader workers, and every DDP rank reads its own slice of the same global order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from training.prepare import WorkingCache, pseudo_mask_path, read_mask
from training.sources import ImageRecord


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and machines)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for each step in [start_step, total_steps), this rank's list of (index, sample seed).

    The global stream is an endless concatenation of seeded permutations of ``range(n_items)``;
    step ``t`` takes items ``[t·B·W, (t+1)·B·W)`` and rank ``r`` the ``r``-th block of ``B``.

    Args:
        n_items: dataset length (> 0).
        batch_size: per-rank batch size B.
        seed: stream seed.
        total_steps: last step (exclusive).
        start_step: first step (the resume position).
        rank, world_size: DDP shard.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n_items <= 0:
            raise ValueError("the dataset is empty")
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {
                epoch: np.random.default_rng(derive_seed(self.seed, "epoch", epoch)).permutation(self.n_items)
            }
        return self._perm_cache[epoch]

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """This rank's (index, sample seed) list at ``step``."""
        first = (step * self.world_size + self.rank) * self.batch_size
        out = []
        for k in range(first, first + self.batch_size):
            epoch, pos = divmod(k, self.n_items)
            out.append((int(self._perm(epoch)[pos]), derive_seed(self.seed, "sample", k)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch_at(step)

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)


@dataclass
class Augment:
    """One augmentation draw: crop corner (y, x) and flips."""

    y: int
    x: int
    hflip: bool
    vflip: bool

    @classmethod
    def draw(cls, seed: int, size: int, crop: int, flips: bool = True) -> Augment:
        rng = np.random.default_rng(seed)
        # Flips first: the same seed flips alike whatever the crop size.
        hflip, vflip = (bool(v) for v in rng.integers(0, 2, size=2))
        span = size - crop if crop else 0
        y, x = (int(v) for v in rng.integers(0, span + 1, size=2))
        return cls(y, x, hflip and flips, vflip and flips)


def _flip(array: np.ndarray, aug: Augment) -> np.ndarray:
    if aug.hflip:
        array = array[:, ::-1]
    if aug.vflip:
        array = array[::-1]
    return array


def _to_tensor(array: np.ndarray, image: bool) -> torch.Tensor:
    """uint8 (H, W, 3) → (3, H, W) uint8, or (H, W) → (1, H, W) uint8."""
    data = np.ascontiguousarray(array)
    tensor = torch.from_numpy(data)
    return tensor.permute(2, 0, 1).contiguous() if image else tensor[None]


def crop_batch(tensor: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Crop (B, C, S, S) to (B, C, size, size) at per-sample corners (B, 2) = (y, x)."""
    if size <= 0 or size == tensor.shape[-1]:
        return tensor
    crops = [
        tensor[i, :, int(y) : int(y) + size, int(x) : int(x) + size]
        for i, (y, x) in enumerate(corners.tolist())
    ]
    return torch.stack(crops)


class WorkingDataset(Dataset):
    """Working-size samples with joint flips and (optionally) a joint crop.

    ``__getitem__((index, seed))`` returns a dict of uint8 tensors:
        ``image`` (3, s, s); ``fov`` (1, s, s) {0,1}; ``vessel`` (1, s, s) {0,1};
        ``has_vessel`` () float 0/1; ``corner`` (2,) int64 (y, x) of the crop still to apply
        when ``crop_here`` is False (then s = S).

    Args:
        records: images to serve.
        cache: working-size cache.
        crop_size: crop side (0 = whole image).
        crop_here: crop in the dataset (True) or return the whole image plus the corner.
        pseudo_dir: folder of pseudo-masks for records without a manual mask (None = none).
        with_vessels: load masks at all.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        cache: WorkingCache,
        crop_size: int,
        *,
        crop_here: bool = True,
        pseudo_dir: str | Path | None = None,
        with_vessels: bool = True,
    ) -> None:
        self.records = records
        self.cache = cache
        self.crop_size = crop_size
        self.crop_here = crop_here
        self.pseudo_dir = Path(pseudo_dir) if pseudo_dir else None
        self.with_vessels = with_vessels

    def __len__(self) -> int:
        return len(self.records)

    def _vessel(self, record: ImageRecord, manual: np.ndarray | None) -> np.ndarray | None:
        if not self.with_vessels:
            return None
        if manual is not None:
            return manual
        if self.pseudo_dir is not None:
            path = pseudo_mask_path(self.pseudo_dir, record)
            if path.is_file():
                return read_mask(path)
        return None

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        record = self.records[index]
        sample = self.cache.load(record)
        size = sample.image.shape[0]
        aug = Augment.draw(seed, size, self.crop_size)
        vessel = self._vessel(record, sample.vessel)
        has_vessel = vessel is not None
        if vessel is None:
            vessel = np.zeros_like(sample.fov)
        arrays = {"image": sample.image, "fov": sample.fov, "vessel": vessel}
        arrays = {k: _flip(v, aug) for k, v in arrays.items()}
        if self.crop_here and self.crop_size:
            c = self.crop_size
            arrays = {k: v[aug.y : aug.y + c, aug.x : aug.x + c] for k, v in arrays.items()}
        out = {k: _to_tensor(v, k == "image") for k, v in arrays.items()}
        out["has_vessel"] = torch.tensor(float(has_vessel))
        out["corner"] = torch.tensor([aug.y, aug.x], dtype=torch.int64)
        return out


def to_float(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to ``device``: images to float [0, 1], masks to float {0, 1}."""
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if key == "image":
            value = value.float() / 255.0
        elif key in ("fov", "vessel"):
            value = value.float()
        out[key] = value
    return out
