"""Issue 14, hardening: I/O failures (not a folder, read-only, not permitted, disk full) and an
unreachable storage are one-line errors naming the path, and leave earlier work intact."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from search.cli import main

pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture
def wide_console(monkeypatch):
    """Rich wraps at 80 columns under pytest: one error stays one line."""
    from search.console import console_err

    monkeypatch.setattr(console_err, "width", 1000)

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp: Path, runs_dir: Path) -> Path:
    data = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    data["runs_dir"] = str(runs_dir)
    data["name"] = "io"
    path = tmp / "io.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _fails_in_one_line(capsys, *argv: str) -> str:
    """The one error line of a failed command (nothing else but the study's banner and progress)."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)  # lazy: a closed-late handle


def test_runs_dir_that_is_a_regular_file(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    line = _fails_in_one_line(capsys, "run", "--study", str(_spec(tmp_path, runs)), "--no-report")
    assert str(runs) in line and "not a directory" in line.lower()
    assert runs.read_text() == "not a folder"


def test_runs_dir_not_permitted(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (the read-only filesystem test covers this as root)")
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o555)
    line = _fails_in_one_line(capsys, "run", "--study", str(_spec(tmp_path, runs)), "--no-report")
    assert str(runs) in line


@pytest.mark.parametrize("existing", [False, True])
def test_an_immutable_folder(tmp_path, capsys, existing):
    runs = tmp_path / "runs"
    (runs / "io" if existing else runs).mkdir(parents=True)
    target = runs / "io" if existing else runs
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        line = _fails_in_one_line(capsys, "run", "--study", str(_spec(tmp_path, runs)), "--no-report")
        assert str(runs / "io") in line and ("not permitted" in line or "not writable" in line)
    finally:
        subprocess.run(["chattr", "-i", str(target)], capture_output=True)


def test_runs_dir_on_a_read_only_filesystem(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        line = _fails_in_one_line(capsys, "run", "--study", str(_spec(tmp_path, ro / "runs")), "--no-report")
        assert str(ro / "runs") in line and "read-only" in line.lower()


def test_runs_dir_on_a_full_disk(tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "size=64k") as full:
        with contextlib.suppress(OSError):
            (full / "filler").write_bytes(b"\0" * 256 * 1024)
        line = _fails_in_one_line(capsys, "run", "--study", str(_spec(tmp_path, full / "runs")), "--no-report")
        assert "full" in line.lower() or "space" in line.lower()
        assert not [p for p in (full / "runs").rglob("*") if p.name.endswith(".tmp")]  # no half-written file


def test_an_unreachable_storage_leaves_the_run_files_as_they_were(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = runs / "io"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text("earlier: work\n")
    bad = "postgresql://mpq:s3cret@127.0.0.1:1/nowhere"
    line = _fails_in_one_line(capsys, "run", "--study", str(_spec(tmp_path, runs)), "--storage", bad,
                              "--no-report")
    assert "127.0.0.1:1" in line and "s3cret" not in line
    assert (run_dir / "spec.yaml").read_text() == "earlier: work\n"
    assert not (run_dir / "env.json").exists()
