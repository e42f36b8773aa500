"""``demo.py --quick``: the whole pipeline end to end, and its output layout (a contract)."""

from __future__ import annotations

import json
import re

import pytest

import demo

CONTRACT = (
    "phantom/vertebra_data.json",
    "phantom/raw",
    "phantom/truth/vertebrae.csv",
    "phantom/straightened/CT",
    "phantom/straightened/label",
    "phantom/heatmap",
    "checkpoints/classifier/classifier.pth",
    "checkpoints/healthivert/latest_net_G.pth",
    "synthesis/sagittal/CT_fake",
    "synthesis/sagittal/label_fake",
    "rhlv/gan/rhlv.csv",
    "rhlv/neighbors/rhlv.csv",
    "grading/gan/metrics.json",
    "grading/neighbors/metrics.json",
    "report.html",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "W"
    assert demo.main(["--quick", "--out", str(out), "--gpu_ids", "-1"]) == 0
    return out


@pytest.mark.slow
def test_quick_demo_writes_the_contract_layout(quick_run, capsys):
    out = quick_run
    for rel in CONTRACT:
        assert (out / rel).exists(), rel
    keys = json.loads((out / "phantom/vertebra_data.json").read_text())
    crops = {p.name for p in (out / "phantom/straightened/CT").iterdir()}
    fakes = {p.name for p in (out / "synthesis/sagittal/CT_fake").iterdir()}
    graded = {f"{k}.nii.gz" for split in keys.values() for k in split}
    assert graded <= crops and graded <= fakes  # every graded vertebra was synthesised
    for method in demo.METHODS:
        metrics = json.loads((out / f"grading/{method}/metrics.json").read_text())
        assert {"macro_f1", "macro_precision", "macro_recall", "accuracy"} <= set(metrics)
        assert metrics["classes"] in ("genant", "fracture")


@pytest.mark.slow
def test_quick_demo_report_references_its_outputs(quick_run):
    html = (quick_run / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images, "the report shows no figure"
    for src in images:
        assert (quick_run / src).is_file(), src
    for method in demo.METHODS:
        assert f"grading/{method}/confusion_test.png" in images
    links = re.findall(r'<a href="([^"]+)"', html)
    for src in links:
        assert (quick_run / src).is_file(), src
    for method in demo.METHODS:
        assert f"rhlv/{method}/rhlv.csv" in links and f"grading/{method}/metrics.json" in links
    assert any(src.startswith("figures/") for src in images)  # input / pseudo-healthy / truth / map
    for stage in ("phantom", "straightening", "HealthiVert training", "3D synthesis", "grading (SVM)"):
        assert stage in html
    assert "height MAE (mm)" in html and "RHLV MAE" in html and "macro-F1" in html
    assert "split / vertebrae" in html and "all/all" in html  # the every-split table


def test_split_rows_put_both_methods_side_by_side(tmp_path):
    figures = {
        "gan": {"val/all": {"n": 5, "height_mae_mm": 2.0, "rhlv_mae": 0.05}},
        "neighbors": {
            "val/all": {"n": 5, "height_mae_mm": 1.5, "rhlv_mae": 0.125},
            "test/fractured": {"n": 2, "height_mae_mm": 3.0, "rhlv_mae": None},
        },
    }
    for method, errors in figures.items():
        (tmp_path / "rhlv" / method).mkdir(parents=True)
        (tmp_path / "rhlv" / method / "truth_errors.json").write_text(json.dumps(errors))
    assert demo.split_rows(tmp_path) == [
        ["val/all", 5, "2.00", "1.50", "0.050", "0.125"],
        ["test/fractured", 2, "n/a", "3.00", "n/a", "n/a"],
    ]


@pytest.mark.slow
def test_rerun_reuses_the_trained_runs(quick_run, capsys):
    weights = quick_run / "checkpoints/healthivert/latest_net_G.pth"
    before = weights.stat().st_mtime_ns
    assert demo.main(["--quick", "--out", str(quick_run), "--gpu_ids", "-1"]) == 0
    assert weights.stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert "trained run exists, reused" in out
    assert re.search(r"demo finished in \d+ s .*gan: height MAE .* mm, RHLV MAE .*, macro-F1 ", out)


def test_too_few_patients_is_one_line_and_status_2(tmp_path, capsys):
    assert demo.main(["--quick", "--patients", "2", "--out", str(tmp_path / "W")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "W").exists()
