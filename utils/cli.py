"""How every script takes its flags and ends: checked flag types, one-line errors, never a traceback.
Cheap to import (no torch at the top), so that a script can call exit_on_ctrl_c before its other imports."""
import argparse
import math
import signal
import sys


class UserError(Exception):
    """Bad input or environment, or a run stopped on purpose: printed as one line on stderr, then exit_code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class RunDiverged(UserError):
    """A NaN or infinite loss: the run is over, and sweep.py goes on to the next configuration."""


def flag_error(flag: str, message: str) -> UserError:
    """A flag that fails a check only the data can make, worded and ended (status 2) as argparse's errors."""
    return UserError(f"argument {flag}: {message} (see --help)", exit_code=2)


def exit_on_ctrl_c(prog: str) -> None:
    """From now on, Ctrl-C ends the process with one line on stderr and status 130, wherever it lands (the
    imports alone take seconds), instead of a KeyboardInterrupt traceback. Training replaces this handler
    with its own, which saves a checkpoint first (runtime.StopSignal), and puts it back after."""
    def handler(signum, frame):
        print(f"{prog}: error: interrupted by Ctrl-C outside training; every file written before it is complete",
              file=sys.stderr)
        sys.exit(128 + signum)
    signal.signal(signal.SIGINT, handler)


def run_cli(main, prog: str) -> None:
    """How every script ends: a UserError is one line on stderr and its exit code, never a traceback."""
    try:
        main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        import torch.distributed as dist  # imported by now; see the module's docstring
        if dist.is_initialized():
            dist.destroy_process_group()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help. A flag whose default is None
    depends on something else, and its help says what."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):  # one line on stderr, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked(convert, ok, requirement: str):
    """An argparse type: convert(text), refused with `requirement` unless ok(value)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}, must be {requirement}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


def non_empty(what: str):
    """An argparse type for a name that may not be empty: `--results_dir=` would write into the current folder."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must be {what}, got an empty value")
        return text
    return parse


def at_least(n: int):
    return checked(int, lambda v: v >= n, f"an integer of at least {n}")


def between(low: int, high: int):
    return checked(int, lambda v: low <= v <= high, f"an integer from {low} to {high}")


positive_int, natural_int = at_least(1), at_least(0)
seed_int = between(0, 2**32 - 1)  # numpy's legacy seeding, which np.random.seed uses, takes no more
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number above 0")
natural_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number of at least 0")
auto_or_natural_float = checked(lambda t: t if t == "auto" else float(t),
                                 lambda v: v == "auto" or (math.isfinite(v) and v >= 0),
                                 "'auto' or a finite number of at least 0")
auto_or_positive_int = checked(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 1,
                               "'auto' or an integer of at least 1")
