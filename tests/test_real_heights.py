"""The real-data report (``benchmarks.real_heights``) on the shared TPTBox crop."""

import csv

from benchmarks import real_heights
from tests.conftest import shared


def test_report_of_one_shared_mask(tmp_path, capsys):
    data = shared("real/tptbox_l3_ct/vert_msk.nii.gz").parents[2]
    out = tmp_path / "report"
    argv = ["--shared", str(data), "--out", str(out), "--cases", "tptbox_l3", "--spacing_mm", "2"]
    assert real_heights.main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "heights.csv", newline="") as f:
        rows = {int(r["vid"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [21, 22, 23]  # L2, L3, L4; only the asked mask
    assert rows[21]["complete"] == rows[23]["complete"] == "false"  # cut by the field of view
    assert rows[22]["complete"] == "true"
    heights = [float(rows[22][f"height_{r}_mm"]) for r in ("anterior", "middle", "posterior")]
    # L3 at 1 mm: 29.1 / 24.2 / 26.7 mm; these 2 mm crops within a voxel of that
    assert all(abs(h - ref) <= 2.0 for h, ref in zip(heights, (29.1, 24.2, 26.7), strict=True)), heights
    assert (out / "pictures" / "tptbox_l3_22.png").is_file()
    page = (out / "index.html").read_text()
    assert "pictures/tptbox_l3_22.png" in page and "cranial edge" in page
    lines = [line for line in printed.splitlines() if "tptbox_l3" in line and " L" in line]
    assert len(lines) == 3 and "L2 CUT body cut by the scan's cranial edge" in lines[0]
    assert lines[0].rstrip().endswith("edge")  # no empty tilt after a cut vertebra
    assert "tilt" in lines[1]
