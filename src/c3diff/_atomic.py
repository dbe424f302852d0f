"""Folders that appear whole or not at all: training checkpoints and ``best/`` (:func:`c3diff.tl.train`) and the zarr
stores of :func:`c3diff.tl.super_resolve`.

A folder is written beside its place under a hidden name, ``.NAME.c3diff-tmp-PID``, and renamed to ``NAME`` only when
complete; a folder it replaces is first moved aside to ``.NAME.c3diff-old-PID`` and deleted once the new one is in
(a folder deleted outright goes to ``.NAME.c3diff-del-PID`` first).
A process killed at any point leaves at ``NAME`` the old folder or the new one, never a half-written one - or
nothing, with the old one aside, which :func:`recover` puts back. Hidden folders of a process that is still running
(another call writing the same place) are left alone; those of dead processes are cleaned up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

_STAGED = re.compile(r"\.(?P<name>.+)\.c3diff-(?P<kind>tmp|old|del)-(?P<pid>\d+)")


def staging(final: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """The hidden sibling of ``final`` that a process ``pid`` (this one by default) writes (``kind="tmp"``), moves
    the folder it replaces to (``kind="old"``) or the folder it deletes to (``kind="del"``)."""
    return final.parent / f".{final.name}.c3diff-{kind}-{os.getpid() if pid is None else pid}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_one(path: Path, name: str, kind: str, pid: int) -> None:
    if pid != os.getpid() and process_alive(pid):
        return  # another process is writing or replacing it right now
    final = path.parent / name
    if kind == "old" and not final.exists():
        # the process died between moving the old folder aside and renaming the new one in: put the old one back
        # (another process cleaning up at the same time may have done it first)
        with contextlib.suppress(FileNotFoundError):
            path.rename(final)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover(final: Path) -> None:
    """Undo what killed or failed writes of ``final`` left beside it (see the module's description)."""
    for path in sorted(final.parent.glob(f".{final.name}.c3diff-*")):
        match = _STAGED.fullmatch(path.name)
        if match and match["name"] == final.name:
            _recover_one(path, final.name, match["kind"], int(match["pid"]))


def recover_all(folder: Path) -> None:
    """:func:`recover` for every folder of ``folder``."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(".*.c3diff-*")):
        if match := _STAGED.fullmatch(path.name):
            _recover_one(path, match["name"], match["kind"], int(match["pid"]))


class Publication:
    """A complete folder ``tmp`` renamed to ``final``, the folder it replaced kept aside until :meth:`commit`
    deletes it or :meth:`rollback` puts it back (and removes the new one)."""

    def __init__(self, tmp: Path, final: Path) -> None:
        self.final = final
        self.old = None
        if final.exists():
            self.old = staging(final, "old")
            if self.old.exists():
                shutil.rmtree(self.old)
            final.rename(self.old)
        tmp.rename(final)

    def commit(self) -> None:
        """Delete the replaced folder: the new one stays."""
        if self.old is not None:
            shutil.rmtree(self.old, ignore_errors=True)
            self.old = None

    def rollback(self) -> None:
        """Remove the new folder and put the replaced one back."""
        shutil.rmtree(self.final, ignore_errors=True)
        if self.old is not None:
            self.old.rename(self.final)
            self.old = None


def publish(tmp: Path, final: Path) -> Publication:
    """Rename the complete folder ``tmp`` to ``final``; call ``.commit()`` (or ``.rollback()``) on the result."""
    return Publication(tmp, final)


def write_folder(final: Path, write: Callable[[Path], object]) -> None:
    """Write a folder with ``write(folder)`` into ``staging(final)`` and rename it to ``final`` when complete; a
    ``write`` that raises leaves nothing behind and ``final`` as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final).commit()


def remove_folder(final: Path) -> None:
    """Delete ``final`` at once: renamed aside first, so it is never seen half-deleted."""
    if final.exists():
        aside = staging(final, "del")
        final.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
