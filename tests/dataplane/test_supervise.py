"""The lab's stand-in for a kubelet's restartPolicy: an exited operator is started again; SIGTERM ends both."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from fabmesh.testenv.hosts import wait_for


def test_an_exited_command_is_started_again_and_sigterm_stops_supervisor_and_child(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = f"echo run >> {runs}; [ $(wc -l < {runs}) -ge 2 ] && exec sleep 60; exit 3"
    sup = subprocess.Popen([sys.executable, "-m", "fabmesh.testenv.supervise", "--", "sh", "-c", script],
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: runs.exists() and runs.read_text().count("run") == 2, timeout=20,
                 what="the command to be started a second time")
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=10) != 0  # the child's exit status (killed by SIGTERM) is passed on
        _, err = sup.communicate()
        assert "exited with 3; starting it again" in err
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
