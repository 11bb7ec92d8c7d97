"""``search.workers.launch_workers`` with real child processes (a tiny script, not the search)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mpq.errors import UserError
from search.workers import launch_workers, strip_option

CHILD = textwrap.dedent("""
    import os, sys, time
    i = int(os.environ["YOLO_MPQ_WORKER_INDEX"])
    print(f"args={' '.join(sys.argv[1:])} index={i} of={os.environ['YOLO_MPQ_WORKERS']}", flush=True)
    print("second line", flush=True)
    fail = os.environ.get("CHILD_FAIL_INDEX")
    sys.exit(3 if fail is not None and int(fail) == i else 0)
""")

SLEEPER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    Path(sys.argv[1], f"pid{os.environ['YOLO_MPQ_WORKER_INDEX']}").write_text(str(os.getpid()))
    print("ready", flush=True)
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        print("child got SIGINT, cleaning up", flush=True)
        sys.exit(130)
""")


@pytest.fixture
def child(tmp_path) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return [sys.executable, str(path)]


def _lines(buf: io.StringIO, prefix: str) -> list[str]:
    return [line[len(prefix) + 1:] for line in buf.getvalue().splitlines() if line.startswith(prefix + " ")]


def test_strip_option_forms():
    argv = ["--study", "s.yaml", "--workers", "2", "--budget", "6", "--workers=3", "--work", "4", "--device=cuda:1"]
    assert strip_option(argv, "--workers") == ["--study", "s.yaml", "--budget", "6", "--device=cuda:1"]
    assert strip_option(["--device", "cpu", "-v"], "--device") == ["-v"]
    assert strip_option(["--dev", "cpu"], "--device") == []
    assert strip_option(["--d", "x"], "--device") == ["--d", "x"]  # too short to be taken for it


def test_workers_get_same_args_own_device_and_prefixed_output(child):
    buf = io.StringIO()
    rc = launch_workers(["run", "--study", "s.yaml", "--workers", "3", "--device", "cpu", "--budget", "6"], 3,
                        ["cuda:0", "cuda:1"], command=child, out=buf)
    assert rc == 0, buf.getvalue()
    expect = {"[w0 cuda:0]": ("cuda:0", 0), "[w1 cuda:1]": ("cuda:1", 1), "[w2 cuda:0]": ("cuda:0", 2)}
    for prefix, (dev, index) in expect.items():
        lines = _lines(buf, prefix)
        assert f"args=--study s.yaml --budget 6 --device {dev} index={index} of=3" in lines, buf.getvalue()
        assert "second line" in lines
    assert "all 3 finished" in buf.getvalue()


def test_without_devices_argv_device_is_kept(child):
    buf = io.StringIO()
    assert launch_workers(["--device", "cpu", "--workers=2"], 2, None, command=child, out=buf) == 0
    assert "args=--device cpu index=1 of=2" in _lines(buf, "[w1]")


def test_a_failed_worker_makes_the_result_non_zero_others_finish(child, monkeypatch):
    monkeypatch.setenv("CHILD_FAIL_INDEX", "1")
    buf = io.StringIO()
    rc = launch_workers([], 3, None, command=child, out=buf)
    assert rc == 3
    assert "w0: ok, w1: exit 3, w2: ok" in buf.getvalue()


def test_bad_worker_counts_and_nesting(child, monkeypatch):
    with pytest.raises(UserError, match="1 or more"):
        launch_workers([], 0, command=child)
    monkeypatch.setenv("YOLO_MPQ_WORKER_INDEX", "0")
    with pytest.raises(UserError, match="cannot start workers"):
        launch_workers([], 2, command=child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_ctrl_c_is_forwarded_once_to_every_worker(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    launcher = (f"import sys; from search.workers import launch_workers; "
                f"sys.exit(launch_workers([{str(tmp_path)!r}], 2, command=[sys.executable, {str(script)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pids: list[int] = []
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        pids = [int(p.read_text()) for p in tmp_path.glob("pid*") if p.read_text()]
        time.sleep(0.1)
    assert len(pids) == 2, "workers did not start"
    for pid in pids:  # own process group (no terminal Ctrl-C), same session (same CPU share)
        assert os.getpgid(pid) == pid != os.getpgid(proc.pid)
        assert os.getsid(pid) == os.getsid(proc.pid)
    time.sleep(0.5)  # let them reach sleep()
    proc.send_signal(signal.SIGINT)  # the launcher only: workers are in their own process groups
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert out.count("child got SIGINT, cleaning up") == 2, out
    assert "w0: exit 130, w1: exit 130" in out
    assert not any(_alive(pid) for pid in pids)
