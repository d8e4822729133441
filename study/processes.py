"""The stage subprocesses of the study runner: started with their output to a log file, and stopped with the runner.

Each subprocess gets SIGKILL when the runner dies, however it dies (Linux ``PR_SET_PDEATHSIG``); on SIGTERM or
Ctrl-C the runner stops them itself (``stop_commands``: SIGTERM, then SIGKILL after 30 s). So a killed runner leaves
no process writing behind it.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading

_LIVE: set = set()              # the stage subprocesses running now, from every worker thread
_LIVE_LOCK = threading.Lock()


def _die_with_parent(parent: int):
    """preexec_fn: the stage subprocess gets SIGKILL when the runner dies, however it dies (Linux)."""

    def setup():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:   # the runner died before prctl took effect
            os._exit(1)

    return setup


def run_command(command: list[str], log_file: str, env: dict, echo: bool = False) -> int:
    """Run ``command`` with stdout + stderr to ``log_file`` (and to the console with ``echo``); returns its exit
    status. An exception in the calling thread stops the subprocess before propagating; ``stop_commands`` stops
    the subprocesses of every thread (the runner's main thread calls it on SIGTERM or Ctrl-C)."""
    with open(log_file, "w") as log:
        log.write("$ " + shlex.join(command) + "\n\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT,
                                   env=env, preexec_fn=_die_with_parent(os.getpid()),
                                   text=echo, bufsize=1 if echo else -1)
        with _LIVE_LOCK:
            _LIVE.add(process)
        try:
            if echo:
                for line in process.stdout:
                    log.write(line)
                    sys.stdout.write(line)
            return process.wait()
        except BaseException:
            _stop([process])
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(process)


def stop_commands() -> None:
    """Stop every stage subprocess still running (SIGTERM, then SIGKILL after 30 s)."""
    with _LIVE_LOCK:
        processes = list(_LIVE)
    _stop(processes)


def _stop(processes: list) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def raise_on_sigterm(signum, frame):
    """SIGTERM handler of the runner: raise SystemExit (exit status 128 + signum) in the main thread, so that the
    runner stops its subprocesses and writes no line for an unfinished job."""
    print("\nterminated: an unfinished job has no result line and runs again on the next start", flush=True)
    raise SystemExit(128 + signum)
