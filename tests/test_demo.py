"""``demo.py --quick``: the whole pipeline end to end, and its output layout (a contract)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import demo
from models.synthesis import NEIGHBOUR_MODES
from options.train_options import TrainOptions
from util import checkpoint as demo_checkpoint

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
    # the run records the grid of the crops it was trained on, for the synthesis to check
    grids = json.loads((out / "checkpoints/healthivert/train_crops.json").read_text())["geometries"]
    assert len(grids) == 1 and grids[0]["crops"] >= 1
    assert grids[0]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert [n * 2.0 for n in grids[0]["shape"]] == list(demo.QUICK.crop_mm)


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
    assert "between the neighbours the scan has (--neighbours real)" in html  # the synthesis order


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


def quick_opt(out, *extra):
    return demo.build_parser().parse_args(["--quick", "--out", str(out), "--gpu_ids", "-1", *extra])


def stamp_of(opt):
    return demo.settings_of(opt, demo.QUICK)


@pytest.mark.parametrize("bad", [["--spacing_mm", "nan"], ["--spacing_mm", "inf"], ["--seed", "-1"]])
def test_bad_options_are_one_line_and_status_2(tmp_path, capsys, bad):
    assert demo.main(["--quick", "--out", str(tmp_path / "W"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and bad[0] in err
    assert not (tmp_path / "W").exists()


def test_other_settings_are_refused_and_w_is_left_alone(tmp_path, capsys):
    out = tmp_path / "W"
    assert demo.claim_output(out, stamp_of(quick_opt(out, "--seed", "7")), overwrite=False) is None
    (out / "phantom").mkdir()
    (out / "phantom" / "vertebra_data.json").write_text("{}")
    assert demo.main(["--quick", "--out", str(out), "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "--seed 7 there, 0 now" in err and "--overwrite" in err and "--out" in err
    assert json.loads((out / demo.SETTINGS_FILE).read_text())["seed"] == 7
    assert (out / "phantom" / "vertebra_data.json").exists()
    # the same settings are accepted as they are
    assert demo.claim_output(out, stamp_of(quick_opt(out, "--seed", "7")), overwrite=False) is None
    assert (out / "phantom" / "vertebra_data.json").exists()


def test_outputs_without_a_stamp_are_refused(tmp_path, capsys):
    out = tmp_path / "W"
    (out / "checkpoints" / "healthivert").mkdir(parents=True)
    assert demo.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and demo.SETTINGS_FILE in err
    assert not (out / demo.SETTINGS_FILE).exists()


def test_overwrite_removes_the_old_outputs_only(tmp_path):
    out = tmp_path / "W"
    demo.claim_output(out, stamp_of(quick_opt(out, "--seed", "7")), overwrite=False)
    for rel in ("phantom/raw/phantom000", "synthesis/sagittal/CT_fake", "checkpoints/healthivert", "mine"):
        (out / rel).mkdir(parents=True)
    (out / "report.html").write_text("old")
    stamp = stamp_of(quick_opt(out))
    assert demo.claim_output(out, stamp, overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "demo_settings.json", "mine"]
    assert not any((out / "checkpoints").iterdir())
    assert json.loads((out / demo.SETTINGS_FILE).read_text()) == stamp


def test_phantom_stage_clears_a_half_written_phantom_and_what_came_from_it(tmp_path, monkeypatch):
    out = tmp_path / "W"
    pipe = demo.Pipeline(out, quick_opt(out), demo.QUICK)
    (out / "phantom" / "raw" / "phantom005").mkdir(parents=True)  # no vertebra_data.json: unfinished
    (out / "checkpoints" / "classifier").mkdir(parents=True)
    calls = []

    def fake_generate(root, *args, **kwargs):
        calls.append(root)
        assert (
            not (root / "raw" / "phantom005").exists() and not (out / "checkpoints" / "classifier").exists()
        )

    monkeypatch.setattr(demo, "generate", fake_generate)
    pipe.phantom()
    assert calls == [out / "phantom"]


def save_train_state(run, epoch, batches_done):
    run.mkdir(parents=True, exist_ok=True)
    for name in ("latest_net_G.pth", "opt.json"):
        (run / name).write_bytes(b"x")
    demo_checkpoint.save_checkpoint(
        {"epoch": epoch, "batches_done": batches_done}, run / "latest_train_state.pth"
    )


@pytest.mark.parametrize(
    ("state", "trains", "resumes"),
    [
        (None, True, False),  # latest_net_G.pth and opt.json alone: not a finished run
        ((0, 1), True, True),  # a mid-epoch save of the first epoch
        ((1, 0), False, False),  # QUICK trains 1 + 0 epochs: finished
    ],
)
def test_training_is_reused_only_when_its_train_state_says_finished(
    tmp_path, monkeypatch, capsys, state, trains, resumes
):
    out = tmp_path / "W"
    run = out / "checkpoints" / "healthivert"
    if state is None:
        run.mkdir(parents=True)
        for name in ("latest_net_G.pth", "opt.json"):
            (run / name).write_bytes(b"x")
    else:
        save_train_state(run, *state)
    calls = []
    monkeypatch.setattr(demo.train, "main", lambda argv: calls.append(argv) or 0)
    demo.Pipeline(out, quick_opt(out), demo.QUICK).train()
    assert bool(calls) == trains
    if trains:
        assert ("--continue_train" in calls[0]) == resumes
        if resumes:
            assert calls[0][calls[0].index("--epoch") + 1] == "latest"
    else:
        assert "trained run exists, reused" in capsys.readouterr().out


@pytest.mark.parametrize("settings", [demo.DEFAULT, demo.QUICK])
def test_the_target_is_synthesised_between_its_real_neighbours(tmp_path, monkeypatch, settings):
    """The demo's synthesis leaves the neighbours as the scan has them (README: closer to the truth
    than the reference's order on the train and val splits of two training seeds)."""
    out = tmp_path / "W"
    calls = []
    monkeypatch.setattr(demo.eval_3d_sagittal_twostage, "main", lambda argv: calls.append(argv) or 0)
    demo.Pipeline(out, quick_opt(out), settings).synthesise()
    (argv,) = calls
    assert argv[argv.index("--neighbours") + 1] == "real"
    assert demo.settings_of(quick_opt(out), settings)["neighbours"] == "real"  # in the stamp
    assert set(demo.SYNTHESIS_ORDER) == set(NEIGHBOUR_MODES)  # the report names every order


def test_the_default_trains_720_iterations_of_batch_4(tmp_path):
    """The default demo's training: 120 epochs (90 + 30 decaying) of batch 4, the 720 iterations
    README measured against the earlier 240 of batch 8 on three seeds ("Three times the
    iterations"); a folder left by the earlier default is refused, not mixed, through the stamp."""
    out = tmp_path / "W"
    opt = demo.build_parser().parse_args(["--out", str(out), "--gpu_ids", "-1"])
    argv = demo.Pipeline(out, opt, demo.DEFAULT).train_argv()
    parsed = TrainOptions().parse(argv)
    assert (parsed.batch_size, parsed.n_epochs, parsed.n_epochs_decay) == (4, 90, 30)
    assert (parsed.ndf, parsed.seed) == (32, 0)
    earlier = dataclasses.replace(demo.DEFAULT, train_epochs=60, train_decay_epochs=20, batch_size=8)
    assert demo.settings_of(opt, earlier) != demo.settings_of(opt, demo.DEFAULT)


@pytest.mark.parametrize(
    ("state", "change"), [((1, 0), None), ((1, 0), "masked"), ((0, 1), "masked"), ((1, 0), "absent")]
)
def test_a_run_trained_with_other_options_is_trained_again(tmp_path, monkeypatch, capsys, state, change):
    """A finished (or unfinished) run whose opt.json holds other options than train.py would now
    train with (a demo folder left by a version with other defaults), or lacks one (saved before
    the option existed: what that code did is unknown), starts over."""
    out = tmp_path / "W"
    run = out / "checkpoints" / "healthivert"
    save_train_state(run, *state)
    pipeline = demo.Pipeline(out, quick_opt(out), demo.QUICK)
    saved = vars(TrainOptions().parse(pipeline.train_argv()))
    saved.update(gpu_ids=[], display_id=1, continue_train=True, epoch="3")  # where and how: not compared
    if change == "absent":
        del saved["fine_input"]
    elif change:
        saved["fine_input"] = change
    (run / "opt.json").write_text(json.dumps(saved))
    calls = []
    monkeypatch.setattr(demo.train, "main", lambda argv: calls.append(argv) or 0)
    pipeline.train()
    out_text = capsys.readouterr().out
    if change:
        assert len(calls) == 1 and "--continue_train" not in calls[0]
        said = f"{change} there"
        if change == "absent":
            said = "not recorded there (saved before the option existed)"
        assert f"--fine_input {said}, composite now" in out_text
    else:
        assert not calls and "trained run exists, reused" in out_text


@pytest.mark.parametrize("config", [None, "{}"])
def test_classifier_without_its_json_is_trained_again(tmp_path, monkeypatch, config):
    """Weights without their JSON (written before it), or with a JSON that records no options (it
    says nothing of how they were trained), are trained again."""
    out = tmp_path / "W"
    run = out / "checkpoints" / "classifier"
    run.mkdir(parents=True)
    (run / "classifier.pth").write_bytes(b"x")  # written before classifier.json
    if config is not None:
        (run / "classifier.json").write_text(config)
    calls = {}
    for script in (demo.train_classifier, demo.grad_CAM_3d_sagittal):
        monkeypatch.setattr(
            script, "main", lambda argv, _name=script.__name__: calls.update({_name: argv}) or 0
        )
    demo.Pipeline(out, quick_opt(out), demo.QUICK).attention()
    assert len(calls) == 2
    for argv in calls.values():
        assert "--overwrite" in argv


@pytest.mark.parametrize("central_fraction, split", [(0.3, "same"), (None, "same"), (None, "other")])
def test_classifier_trained_with_other_options_is_trained_again(
    tmp_path, monkeypatch, capsys, central_fraction, split
):
    """A classifier left by a demo with other classifier options (an older default), or trained on
    another split, is not reused."""
    out = tmp_path / "W"
    write_split(out / "phantom", {"train": {"phantom000_20": 0}, "val": {"phantom001_20": 0}})
    digest = demo.train_classifier.split_digest(out / "phantom" / "vertebra_data.json")
    pipeline = demo.Pipeline(out, quick_opt(out), demo.QUICK)
    calls = {}
    for script in (demo.train_classifier, demo.grad_CAM_3d_sagittal):
        monkeypatch.setattr(
            script, "main", lambda argv, _name=script.__name__: calls.update({_name: argv}) or 0
        )
    pipeline.attention()  # nothing there yet: trained
    argv = calls[demo.train_classifier.__name__]
    options = vars(demo.train_classifier.build_parser().parse_args(argv))
    if central_fraction is not None:
        options["central_fraction"] = central_fraction
    run = out / "checkpoints" / "classifier"
    run.mkdir(parents=True, exist_ok=True)
    (run / "classifier.pth").write_bytes(b"x")
    extra = {"options": options, "split_sha256": digest if split == "same" else "0" * 16}
    (run / "classifier.json").write_text(json.dumps({"extra": extra}))
    calls.clear()
    capsys.readouterr()
    demo.Pipeline(out, quick_opt(out), demo.QUICK).attention()  # a rerun of the demo
    again = central_fraction is not None or split == "other"
    for argv in calls.values():
        assert ("--overwrite" in argv) == again
    said = capsys.readouterr().out
    assert ("--central_fraction 0.3 there, 0.6 now" in said) == (central_fraction is not None)
    assert ("another split file contents there" in said) == (split == "other")


def write_split(root, split):
    root.mkdir(parents=True, exist_ok=True)
    (root / "vertebra_data.json").write_text(json.dumps(split))


def test_report_describes_the_test_split_from_the_split_file(tmp_path):
    test = {
        "phantom003_20": 0,
        "phantom003_21": 2,
        "phantom003_22": 1,
        "phantom006_20": 0,
        "phantom006_21": 0,
    }
    write_split(tmp_path, {"train": {}, "val": {}, "test": test})
    text = demo.describe_test_split(tmp_path)
    assert "2 patients" in text and "2 fractured vertebrae are all in one of them" in text
    test["phantom006_21"] = 3
    write_split(tmp_path, {"test": test})
    assert "3 fractured vertebrae are in 2 of them" in demo.describe_test_split(tmp_path)
    write_split(tmp_path, {"test": {"phantom001_20": 0}})
    assert "a single patient (1 vertebrae, 0 of them fractured)" in demo.describe_test_split(tmp_path)
    write_split(tmp_path, {"test": {"phantom001_20": 0, "phantom002_20": 0}})
    assert "2 patients (2 vertebrae) with no fractured vertebra" in demo.describe_test_split(tmp_path)


def test_headline_counts_the_graded_test_vertebrae_apart_from_the_fractured(tmp_path):
    for method in demo.METHODS:
        (tmp_path / "rhlv" / method).mkdir(parents=True)
        errors = {"test/fractured": {"n": 4, "height_mae_mm": 2.0, "rhlv_mae": 0.1}}
        (tmp_path / "rhlv" / method / "truth_errors.json").write_text(json.dumps(errors))
        (tmp_path / "grading" / method).mkdir(parents=True)
        metrics = {"macro_f1": 0.9, "accuracy": 0.9, "classes": "fracture", "test": {"n": 16}}
        (tmp_path / "grading" / method / "metrics.json").write_text(json.dumps(metrics))
    figures = demo.headline(tmp_path)
    assert figures["gan"]["n"] == 4 and figures["gan"]["graded"] == 16
