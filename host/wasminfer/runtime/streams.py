"""`OutputStream`: an invocation's answer delivered in parts while the guest still runs.

Every ABI writes parts the same way (`InvocationState.write_chunk`): the handler ABI's
`output_chunk` import, a Python handler that yields (the door's `w` frame), a WASI command's stdout.
Without a stream the parts are kept and become the body of the one answer, so a streaming function
also answers a plain invocation. With one, each part goes to `deliver` on the guest's thread, in
order; the consumer (the gateway) hands it to its event loop and may `cancel` the stream from any
thread, which ends the guest at its next part (or within an epoch slice if it computes meanwhile).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wasminfer.runtime._engine import CallState

#: `deliver(chunk, content_type)`: called on the guest's thread for each part, in order.
Deliver = Callable[[bytes, str], None]


class OutputStream:
    """The channel of one streamed invocation from its guest to its consumer. Thread-safe."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.chunks = 0
        self.bytes = 0
        self.first_chunk_ns: int | None = None  # `time.perf_counter_ns()` of the first part
        self.invocation_id = ""  # set by the host when the invocation starts
        self._state: CallState | None = None
        self._cancelled: BaseException | None = None
        self._lock = threading.Lock()

    def attach(self, state: CallState) -> None:
        """Binds the guest call the stream serves (cancelled at once if the stream already is)."""
        with self._lock:
            self._state = state
            cancelled = self._cancelled
        if cancelled is not None:
            state.cancel(cancelled)

    def detach(self) -> None:
        with self._lock:
            self._state = None

    def cancel(self, error: BaseException) -> None:
        """Ends the guest that writes this stream with `error` (idempotent, the first error stays)."""
        with self._lock:
            if self._cancelled is None:
                self._cancelled = error
            state = self._state
        if state is not None:
            state.cancel(error)

    @property
    def cancelled(self) -> BaseException | None:
        return self._cancelled

    def write(self, chunk: bytes, content_type: str) -> None:
        """Delivers one part (called by the invocation, never by a consumer)."""
        if self.first_chunk_ns is None:
            self.first_chunk_ns = time.perf_counter_ns()
        self.chunks += 1
        self.bytes += len(chunk)
        self.deliver(chunk, content_type)


__all__ = ["Deliver", "OutputStream"]
