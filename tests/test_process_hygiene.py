"""The suite's own process handling (tests/conftest.py), tested for real: what a test starts is stopped with
everything it started, orphans included; a command that overruns is stopped with its children; and when pytest
itself is killed, the janitor stops what the session left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.conftest import ROOT, run_in_session, start, stop_tree, wait_for

pytestmark = pytest.mark.slow  # real processes (seconds)

# starts a child in a session of its own (so outside its parent's process group) and exits at once: the child
# is an orphan, reparented to init, that no process-group signal and no walk of children can reach
ORPHAN = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
"""


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_tree_stops_an_orphan_that_left_the_group_and_session(tmp_path):
    pid_file = tmp_path / "orphan.pid"
    root = start([sys.executable, "-c", ORPHAN, str(pid_file)], tmp_path / "root.log", tmp_path)
    orphan = None
    try:
        root.wait(timeout=60)
        orphan = psutil.Process(int(wait_for("the orphan's pid", lambda: pid_file.exists() and pid_file.read_text(),
                                             timeout=60)))
        # a session (and group) of its own, its parent gone: out of reach but for the mark `start` gave the tree
        assert os.getsid(orphan.pid) == orphan.pid and orphan.ppid() != root.pid
        stop_tree(root, grace=5)
        assert gone(orphan)
    finally:
        if orphan is not None and not gone(orphan):
            orphan.kill()


def test_run_in_session_stops_the_whole_tree_when_the_command_overruns(tmp_path):
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; sleep 300 & echo $! >> {pids}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_session(["bash", "-c", script], timeout=3, grace=5)
    children = [psutil.Process(int(p)) for p in pids.read_text().split() if psutil.pid_exists(int(p))]
    left = [p for p in children if not gone(p)]
    for proc in left:
        proc.kill()
    assert len(pids.read_text().split()) == 2 and not left


# a pytest session loading this suite's conftest (its janitor and `start`), whose one test starts a process in a
# session of its own, says where it is, and waits to be killed
INNER = """
import os, time
from pathlib import Path
from tests.conftest import start

def test_leaves_a_process_running(tmp_path):
    proc = start(["sleep", "300"], tmp_path / "sleep.log", tmp_path)
    Path(os.environ["ALIGNFLOW_TEST_PIDFILE"]).write_text(str(proc.pid))
    time.sleep(600)
"""


def test_the_janitor_stops_what_a_killed_pytest_left_running(tmp_path):
    test_file, pid_file = tmp_path / "inner" / "test_inner.py", tmp_path / "sleep.pid"
    test_file.parent.mkdir()
    test_file.write_text(INNER)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
           "--rootdir", str(test_file.parent), "--basetemp", str(tmp_path / "inner-tmp"), str(test_file)]
    inner = start(cmd, tmp_path / "inner.log", ROOT, {**os.environ, "ALIGNFLOW_TEST_PIDFILE": str(pid_file)})
    left = None
    try:
        left = psutil.Process(int(wait_for("the inner test's process", lambda: pid_file.exists() and
                                           pid_file.read_text(), inner, tmp_path / "inner.log", timeout=120)))
        assert os.getsid(left.pid) != os.getsid(inner.pid)  # a process group kill of pytest would not reach it
        os.kill(inner.pid, signal.SIGKILL)  # pytest dies at once: no fixture teardown, no session end
        inner.wait(timeout=30)
        wait_for("the janitor to stop the process the killed pytest left", lambda: gone(left), timeout=60)
    finally:
        stop_tree(inner, grace=5)
        if left is not None and not gone(left):
            left.kill()
