"""``search run --workers N``: N worker processes of one study on this machine.

Each worker is an ordinary ``python -m search run ...`` with the same arguments (less
``--workers``), optionally on its own ``--device`` (``cuda:0``, ``cuda:1``, ... round-robin).
They share nothing but the study's storage: Optuna hands each trial to one worker, and
each writes its own artifact directories. This module only starts them, prefixes and
streams their output, forwards Ctrl-C and reports how they ended; it is not a scheduler.

The children run in their own process groups (not sessions: with the kernel's autogroup
scheduling a new session would get a CPU share of its own beside the user's other jobs),
so a Ctrl-C at the terminal reaches only this process, which passes exactly one SIGINT to
each worker (a second Ctrl-C sends SIGKILL). A worker that dies does not stop the others:
they finish the study's budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from mpq.errors import UserError

WORKER_INDEX_ENV = "YOLO_MPQ_WORKER_INDEX"
WORKERS_ENV = "YOLO_MPQ_WORKERS"


def strip_option(argv: Sequence[str], option: str, min_prefix: int = 4) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (or an argparse abbreviation of it).

    Args:
        argv: Command-line arguments.
        option: The long option to drop, e.g. ``--workers``.
        min_prefix: Shortest abbreviation (characters, dashes included) treated as the option.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = arg.partition("=")
        if len(name) >= min_prefix and option.startswith(name) and name.startswith("--"):
            skip = not eq
            continue
        out.append(arg)
    return out


class _Printer:
    """Writes prefixed lines from several threads without interleaving them."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.lock = threading.Lock()

    def line(self, prefix: str, text: str) -> None:
        with self.lock:
            self.out.write(f"{prefix} {text}\n")
            self.out.flush()


def _pump(stream: IO[bytes], prefix: str, printer: _Printer) -> None:
    for raw in iter(stream.readline, b""):
        printer.line(prefix, raw.decode(errors="replace").rstrip("\r\n"))
    stream.close()


def launch_workers(argv: Sequence[str], n: int, devices: Sequence[str] | None = None, *,
                   command: Sequence[str] | None = None, out: IO[str] | None = None,
                   grace_s: float = 60.0) -> int:
    """Run ``n`` workers of ``search run`` and wait for all of them.

    Args:
        argv: The arguments of ``search run`` (a leading ``run`` is dropped); ``--workers``
            is removed, and ``--device`` too when ``devices`` are given.
        n: Number of worker processes (1 or more).
        devices: Devices to hand out round-robin (``--device DEV`` per worker), or None to
            leave ``--device`` as in ``argv``.
        command: The program each worker runs, before its arguments (default:
            ``python -m search run``); tests put a small script here.
        out: Where prefixed worker output goes (default: stdout).
        grace_s: After a forwarded Ctrl-C, how long workers get to finish before SIGKILL.

    Returns:
        0 when every worker exited with 0; 130 when interrupted; otherwise the first
        non-zero exit status, in worker order.

    Raises:
        UserError: ``n`` below 1, or called from inside a worker.
    """
    if n < 1:
        raise UserError(f"--workers must be 1 or more (got {n})")
    if os.environ.get(WORKER_INDEX_ENV) is not None:
        raise UserError(f"already a worker ({WORKER_INDEX_ENV}={os.environ[WORKER_INDEX_ENV]}): "
                        "a worker cannot start workers of its own")
    devs = list(devices) if devices else None
    args = strip_option(argv[1:] if argv and argv[0] == "run" else argv, "--workers")
    if devs:
        args = strip_option(args, "--device")
    base = list(command) if command is not None else [sys.executable, "-m", "search", "run"]
    printer = _Printer(out or sys.stdout)
    workers = [_start(i, n, base + args, devs, printer) for i in range(n)]
    interrupted = _wait(workers, printer, grace_s)
    codes = [int(w.proc.returncode) for w in workers]
    summary = ", ".join(f"{w.prefix.strip('[]')}: {'ok' if c == 0 else f'exit {c}'}"
                        for w, c in zip(workers, codes, strict=True))
    printer.line("[workers]", f"all {n} finished ({summary})")
    if interrupted:
        return 130
    return next((c if c > 0 else 128 - c for c in codes if c != 0), 0)


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    thread: threading.Thread
    prefix: str


def _start(i: int, n: int, cmd: list[str], devs: list[str] | None, printer: _Printer) -> _Worker:
    """Start worker ``i`` of ``n`` in its own process group, its output streamed with a prefix."""
    width = len(str(n - 1))
    dev = devs[i % len(devs)] if devs else None
    cmd = cmd + (["--device", dev] if dev else [])
    prefix = f"[w{i:0{width}d}{' ' + dev if dev else ''}]"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{WORKER_INDEX_ENV: str(i), WORKERS_ENV: str(n)})
    group: dict[str, Any] = ({"process_group": 0} if sys.version_info >= (3, 11)
                             else {"preexec_fn": os.setpgrp})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, **group)
    printer.line(prefix, f"started pid {proc.pid}: {' '.join(cmd)}")
    assert proc.stdout is not None
    thread = threading.Thread(target=_pump, args=(proc.stdout, prefix, printer), daemon=True)
    thread.start()
    return _Worker(proc, thread, prefix)


def _wait(workers: list[_Worker], printer: _Printer, grace_s: float) -> bool:
    """Wait for every worker, forwarding SIGINT/SIGTERM (a second one kills); True if interrupted."""
    procs = [w.proc for w in workers]
    interrupts: list[int] = []
    deadline: list[float] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        interrupts.append(signum)
        running = [p for p in procs if p.poll() is None]
        if len(interrupts) == 1:
            printer.line("[workers]", f"{signal.Signals(signum).name}: stopping {len(running)} worker(s) "
                         f"(again to kill them now)")
            deadline.append(time.monotonic() + grace_s)
            sig = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        else:
            sig = signal.SIGKILL
        for p in running:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        while any(p.poll() is None for p in procs):
            if deadline and time.monotonic() > deadline[0]:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                deadline.clear()
            time.sleep(0.1)
    finally:
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for p in procs:  # an exception here (not a signal) must not leave workers behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for w in workers:
        w.thread.join(5)
    return bool(interrupts)
