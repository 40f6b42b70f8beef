"""Ctrl-C and SIGTERM in a training run: SIGTERM stops it as Ctrl-C does (a checkpoint, then the command that
resumes), and around what must never be cut (the final adapter, the interrupt's own checkpoint, the summary) both
wait until it is written.

    interrupts.stop_on_sigterm()                             # once, at the start of train_grpo.py
    with interrupts.deferred_interrupts("the final adapter is saved"): ...
"""

import contextlib
import signal
import sys
import threading


def stop_on_sigterm():
    """SIGTERM (what `kill` and job schedulers send before SIGKILL) stops a run as Ctrl-C does: a checkpoint and the
    command that resumes, instead of an exit that loses the steps since the last checkpoint."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def deferred_interrupts(what, then_stop=True):
    """Ctrl-C and SIGTERM wait until the block ends, so that what it writes is finished, never cut (a final adapter,
    the interrupt's own checkpoint, the summary); then they stop the run as they would have (`then_stop`), or are
    dropped where the run stops anyway. The first one says what it waits for."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return
    received = []

    def wait(signum, frame):
        if not received:
            print(f"\nstopping once {what}", file=sys.stderr, flush=True)
        received.append(signum)

    previous = {number: signal.signal(number, wait) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received and then_stop:
        raise KeyboardInterrupt
