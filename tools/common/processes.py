"""Child processes: shell quoting, bundle commands streamed to the console and a log, fresh-process runs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.common.bundles import REPO_ROOT

# Console noise from bundle subprocesses that carries no information for a user (kept in the log file).
BUNDLE_NOISE = ("nvImageCodec is not available", "NvImgCodecPydicomReader", "Orientationd.__init__:labels")


class CommandError(RuntimeError):
    """A child command failed; the message names the step, the command and its log."""


def shell_quote(cmd: Sequence[str]) -> str:
    """The command as one could paste it into bash (double quotes where an argument holds single quotes)."""

    def quote(arg: str) -> str:
        if "'" in arg and not any(c in arg for c in '"$`\\!'):
            return f'"{arg}"'
        return shlex.quote(arg)

    return " ".join(quote(c) for c in cmd)


def _echo(proc: subprocess.Popen, log: Any, tail: list[str], quiet: Sequence[str]) -> int:
    """Copy the child's output to ``log`` and (minus ``quiet`` lines) the console; keep the last lines."""
    for line in proc.stdout:
        log.write(line)
        tail.append(line.rstrip())
        del tail[:-40]
        if not any(p in line for p in quiet):
            sys.stdout.write("    " + line)
            sys.stdout.flush()
    return proc.wait()


def run_streamed(
    cmd: Sequence[str],
    cwd: Path,
    log_path: Path,
    step: str,
    quiet: Sequence[str] = (),
    error: type[Exception] = CommandError,
) -> None:
    """Run ``cmd`` in ``cwd``, echo its output live (minus known noise) and tee all of it to ``log_path``.

    Lines containing one of ``quiet`` (or of ``BUNDLE_NOISE``) are written to the log only. Raises
    ``error`` naming ``step``, the exit code, the last lines of output and the log file if the
    command fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ cd {cwd} && {shell_quote(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail: list[str] = []
    with open(log_path, "w") as log:
        log.write(f"$ cd {cwd} && {shell_quote(cmd)}\n")
        try:
            proc = subprocess.Popen(
                list(cmd),
                cwd=str(cwd),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as e:
            raise error(f"{step} failed: could not start {cmd[0]}: {e}") from e
        try:
            rc = _echo(proc, log, tail, (*BUNDLE_NOISE, *quiet))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        last = "\n".join("    " + t for t in tail[-25:])
        raise error(
            f"{step} failed: the bundle command exited with code {rc}.\n"
            f"  command: cd {cwd} && {shell_quote(cmd)}\n  full log: {log_path}\n  last lines:\n{last}"
        )


def child_command(code: str, *args: str) -> list[str]:
    """Command line running ``python -c code args`` in a freshly forked process.

    Linux keeps the launching process's peak RSS in ``ru_maxrss`` across fork/vfork + exec; a
    ``/bin/sh`` that forks the python (it is not the last command, so sh does not exec it) gives
    the child an ``ru_maxrss`` of its own.
    """
    command = [sys.executable, "-c", code, *args]
    if os.name == "posix" and os.path.exists("/bin/sh"):
        return ["/bin/sh", "-c", '"$0" "$@"; exit $?', *command]
    return command


def run_child(
    module: str, entry: str, args: dict[str, Any], label: str, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run ``<module>.<entry>(args_json, result_path)`` in a fresh Python process (its own peak RSS).

    Returns the JSON the child wrote, or ``{"error": ...}`` naming ``label`` if it failed.
    """
    with tempfile.TemporaryDirectory(prefix=f"{module.rsplit('.', 1)[-1]}_") as tmp:
        result_path = os.path.join(tmp, "result.json")
        code = f"import sys; from {module} import {entry}; {entry}(sys.argv[1], sys.argv[2])"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        rc = run_with_timeout(child_command(code, json.dumps(args), result_path), REPO_ROOT, env, timeout_s)
        if rc != 0 or not os.path.exists(result_path):
            why = f"timed out after {timeout_s:g} s" if rc == "timeout" else f"exit {rc}"
            return {"error": f"{label} subprocess failed ({why})", **({"timed_out": True} if rc == "timeout" else {})}
        return json.loads(Path(result_path).read_text())


def run_with_timeout(cmd: Sequence[str], cwd: Path, env: dict[str, str], timeout_s: float | None) -> int | str:
    """Run ``cmd``; return its exit code, or "timeout" after killing it and everything it started.

    With a time limit the command runs in a process group of its own, so that the launcher shell,
    the Python it forks and their children (a benchmark's own fresh-process measurements, which
    stay in that group) are killed together.
    """
    if timeout_s is None:
        return subprocess.run(list(cmd), cwd=str(cwd), env=env).returncode
    proc = subprocess.Popen(list(cmd), cwd=str(cwd), env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return "timeout"
