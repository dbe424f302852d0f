"""Package-wide settings: how much c3diff tells you (``c3.settings.verbosity``), the scanpy way.

Informational messages go through the standard :mod:`logging` module, under the ``"c3diff"`` logger (children
``"c3diff.tl"``, ... follow it). ``c3.settings.verbosity`` sets that logger's level; when the application has not
configured logging itself (no handler on the root logger), the messages are printed to stderr as plain lines, as
scanpy does. Warnings meant for users are :class:`UserWarning` lines of one sentence or a few, never with code;
:func:`format_warning` prints them without the source line for command-line tools.

Importing c3diff also drops one message of :mod:`ome_zarr`: ``no parent found for <ome_zarr.reader.Label ...>``,
logged at warning level on every read of a SpatialData store with labels (spatialdata stores labels apart from
images, so the reader never finds a "parent" image; nothing is wrong). Other ome_zarr messages are kept.
"""

from __future__ import annotations

import logging
import sys
from enum import IntEnum
from typing import Any

#: The logger of the package; modules log to it (or to ``logging.getLogger(__name__)``, its children).
logger = logging.getLogger("c3diff")


class Verbosity(IntEnum):
    """How much c3diff logs: ``error`` (0), ``warning`` (1, default), ``info`` (2), ``debug`` (3)."""

    error = 0
    warning = 1
    info = 2
    debug = 3

    @property
    def level(self) -> int:
        """The :mod:`logging` level of this verbosity."""
        return {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}[int(self)]


class _LastResortHandler(logging.Handler):
    """Print c3diff's messages to the current ``sys.stderr`` unless the application configured logging (a handler on
    the root logger, which then receives them by propagation)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - as logging.StreamHandler
            self.handleError(record)


class _DropOmeZarrNoParent(logging.Filter):
    """Drop ome_zarr's ``no parent found for <Label ...>`` (logged on every read of a store with labels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("no parent found for")


def quiet_ome_zarr_labels() -> None:
    """Install the filter that drops ome_zarr's ``no parent found`` message on the ``ome_zarr.reader`` logger
    (idempotent; done when c3diff is imported)."""
    reader_logger = logging.getLogger("ome_zarr.reader")
    if not any(isinstance(f, _DropOmeZarrNoParent) for f in reader_logger.filters):
        reader_logger.addFilter(_DropOmeZarrNoParent())


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A :func:`warnings.formatwarning` that prints ``"UserWarning: message"`` on one line, without the file, line
    number and source code (for command-line tools: ``warnings.formatwarning = format_warning``)."""
    text = " ".join(str(message).split())
    return f"{category.__name__}: {text}\n"


class Settings:
    """Settings of c3diff, available as ``c3.settings``.

    Attributes
    ----------
    verbosity
        How much c3diff logs (:class:`Verbosity`): ``"error"``/0, ``"warning"``/1 (default), ``"info"``/2 or
        ``"debug"``/3; set it with a name, a number or a :class:`Verbosity`. It sets the level of the ``"c3diff"``
        logger, so standard logging configuration (``logging.getLogger("c3diff").setLevel(...)``) works as well.

    Examples
    --------
    >>> import c3diff as c3
    >>> c3.settings.verbosity = "info"  # say what the tools do
    >>> c3.settings.verbosity
    <Verbosity.info: 2>
    >>> c3.settings.verbosity = 1  # back to warnings only
    """

    def __init__(self) -> None:
        self._handler = _LastResortHandler()
        if not any(isinstance(h, _LastResortHandler) for h in logger.handlers):
            logger.addHandler(self._handler)
        self.verbosity = Verbosity.warning

    @property
    def verbosity(self) -> Verbosity:
        """How much c3diff logs; see the class docstring."""
        level = logger.getEffectiveLevel()
        for verbosity in sorted(Verbosity, reverse=True):  # debug first
            if level <= verbosity.level:
                return verbosity
        return Verbosity.error

    @verbosity.setter
    def verbosity(self, value: Verbosity | int | str) -> None:
        names = [v.name for v in Verbosity]
        if isinstance(value, str):
            if value.lower() not in names:
                raise ValueError(f"`verbosity` must be one of {names} (or 0..3), got {value!r}.")
            value = Verbosity[value.lower()]
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= int(value) <= 3:
            raise ValueError(f"`verbosity` must be one of {names} (or 0..3), got {value!r}.")
        logger.setLevel(Verbosity(int(value)).level)

    def __repr__(self) -> str:
        return f"c3diff settings: verbosity={self.verbosity.name!r}"

    def _as_dict(self) -> dict[str, Any]:
        return {"verbosity": self.verbosity.name}


settings = Settings()
quiet_ome_zarr_labels()
