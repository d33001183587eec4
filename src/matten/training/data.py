"""A seeded, resumable order of training samples.

The data are read as an endless stream: epoch e is a permutation of the dataset drawn from
(seed, e); the epochs are concatenated; global batch s is stream positions [s*B, (s+1)*B), split
evenly over the processes (rank r takes the r-th slice). The position after s steps is s*B, so a
resumed run reads exactly the batches an uninterrupted one would, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["StreamSampler", "EpochDataset", "build_loader"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class StreamSampler(Sampler):
    """Yields ``(epoch, index)`` pairs of this process's share of the stream, from global
    position ``start`` on (``start`` must be a multiple of ``global_batch``)."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: int = 0,
    ):
        if num_items < 1:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(
                f"train.batch_size {global_batch} is not divisible by the {world_size} processes"
            )
        if start % global_batch:
            raise ValueError(
                f"stream position {start} is not a multiple of the batch {global_batch}"
            )
        self.n, self.global_batch = int(num_items), int(global_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.seed, self.start = int(seed), int(start)

    def position(self, step: int) -> dict:
        """Where the stream stands after ``step`` steps."""
        pos = int(step) * self.global_batch
        return {"samples_seen": pos, "epoch": pos // self.n, "index_in_epoch": pos % self.n}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        epoch, perm = -1, None
        while True:
            lo = pos + self.rank * self.local_batch
            for p in range(lo, lo + self.local_batch):
                e, i = divmod(p, self.n)
                if e != epoch:
                    epoch, perm = e, epoch_permutation(self.n, self.seed, e)
                yield e, int(perm[i])
            pos += self.global_batch

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


class EpochDataset(Dataset):
    """Takes ``(epoch, index)``: tells datasets with ``set_epoch`` (random clip starts and flips
    seeded per epoch) which epoch the item belongs to, in whichever worker loads it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def build_loader(
    dataset: Dataset, sampler: StreamSampler, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    # The loader gets its own generator: creating its iterator must not draw from the global
    # RNG, or a resumed run would see a different random stream than an uninterrupted one.
    return DataLoader(
        EpochDataset(dataset),
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=torch.Generator().manual_seed(sampler.seed),
        persistent_workers=False,
    )
