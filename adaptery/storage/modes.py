"""The data dir and what the platform keeps in it are readable by the platform's user only.

The SQLite database holds every row's metadata and the hashes of keys and sessions; blobs are sealed, but who
may list them learns their number, sizes and times. So a directory the platform makes is 0700 from the start,
and one that exists, is ours and is open to others (made by an older version, by hand or under a loose umask) is
tightened, with a warning in the log: what lay in it could be read until now. One that belongs to another user
is left as it is, with a warning too.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("adaptery.storage")
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def tighten(path: Path, private_mode: int) -> None:
    """Take every permission of group and others off `path` (a file or directory of ours)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return  # gone meanwhile (an SQLite -wal file at its last connection's close)
    current = stat.S_IMODE(info.st_mode)
    if not current & 0o077:
        return
    if info.st_uid != os.getuid():
        log.warning("%s is open to others (mode %o) and not ours to change: make it %o", path, current, private_mode)
        return
    path.chmod(private_mode)
    log.warning("%s was open to others (mode %o): made it %o", path, current, private_mode)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner may enter: made 0700 (missing parents too), or tightened."""
    if path.is_dir():
        tighten(path, PRIVATE_DIR)
        return path
    if not path.parent.exists():
        private_dir(path.parent)
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    path.chmod(PRIVATE_DIR)  # the umask may have taken bits off mkdir's mode, never added them
    return path


SCRATCH_PREFIX = "adaptery-plain-"


def make_scratch(parent: Path | None = None) -> Path:
    """A per-process 0700 directory outside the data dir for transient plaintext, removed when the process exits
    (and, should it have been killed, by the next process that makes one)."""
    root = Path(parent or tempfile.gettempdir())
    for stale in root.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = stale.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and stale.is_dir() and stale.stat().st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root))
    os.chmod(path, 0o700)
    atexit.register(shutil.rmtree, path, True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
