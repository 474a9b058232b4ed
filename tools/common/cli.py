"""A tool's function exposed as its command line by ``fire``: logging, a report, a failure message."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any


def command(
    function: Callable[..., Any],
    report: Callable[[Any], str] | None = None,
    errors: tuple[type[BaseException], ...] = (),
    failure: str = "FAILED",
    log_level: int = logging.INFO,
) -> Callable[..., None]:
    """``function`` as a command: same parameters and docstring (``fire`` shows them as flags and help).

    The command sets up logging, runs ``function``, prints ``report(result)`` if given and, for one
    of ``errors``, prints ``failure: message`` to stderr and exits with code 1.
    """

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> None:
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        try:
            result = function(*args, **kwargs)
        except errors as e:
            print(f"\n{failure}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        if report is not None:
            print(report(result), flush=True)

    return run


def fire_command(function: Callable[..., Any], **options: Any) -> None:
    """Run ``command(function, **options)`` on the command line with ``fire``."""
    import fire

    fire.Fire(command(function, **options))
