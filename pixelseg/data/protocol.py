"""`SplitDataset`: what train, evaluate and folds use of a loaded split, whichever class holds it.

Implemented by `ArrayDataset` (decoded arrays), `FileDataset` (`--cache none`), `ShardDataset` (streamed
WebDataset shards) and `folds.FoldSubset`, so callers ask these attributes instead of testing types.
Splits that are not ``streamed`` also give random access: ``ds[i]``, ``masks`` (the epoch figures) and
``read_sample(i)`` (the sample, or None when its files are unreadable; folds reads its parts so).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .base import DatasetInfo, Transform


@runtime_checkable
class SplitDataset(Protocol):
    info: DatasetInfo
    names: list[str]
    transform: Transform | None  # per-sample (image, mask) -> (image, mask)
    full_res: bool  # samples keep their source sizes: a transform must crop/resize them
    streamed: bool  # batches come from the stream (shards): num_batches(), no random access, no masks
    reads_files: bool  # each sample is read from files when asked for (work for DataLoader workers)

    def __len__(self) -> int: ...

    @property
    def skipped(self) -> list[str]: ...  # unreadable samples met in this process

    def open_skip_channel(self) -> None: ...  # before DataLoader workers start: they report skips through it

    def collect_skipped(self) -> list[str]: ...  # skipped here or in the workers, each once


__all__ = ["SplitDataset"]
