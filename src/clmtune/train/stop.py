"""Stopping a training on request: SIGINT (Ctrl-C) or SIGTERM (``kill``, ``clmtune ui``'s Stop) while the optimizer
steps run lets the current step finish, writes a checkpoint of it and ends the process as an interruption, so
``clmtune train --resume`` continues exactly there, with or without ``train.save_steps``. A second signal stops at
once (Python's usual KeyboardInterrupt). Only in the main thread of a single process: under ``torchrun`` every rank
would have to agree on the step first, so distributed runs keep the default behaviour."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger("clmtune")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s: stopping after this optimizer step and saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)


@contextlib.contextmanager
def stop_after_step(enabled: bool = True) -> Iterator[StopRequest]:
    """``with stop_after_step() as stop: ... if stop: save and raise KeyboardInterrupt``."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
