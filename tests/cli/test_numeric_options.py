"""Numeric options are checked when the command line is parsed (issue 20): before any file is read."""

from __future__ import annotations

import pytest

from qconvert.cli import main

BAD = [
    ("eval", "--threads", "-1"), ("eval", "--threads", "0"), ("eval", "--chunks", "0"),
    ("convert", "--threads", "0"), ("calibrate", "--threads", "-2"), ("imatrix", "--threads", "0"),
    ("calibrate", "--num-samples", "0"), ("calibrate", "--seq-len", "0"), ("imatrix", "--ctx-size", "8"),
    ("quantize", "--num-samples", "0"), ("quantize", "--seq-len", "-5"), ("eval", "--threads", "x"),
]


@pytest.mark.parametrize("command,option,value", BAD)
def test_a_bad_number_is_refused_before_the_model_is_opened(command, option, value, capsys, tmp_path):
    missing = tmp_path / "no-such-model"  # never reached: the option fails first
    with pytest.raises(SystemExit) as e:
        data = [] if command == "convert" else ["--dataset", "x.txt"]
        main([command, str(missing), *data, option, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("qconvert: error: Invalid value for") and option in err[0]
    assert "no-such-model" not in err[0]
