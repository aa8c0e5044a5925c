"""How a run is asked to stop: Ctrl-C (SIGINT) and SIGTERM (kill, timeout, SLURM, docker stop).

    with terminate_like_ctrl_c():        # SIGTERM raises `Terminated` (a KeyboardInterrupt)
        ...
        with deferred_interrupts():      # both signals wait until the block ends
            optimizer.step()             # never half applied; a checkpoint never half written

Python lets only the main thread set signal handlers; in any other thread both context managers
do nothing (the signals then keep their current handlers).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception of the main thread, so a run stops as on Ctrl-C."""

    signum = signal.SIGTERM


def signal_of(exc: BaseException) -> int:
    """The signal behind an interrupt: SIGTERM for `Terminated`, else SIGINT."""
    return int(getattr(exc, "signum", signal.SIGINT))


def exit_code_of(exc: BaseException) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (130, 143)."""
    return 128 + signal_of(exc)


def signal_label(signum: int) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """Inside the block SIGTERM raises `Terminated` in the main thread; the old handler comes back after."""
    if not _in_main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, TypeError, OSError):  # no signal support here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _restore(signum: int, handler) -> None:
    if handler is None:  # installed from C: fall back to Python's defaults
        handler = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_interrupts(redeliver: bool = True) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM until the block ends; yields the list of signals received meanwhile.

    When the block ends normally, each held signal is raised again (once) to the handler that was
    in place before, e.g. KeyboardInterrupt for Ctrl-C. `redeliver=False` drops them instead: for
    a block that already runs because the run is stopping (the caller reports them). When the
    block raises, its exception wins and held signals are dropped.
    """
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return
    previous: dict[int, object] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda s, frame: received.append(s))
    except (ValueError, TypeError, OSError):  # no signal support here
        for signum, handler in previous.items():
            _restore(signum, handler)
        yield received
        return
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            _restore(signum, handler)
    if redeliver:
        for signum in dict.fromkeys(received):  # each kind once, in arrival order
            signal.raise_signal(signum)


__all__ = ["Terminated", "deferred_interrupts", "terminate_like_ctrl_c", "exit_code_of", "signal_of",
           "signal_label", "STOP_SIGNALS"]
