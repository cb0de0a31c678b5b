"""The one way a test waits: on a condition it can read (a file, a lock, a queue), never on the clock alone."""
import subprocess
import time
from typing import Callable, Union


def wait_until(condition: Callable[[], bool], alive: Union[subprocess.Popen, Callable[[], object], None] = None,
               timeout: float = 300, what: str = "the condition", poll: float = 0.05) -> None:
    """Returns once condition() holds. Fails as soon as `alive`, what the condition waits on, is gone (a
    process that ended, with the end of its stderr; or a function that returns something false), or after
    timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if isinstance(alive, subprocess.Popen) and alive.poll() is not None:
            raise AssertionError(f"{what}: the process ended first: {(alive.communicate()[1] or '')[-2000:]}")
        if callable(alive) and not alive():
            raise AssertionError(f"{what}: what it waits on is gone")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(poll)
