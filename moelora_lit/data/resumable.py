"""A train ``DataLoader`` that Lightning can resume in the middle of an epoch: same order, already-trained
batches skipped, so a resumed run sees exactly the batches of a straight one."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader


# ----------------------------------------------------------------------------------------- resumable data
class _SkipFirst:
    """An index sampler whose first iteration skips ``skip`` items (the batches already trained on)."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        # Lazy: DataLoader iterators call iter() twice on start (workers), only the one that runs must skip.
        iterator = iter(self.sampler)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(iterator, None)
        yield from iterator

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with Lightning's ``state_dict`` / ``load_state_dict`` protocol, for mid-epoch resume.

    Lightning restarts a plain ``DataLoader`` at the beginning of the epoch (and warns), so a run resumed in the
    middle of an epoch trains on other batches than a straight run. This loader's state holds the shuffling
    generator's state at the start of the epoch (and the sampler's epoch), and how many batches were trained on;
    after ``load_state_dict`` the next iteration repeats the epoch's order and skips those batches (indices only,
    no data is loaded for them). The order must come from ``generator=`` or from a sampler with ``set_epoch``.

    Args:
        prefetched: batches Lightning has fetched ahead of the one being trained when it saves a checkpoint
            (default: 0 for a loader with a length, 1 without, as Lightning's default fetcher does).
    """

    def __init__(self, *args: Any, prefetched: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_resume_state(prefetched)

    def _init_resume_state(self, prefetched: int | None = None) -> None:
        self.prefetched = prefetched
        self._epoch_start: dict[str, Any] | None = None
        self._yielded = self._skipped = 0
        self._exhausted = False
        self._pending_skip = 0
        self._to_load: dict[str, Any] | None = None

    def _sampler_with_epoch(self) -> Any:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if sampler is not None and hasattr(sampler, "set_epoch"):
                return sampler
        return None

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        skip = getattr(self, "_pending_skip", 0)
        return _SkipFirst(sampler, skip) if skip else sampler

    def __iter__(self):
        state, self._to_load = self._to_load, None
        skip = 0
        if state:
            if state.get("generator") is not None and self.generator is not None:
                self.generator.set_state(state["generator"])
            with_epoch = self._sampler_with_epoch()
            if state.get("epoch") is not None and with_epoch is not None:
                with_epoch.set_epoch(state["epoch"])
            skip = int(state.get("consumed", 0))
        with_epoch = self._sampler_with_epoch()
        self._epoch_start = {"generator": self.generator.get_state() if self.generator is not None else None,
                             "epoch": getattr(with_epoch, "epoch", None)}  # fmt: skip
        self._yielded, self._skipped, self._exhausted = 0, skip, False
        self._pending_skip = skip
        try:
            iterator = super().__iter__()  # the iterator reads _index_sampler once, here
        finally:
            self._pending_skip = 0
        return self._count(iterator)

    def _count(self, iterator: Any):
        for batch in iterator:
            self._yielded += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        if self._epoch_start is None:
            return {}
        try:
            length: int | None = len(self)
        except TypeError:
            length = None
        # Lightning's fetcher reads one batch ahead only when the loader has no length.
        prefetched = self.prefetched if self.prefetched is not None else (0 if length is not None else 1)
        consumed = self._skipped + self._yielded - (0 if self._exhausted else prefetched)
        if self._exhausted or (length is not None and consumed >= length):
            # The epoch is over: the next one starts from the current generator state.
            epoch = self._epoch_start["epoch"]
            return {"generator": self.generator.get_state() if self.generator is not None else None,
                    "epoch": None if epoch is None else epoch + 1, "consumed": 0}  # fmt: skip
        return {**self._epoch_start, "consumed": max(consumed, 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_load = dict(state_dict) if state_dict else None


def make_resumable(loader: Any) -> Any:
    """Turn a plain ``torch.utils.data.DataLoader`` into a :class:`ResumableDataLoader` (in place); others as is."""
    if type(loader) is DataLoader:
        loader.__class__ = ResumableDataLoader
        loader._init_resume_state()
    return loader


def resumable_train_dataloader(datamodule: Any) -> None:
    """Make ``datamodule.train_dataloader()`` return resumable loaders (no-op if it already does)."""
    original = datamodule.train_dataloader
    if getattr(original, "_moelora_resumable", False):
        return

    def train_dataloader() -> Any:
        return make_resumable(original())

    train_dataloader._moelora_resumable = True  # type: ignore[attr-defined]
    datamodule.train_dataloader = train_dataloader
