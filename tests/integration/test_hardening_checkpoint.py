"""Issue 14, hardening: a checkpoint is loaded without running code from it, unless the user
says it is trusted (``--trust-checkpoint`` / ``trust_checkpoint: true``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.cli import main


class _Payload:
    """Unpickling this writes a file: what a hostile checkpoint would do (or worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture
def hostile(tmp_path):
    import torch

    marker = tmp_path / "pwned.txt"
    path = tmp_path / "hostile.pt"
    torch.save({"model": _Payload(marker), "train_args": {}}, path)
    return path, marker


def test_a_pickle_payload_is_not_run(hostile, capsys):
    from mpq.errors import UserError
    from mpq.model import load_model

    path, marker = hostile
    with pytest.raises(UserError, match="refused.*--trust-checkpoint"):
        load_model(path, 64)
    assert not marker.exists()
    rc = main(["inspect", str(path), "--imgsz", "64"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and "refused" in err
    assert not marker.exists()


def test_trust_checkpoint_is_an_explicit_opt_in(hostile, capsys):
    path, marker = hostile
    rc = main(["inspect", str(path), "--imgsz", "64", "--trust-checkpoint"])
    assert rc != 0  # not a model, but it was unpickled in full: the payload ran, as the flag warns
    assert marker.read_text() == "pwned"
    assert "Traceback" not in capsys.readouterr().err


def test_the_demo_checkpoint_loads_safely(demo_spec):
    from mpq.model import load_model

    assert not demo_spec.trust_checkpoint
    assert load_model(demo_spec.model, demo_spec.imgsz).layers
