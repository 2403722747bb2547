"""runc's failures, classified once (oci/runc.py: classify) from runc's own words."""

from __future__ import annotations

import pytest

from ketch import errdefs
from ketch.oci.runc import RuncError, classify


@pytest.mark.parametrize(
    ("message", "cls"),
    [
        ('runc kill failed: container "c1" does not exist', errdefs.NotFound),
        ("runc kill failed: container not running", errdefs.NotFound),
        ("runc kill failed: os: process already finished", errdefs.NotFound),
        ("runc kill failed: No such process", errdefs.NotFound),
        ("runc delete failed: container does not exist", errdefs.NotFound),
        ("runc resume failed: container not paused", errdefs.FailedPrecondition),
        ("runc exec failed: container paused", errdefs.FailedPrecondition),
        ("runc delete failed: cannot delete container c1 that is not stopped: running",
         errdefs.FailedPrecondition),
        ("runc start failed: cannot start an already running container", errdefs.FailedPrecondition),
        ("runc exec failed: cannot exec in a stopped container", errdefs.FailedPrecondition),
        ("runc create failed: unable to start container process: exec: \"nope\": not found in $PATH",
         errdefs.Unknown),
        ("runc update failed: exit status 1", errdefs.Unknown),
        ("", errdefs.Unknown),
    ],
)
def test_runc_words_map_to_one_class(message: str, cls: type[errdefs.KetchError]) -> None:
    error = classify(message, 1)
    assert isinstance(error, cls)
    assert isinstance(error, RuncError)
    assert error.code == cls.code
    assert (error.message, error.status) == (message, 1)
    others = {errdefs.NotFound, errdefs.FailedPrecondition, errdefs.Unknown} - {cls}
    assert not any(isinstance(error, other) for other in others)


def test_the_status_code_crosses_the_wire() -> None:
    code, text = errdefs.to_status(classify("runc kill failed: container not running", 1))
    assert code == errdefs.Code.NOT_FOUND
    assert text == "runc kill failed: container not running: not found"
