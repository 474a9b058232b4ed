"""The last lines of a failed command-line run name the cause: an exception hook that ends with it.

MONAI wraps every exception raised inside a config expression (``raise RuntimeError("Failed to evaluate
ConfigExpression: ...") from e``), so a run such as ``python -m monai.bundle run inference --config_file
configs/inference.json`` that this bundle stops before compute (a truncated DICOM slice, a missing image, a
checkpoint that does not fit) ends its output with the wrapper and the expression, while the message that
names the file and the fix is a page higher. ``install`` (called when the bundle's ``scripts`` package is
imported) sets ``sys.excepthook`` to one that prints the full traceback as before (through the previous
hook) and then a short block, at most ``MAX_LINES`` lines, naming the first exception under MONAI's
wrappers::

    swin_unetr_btcv_seg: InputDataError: /data/series: slice file /data/series/slice0004.dcm has no ...

Only uncaught exceptions of the main thread reach ``sys.excepthook``: a host that catches what the bundle
raises (MONAI Label, a notebook, tests) sees no change. Installing again (another bundle's ``scripts``
imported in the same process) renames the bundle of the one hook; it never stacks a second hook.
Standard library only: it is installed before the version check, whose refusal it reports too.
"""

from __future__ import annotations

import sys
from types import TracebackType

MAX_LINES = 5  # the block: one blank line, then the bundle, the type and the message's first lines
_WRAPPERS = ("Failed to evaluate ", "Failed to instantiate component ")  # monai.bundle's re-raises


def is_wrapper(exc: BaseException) -> bool:
    """Whether ``exc`` is MONAI's re-raise of an error in a config item (it says nothing of its own)."""
    cause = exc.__cause__ or exc.__context__
    return cause is not None and type(exc) is RuntimeError and str(exc).startswith(_WRAPPERS)


def root_cause(exc: BaseException) -> BaseException:
    """The first exception of ``exc``'s chain that is not a MONAI wrapper.

    The walk stops there, not at the innermost exception: the bundle's own errors are often raised
    ``from`` the library error they explain (a ``json.JSONDecodeError`` under "datalist is not valid JSON").
    """
    seen = set()
    while is_wrapper(exc) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def summary(exc: BaseException, bundle: str, max_lines: int = MAX_LINES) -> list[str]:
    """The final block for ``exc``: a blank line, then ``<bundle>: <Type>: <message>`` in ``max_lines`` lines.

    A message longer than the block keeps its first lines (where the bundle's messages name the file and
    the problem) and says how many lines the full message above has.
    """
    cause = root_cause(exc)
    message = str(cause).strip() or "(no message)"
    lines = message.splitlines()
    room = max_lines - 1  # after the blank line
    if len(lines) > room:
        lines = [*lines[: room - 1], f"... ({len(lines) - room + 1} more line(s) in the full message above)"]
    lines[0] = f"{bundle}: {type(cause).__name__}: {lines[0]}"
    return ["", *lines]


class _ErrorReportHook:
    """``sys.excepthook``: the previous hook's output, then the root-cause block."""

    bundle_error_report = True  # recognised by the copy of this module in every bundle

    def __init__(self, previous, bundle: str) -> None:
        self.previous = previous
        self.bundle = bundle

    def __call__(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        try:
            sys.stdout.flush()  # buffered prints before the traceback, not after it, when both go to one file
        except (AttributeError, OSError, ValueError):  # no stdout, or a closed one
            pass
        self.previous(exc_type, exc, tb)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: the traceback says it all
            return
        try:
            block = "\n".join(summary(exc, self.bundle))
            print(block, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001  (the report must never hide the error it reports)
            pass


def install(bundle: str) -> None:
    """Make ``sys.excepthook`` end an uncaught exception's report with its root cause, named for ``bundle``."""
    if getattr(sys.excepthook, "bundle_error_report", False):
        sys.excepthook.bundle = bundle
        return
    sys.excepthook = _ErrorReportHook(sys.excepthook, bundle)
