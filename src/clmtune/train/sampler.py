"""The data order of training: ``EpochSampler`` (a pure function of seed and epoch, so a resumed run sees the same
batches) and the collator that also reports which rows each process saw."""

from __future__ import annotations

import torch

from clmtune.tasks.encoding import collate
from clmtune.tasks.examples import IGNORE_INDEX


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order of ``n`` rows that is a pure function of (seed, epoch), optionally without its first rows.

    With ``lengths`` the order is length-grouped (``train.group_by_length``): rows are shuffled, cut into groups
    of ``mega_batches`` batches, each group sorted by length (stable sort, so ties keep their random order) and
    cut into batches, and the full batches are shuffled; the batch holding the longest row goes first (an
    out-of-memory error shows on step 1, not at the end of the epoch) and a partial batch, if any, last, so that
    the DataLoader's consecutive ``batch_size`` chunks are exactly these batches. The same idea as transformers'
    ``LengthGroupedSampler``; hand-written because that one keeps the groups in order and draws from a generator
    whose state depends on the past (resuming needs a pure function of the epoch).

    Hand-written on purpose: ``RandomSampler`` draws each epoch's order from a generator whose state depends on
    everything drawn before, so a resumed run would have to replay it; here ``set_epoch`` alone restores it.
    Skipping is done here too, not with ``accelerate``'s ``skip_first_batches``: that builds a new DataLoader
    whose per-epoch base seed is drawn from the *global* RNG, which shifts every later dropout mask.
    ``accelerate`` shards the batches of this sampler across processes (DDP).
    """

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 mega_batches: int = 50):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self.lengths, self.batch_size, self.mega_batches = lengths, batch_size, mega_batches

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoaderShard at every ``iter()`` with its own epoch counter."""
        self.epoch = epoch

    def skip_rows(self, skip: int) -> None:
        """Leave out the current epoch's first ``skip`` rows (already trained on). Set it per epoch."""
        self.skip = skip

    def __len__(self) -> int:
        return self.n - self.skip

    def order(self) -> list[int]:
        """The whole epoch's row order (before skipping)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None or self.batch_size <= 1:
            return perm
        b, group = self.batch_size, self.batch_size * self.mega_batches
        batches = []
        for start in range(0, self.n, group):  # every group but the last is a whole number of batches
            rows = sorted(perm[start:start + group], key=lambda i: -self.lengths[i])
            batches += [rows[k:k + b] for k in range(0, len(rows), b)]
        partial = [x for x in batches if len(x) < b]  # at most one: the end of the last group
        full = [x for x in batches if len(x) == b]
        full = [full[k] for k in torch.randperm(len(full), generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda k: max(self.lengths[i] for i in full[k]))
            full[0], full[longest] = full[longest], full[0]
        return [i for batch in full + partial for i in batch]

    def __iter__(self):
        return iter(self.order()[self.skip:])


class RowCollator:
    """``data.collate`` plus the rows' indices (``rows``: a list), so we can report which rows each process saw.
    ``padding_free``: the rows packed into one row without padding (``clmtune.train.speed.pack_rows``)."""

    def __init__(self, pad_id: int, length: int | None, pad_to_multiple_of: int | None = None,
                 padding_free: bool = False):
        self.pad_id, self.length, self.multiple = pad_id, length, pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, feats):
        if self.padding_free:
            from clmtune.train.speed import pack_rows

            batch = pack_rows(feats, IGNORE_INDEX)
        else:
            batch = collate(feats, self.pad_id, length=self.length, pad_to_multiple_of=self.multiple)
        batch["rows"] = [f["row"] for f in feats]  # a list: accelerate leaves it on the host (no GPU read back)
        # (supervised tokens, real tokens), counted here on the CPU: the loop reads them without waiting for the GPU
        batch["counts"] = (int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), int(batch["attention_mask"].sum()))
        return batch
