"""Run a command and start it again whenever it exits, as a kubelet does for a Pod (restartPolicy Always).

The operator exits on purpose when it loses its Lease or cannot renew it in time (the write
fence), and counts on being restarted. The lab and the e2e fixtures have no kubelet for it, so
this stands in: restart after an exponential back-off (1 s doubling to 10 s, reset after 60 s of
running, as kubelet's CrashLoopBackOff, shortened), and pass SIGTERM/SIGINT on to the child.

    python -m fabmesh.testenv.supervise -- CMD [ARGS...]
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 10.0
RESET_AFTER_S = 60.0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m fabmesh.testenv.supervise -- CMD [ARGS...]", file=sys.stderr)
        return 2
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff = BACKOFF_START_S
    while True:
        started = time.monotonic()
        child = subprocess.Popen(args)
        code = child.wait()
        if stopping:
            return code
        if time.monotonic() - started > RESET_AFTER_S:
            backoff = BACKOFF_START_S
        print(f"supervise: {args[0]} exited with {code}; starting it again in {backoff:.0f}s",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return code
        backoff = min(backoff * 2, BACKOFF_MAX_S)


if __name__ == "__main__":
    sys.exit(main())
