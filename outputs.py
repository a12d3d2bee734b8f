"""One run per output folder (a lock the kernel drops when its process dies) and atomic writes (a temporary name in
the same folder, then os.replace): a killed or failed run leaves the old file or the new one, never half of one."""
import csv
import io
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from errors import UsageError

LOCK_NAME = ".run.lock"  # hidden, so that folder listings (eval.py, imagefolders) never see it


#################################################################################
#                          One run per output folder                            #
#################################################################################

def is_launch_main():
    """Whether this is the main process of its launch (torchrun and `accelerate launch` set RANK; alone: yes)."""
    return int(os.environ.get("RANK", "0")) == 0


def make_writable_folder(folder, label):
    """Create `folder` when missing; UsageError naming `label` (the flag) when it cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{label} {folder}: cannot create the folder ({error.strerror or error}).") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{label} {folder} is not a writable folder: choose another one or fix its permissions.")
    return folder


class FolderLock:
    """An exclusive fcntl.flock on FOLDER/NAME for one run's lifetime (`with FolderLock(...)`), taken by the main
    process of a launch only (`main`, default is_launch_main()): the ranks of one launch share it. The kernel
    releases it when the holder dies, even by SIGKILL, so it never stays stuck; the file names the holder."""

    def __init__(self, folder, label, name=LOCK_NAME, main=None):
        self.folder, self.label, self.name = Path(folder), label, name
        self.main = is_launch_main() if main is None else main
        self.path, self.fd, self.created = self.folder / name, None, []

    def __enter__(self):
        if self.main:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        """Take the lock, or raise UsageError naming the folder and the run holding it."""
        import fcntl

        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # deepest first
        make_writable_folder(self.folder, self.label)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a run that failed its checks just removed the folder it had created
                make_writable_folder(self.folder, self.label)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "starting"
                os.close(fd)
                raise UsageError(f"{self.label} {self.folder} is in use by another run ({holder}): wait for it to "
                                 f"end or stop it, or choose another {self.label}.") from None
            try:  # the file we locked may have been removed by a holder that just released it: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python"
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{command[:300]}".encode())
        self.fd = fd

    def release(self):
        """Remove the lock file, and the folder when this run created it and left it empty; drop the lock."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting run then locks a new file
            for folder in self.created:  # folders this run created and left empty (it failed its checks) go
                try:
                    folder.rmdir()
                except OSError:
                    break
            os.close(self.fd)
            self.fd = None


#################################################################################
#                                 Atomic writes                                 #
#################################################################################

@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix, so writers that pick a format by it still do); on success
    rename it to `path`; on any failure remove it. `path`'s folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_json(path, data, indent=2, **kwargs):
    """Write `data` as JSON (and a final newline) to `path` atomically."""
    return write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n")


def write_csv(path, rows, fieldnames):
    """Write a header and `rows` (dicts) to `path` atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def read_csv_rows(path):
    """The rows (dicts) of a CSV written with a header; a last line cut short (no newline: a run killed or a disk
    filled while appending it) and rows missing fields are left out. [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    return [row for row in csv.DictReader(io.StringIO(text, newline="")) if None not in row.values()]
