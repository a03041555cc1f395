"""Runs of a loaded model on batches its caller joined itself (`ModelRegistry.joined_runs`), for a
decoder's step loops (`runtime.decoders`), which gather their own batches: in one of the model's run
slots, counted among its runs, inferences and batches as its batcher's are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wasminfer.models.batching import Batcher
    from wasminfer.models.registry import _Model


class JoinedRuns:
    """Runs of one loaded model on batches joined by the caller (`ModelRegistry.joined_runs`): in
    one of the model's run slots, counted among its runs and batches. `slots`, `delay` and
    `max_rows`: its batcher's run slots, queue delay (seconds) and `max_batch_size`, for the
    caller's own batching policy."""

    __slots__ = ("_model", "_batcher", "slots", "delay", "max_rows")

    def __init__(self, model: _Model, batcher: Batcher) -> None:
        self._model = model
        self._batcher = batcher
        self.slots = batcher.slots
        self.delay = batcher.delay
        self.max_rows = batcher.config.max_batch_size

    def run(self, feed: Mapping[str, np.ndarray], deadline_ns: int | None, waits: list[float],
            rows: int) -> dict[str, np.ndarray]:
        """Runs `feed` (`rows` rows, of requests that waited `waits` seconds) by `deadline_ns`.
        Raises `Timeout` and what ORT raises."""
        model = self._model
        self._batcher.record_joined(rows, waits)
        return dict(zip(model.output_names, model.run(feed, deadline_ns, inferences=len(waits)), strict=True))


__all__ = ["JoinedRuns"]
