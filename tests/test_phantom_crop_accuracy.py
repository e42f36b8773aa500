"""The crop-accuracy benchmark reuses a kept dataset only when it is the one asked for."""

import pytest

from benchmarks import phantom_crop_accuracy


def test_a_kept_root_of_other_options_is_refused(tmp_path, capsys):
    args = [
        "--patients",
        "1",
        "--spacing_mm",
        "3",
        "--levels",
        "L1-L3",
        "--workers",
        "1",
        "--root",
        str(tmp_path),
    ]
    assert phantom_crop_accuracy.main(args) in (0, None)
    first = capsys.readouterr().out
    assert "1 phantom patients at 3.0 mm" in first, first
    assert phantom_crop_accuracy.main(args) in (0, None)  # the same: reused
    with pytest.raises(SystemExit, match="holds a dataset of other options: seed 0 \\(asked 5\\)"):
        phantom_crop_accuracy.main([*args, "--seed", "5"])
    with pytest.raises(SystemExit):
        phantom_crop_accuracy.main([*args, "--crop_ap", "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
