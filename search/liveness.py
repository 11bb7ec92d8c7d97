"""Whether a worker is still alive: its process, when it runs on this machine.

A worker is named ``host:pid`` (:func:`search.results.worker_id`). On the same host the
process table answers at once whether it is gone; for other hosts only the storage's
heartbeats can tell (after their grace period).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_gone(worker: str) -> bool:
    """Whether ``worker`` ran on this host and its process no longer exists (or is a zombie).

    ``False`` when it cannot be told: another host, a malformed id, or a PID that now belongs
    to some process (the heartbeat then decides).
    """
    host, _, pid_text = str(worker).rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child that its parent has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
