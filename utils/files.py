"""Results files written whole or not at all, and read back with one line naming a file that is not what it
should be. Every tool writes its results files through replace()."""
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from utils.cli import UserError


# -----------------------------------------------------------------------------
# files written whole or not at all

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes files 0600, and results are for reading by others too


def os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind e, if any: e itself, or one it was raised from or while handling. torch.save and
    matplotlib wrap a full disk's OSError in errors of their own."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def replace(path: Path, write) -> None:
    """write(tmp) to a temporary file of a unique name beside path, then rename it over path: a crash never
    leaves half a file, two writers never share a temporary file, and a failed write (a full disk, a folder
    that cannot be written) removes its temporary file and says so in one line. The one way every tool writes
    a results file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = os_error(e) if isinstance(e, Exception) else None  # not KeyboardInterrupt, SystemExit
        if cause is not None:
            raise UserError(f"cannot write {path} ({cause.strerror or type(cause).__name__}); the files written "
                            f"before it are left as they were: free space or pick another folder, then run "
                            f"again") from None
        raise


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, whose OSError (a full disk) torch keeps as the cause of its own error."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    replace(path, write)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    replace(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj, path: Path) -> None:
    replace(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_text(text: str, path: Path) -> None:
    replace(path, lambda tmp: tmp.write_text(text))


def read_csv(path: Path, required: list, **kwargs) -> pd.DataFrame:
    """A results CSV, or one line naming the file when it cannot be read or lacks a required column."""
    try:
        df = pd.read_csv(path, **kwargs)
    except Exception as e:  # EmptyDataError, ParserError, UnicodeDecodeError, OSError: the file is bad
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is left as it is: move it away or "
                        f"repair it") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; it is left as it is: move it away or "
                        f"repair it")
    return df


def read_json(path: Path, what: str = "a run's arguments") -> dict:
    """A JSON object, or one line naming the file when it cannot be read or holds something else."""
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is left as it is: move it away or "
                        f"repair it") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} holds a JSON {type(saved).__name__}, not {what}; it is left as it is: move it "
                        f"away or repair it")
    return saved


def read_torch(path: Path, what: str, device="cpu") -> dict:
    """A checkpoint or weights file of this tool: a dict whose "head" is the run's args.json. Memory-mapped, so
    that reading its head costs nothing like its size."""
    try:
        saved = torch.load(path, map_location=device, weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: say which, do not guess
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}); move it away to start the run over") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("head"), dict):
        raise UserError(f"{path} is not a {what} of this tool; move it away to start the run over")
    return saved


def create_once(path: Path, text: str) -> bool:
    """Writes text to path unless path exists, in one step that two processes cannot both win: a hard link,
    atomic on local and network file systems alike, where O_EXCL and flock are not everywhere. True if this
    call created it."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        Path(tmp).write_text(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); free space or pick another folder, then run "
                        f"again") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def make_results_dir(path) -> None:
    """--results_dir, made if absent, and refused in one line where no file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --results_dir {path} ({e.strerror}); pick another folder") from None
