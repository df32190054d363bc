"""Child processes the core starts (launched training ranks, the vLLM worker): output streamed into a log
with a bounded tail kept, a process group stopped with bounded waits then SIGKILL, the failing rank's
root cause read from torchrun's error summary.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar: logged at most every few seconds


def stream_output(proc: subprocess.Popen, log, tail: list[str], saved=None, keep: int = 60) -> None:
    """Copy a child's output (a binary stdout pipe) line by line to `log`, progress bars throttled to one
    line per 5 s, and as it comes to the binary file `saved` if given; `tail` keeps its last `keep` lines
    (for the root cause of a failure). Used by launched training and the vLLM worker."""
    last_bar, pending = 0.0, b""
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        if saved is not None:
            saved.write(chunk)
            saved.flush()
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if not line.strip():
                continue
            tail[:] = (tail + [line])[-keep:]
            if PROGRESS.search(line):
                if time.monotonic() - last_bar < 5:
                    continue
                last_bar = time.monotonic()
            log.info("%s", line)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Nothing launched outlives the stage: SIGTERM to the launch's process group, at most `grace`
    seconds for it to go, then SIGKILL (a no-op when the launch has ended and taken its ranks along)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc):
            time.sleep(0.1)
        if not _group_alive(proc):
            break
    if proc.stdout:
        proc.stdout.close()


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reaps the launcher itself once it has exited
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def die_with_parent() -> None:
    """In the launcher, before exec: SIGTERM it if the stage's process dies (even by SIGKILL), so that
    no rank trains on for a stage that no longer exists (Linux; elsewhere the stage's teardown does it)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def torchrun_root_cause(tail: list[str]) -> tuple[int, str] | None:
    """(rank, reason) from torch.distributed's `Root Cause (first observed failure)` report, if any."""
    if not any("Root Cause" in line for line in tail):
        return None
    block = tail[max(i for i, line in enumerate(tail) if "Root Cause" in line):]
    rank = next((re.search(r"rank\s*:\s*(\d+)", line) for line in block if re.search(r"^\s*rank\s*:", line)), None)
    said = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in block if ":" in line}
    reason = next((said[k] for k in ("traceback", "exitcode") if k in said and "N/A" not in said[k]
                   and "To enable traceback" not in said[k]), "")
    return (int(rank.group(1)), reason) if rank else None
