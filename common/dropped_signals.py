"""A signal handler's exception that Python dropped, raised again.

Python cannot propagate an exception raised in an at-fork hook (a DataLoader or a writer pool
starting its processes), a finalizer or a __del__: it reports it ("Exception ignored in ...") and
goes on, so a SIGTERM meant to stop the program would be lost. The hook below sends the signal
again from a thread a moment later, so the handler runs again where its exception propagates.
"""
from __future__ import annotations

import threading
from typing import Callable

RESEND_SECONDS = 0.1


def signal_again_if_dropped(hook, signal_of: Callable[[BaseException], int | None],
                            send: Callable[[int], None]):
    """An unraisablehook: a dropped exception for which `signal_of` gives a signal number makes
    `send(number)` run RESEND_SECONDS later, unreported; any other report goes to `hook`."""
    def resend(unraisable) -> None:
        signum = signal_of(unraisable.exc_value)
        if signum is None:
            hook(unraisable)
            return
        again = threading.Timer(RESEND_SECONDS, send, (signum,))
        again.daemon = True
        again.start()
    return resend
