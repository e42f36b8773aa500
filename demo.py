"""HealthiVert demo: the whole pipeline, end to end, on an embedded synthetic phantom.

    python demo.py [--out demo_output] [--seed 0] [--patients 8] [--spacing_mm 2.0] [--quick] [--overwrite]

It needs no data and no downloads. On a phantom whose pre-fracture anatomy is known it runs:

1. the phantom (CT, vertebra masks, and the same patients before their fractures);
2. centroids, straightening and de-pedicled crops, as for real scans;
3. the fracture classifier and its Grad-CAM++ maps (HGAM);
4. HealthiVert training (sagittal, with the maps);
5. 3D synthesis of every graded vertebra's pseudo-healthy twin, between the neighbours the scan
   has (``--neighbours real``; the SVM fits on the train and val splits and is scored on test, so
   all of them are needed);
6. RHLV against the GAN's twin and against the neighbour baseline (with the truth's errors);
7. Genant grading (SVM) from each; when there are too few vertebrae per grade for its
   cross-validation, fracture / no fracture instead (the report says so);
8. metrics of the pseudo-healthy vertebrae of the test split against the true pre-fracture anatomy;

and writes ``<out>/report.html``. Output layout (a contract: other tools read it)::

    W/phantom/                  the dataset root: raw/, truth/, straightened/, heatmap/, vertebra_data.json
    W/checkpoints/<name>/       the trained runs (classifier, healthivert)
    W/synthesis/<plane>/CT_fake/, W/synthesis/<plane>/label_fake/
    W/rhlv/gan/rhlv.csv, W/rhlv/neighbors/rhlv.csv
    W/grading/gan/metrics.json, W/grading/neighbors/metrics.json
    W/metrics/                  generation metrics against the truth (summary.json, truth_eval.csv)
    W/report.html

Every stage runs in this process through its script's ``main(argv)`` and skips what is already
finished, so a rerun reuses the trained runs and an interrupted training resumes from its last
checkpoint (``--continue_train``); a training counts as finished only when its train state says it
ran all its epochs. ``W/demo_settings.json``, written before the first stage, holds the options
that decide the results (seed, patients, spacing, the --quick sizes); a rerun with other options
is refused (one ``error:`` line, status 2) rather than mixing two runs' outputs: pass
``--overwrite``, which removes the demo's outputs in W and redoes everything, or another ``--out``.
A trained run whose saved options differ from those this version would train with (another
version's defaults) is trained again, saying which options differ.
``--quick`` is a tiny run (few patients, a few iterations) for the tests: its numbers mean nothing.

Sizes: the default is 8 patients (T10-L5, 64 vertebrae), 2 mm crops of 192 x 128 x 64 mm, a 3-epoch
classifier and 120 HealthiVert epochs (90 constant, 30 decaying; 720 iterations of batch 4: one slice
per normal train vertebra per epoch) with discriminators of half the reference's width (``--ndf 32``:
an iteration takes 0.6 of the time, and on the train and val splits the pseudo-healthy heights came
closer to the truth than with 120 iterations at ``--ndf 64`` in the same time budget), chosen so the
whole run fits 20 minutes on 2 CPU cores. Three times the iterations of the earlier 240 of batch 8, on
1.5 times its samples (training 503 s against 274 s, README), brought the pseudo-healthy heights
closer to the truth on 9 of the 12 train and val rows of three training seeds (README, "Three times
the iterations"). That GAN is still far less trained than a real run.
Torch runs on one thread by default (``--torch_threads``): on a shared machine tiny convolutions are
several times faster so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import eval_3d_sagittal_twostage  # noqa: E402
import train  # noqa: E402
from Attention import grad_CAM_3d_sagittal, train_classifier  # noqa: E402
from Attention.classifier import config_path  # noqa: E402
from data import phantom as phantom_cli  # noqa: E402
from data.crops import CropStore  # noqa: E402
from data.label_schemes import vertebra_name  # noqa: E402
from data.phantom import generate  # noqa: E402
from evaluation import RHLV_quantification, SVM_grading, generation_eval_sagittal  # noqa: E402
from evaluation import generation_metrics as gm  # noqa: E402
from evaluation.eval_io import load_fake  # noqa: E402
from options.base_options import option_changes  # noqa: E402
from options.train_options import TrainOptions, not_learning_options  # noqa: E402
from straighten import location_json_local, straighten_mask_3d  # noqa: E402
from util.atomic import write_json  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.errors import InputError  # noqa: E402
from util.plotting import draw_slice, save_figure  # noqa: E402
from util.report import Report  # noqa: E402

PLANE = "sagittal"
METHODS = ("gan", "neighbors")
SETTINGS_FILE = "demo_settings.json"
OPTION_KEYS = ("quick", "seed", "patients", "spacing_mm")  # the stamp's keys that are options
# what the stages write in W (the contract and the report's figures); --overwrite removes them
OUTPUTS = (
    "phantom",
    "checkpoints/classifier",
    "checkpoints/healthivert",
    "synthesis",
    "rhlv",
    "grading",
    "metrics",
    "figures",
    "report.html",
)


@dataclass(frozen=True)
class Settings:
    """Sizes of one demo run (the default, or the tiny ``--quick`` one)."""

    patients: int
    levels: str
    fracture_fraction: float
    crop_mm: tuple[float, float, float]  # spine, AP, LR
    classifier_epochs: int
    classifier_iters: int  # per epoch; 0 = one pass over the train slices
    train_epochs: int
    train_decay_epochs: int
    train_max_samples: int  # samples per epoch (--max_dataset_size)
    batch_size: int
    ndf: int  # the discriminators' width (train.py's default, the reference's, is 64)
    folds: int
    # the synthesis's --neighbours: "real" (the target once, between the neighbours the scan has) was
    # closer to the truth than the reference's order on 7 of the 8 train and val rows of two training
    # seeds (README, "The target between its real neighbours")
    neighbours: str


# how the report names each synthesis order (eval_3d_sagittal_twostage.py --neighbours)
SYNTHESIS_ORDER = {
    "real": "each twin drawn once, between the neighbours the scan has",
    "synthesise": "each neighbour replaced by its twin first, then the target (the reference's order)",
}

DEFAULT = Settings(
    patients=8,
    levels="T10-L5",
    fracture_fraction=0.3,
    crop_mm=(192.0, 128.0, 64.0),
    classifier_epochs=3,
    classifier_iters=0,
    train_epochs=90,
    train_decay_epochs=30,
    train_max_samples=240,
    batch_size=4,
    ndf=32,
    folds=3,
    neighbours="real",
)
QUICK = Settings(
    patients=3,
    levels="T12-L3",
    fracture_fraction=0.5,
    crop_mm=(128.0, 96.0, 48.0),
    classifier_epochs=1,
    classifier_iters=3,
    train_epochs=1,
    train_decay_epochs=0,
    train_max_samples=8,
    batch_size=4,
    ndf=32,
    folds=2,
    neighbours="real",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_output", help="output folder (W)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the phantom and the training")
    parser.add_argument("--patients", type=int, default=None, help="phantom patients (default 8, quick 3)")
    parser.add_argument("--spacing_mm", type=float, default=2.0, help="voxel size of the phantom and crops")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (numbers mean nothing)")
    parser.add_argument("--overwrite", action="store_true", help="redo every stage, trained runs included")
    parser.add_argument("--gpu_ids", default="auto", help="'auto', '-1' for the CPU, or '0'")
    parser.add_argument("--torch_threads", type=int, default=1, help="torch CPU threads (0: all cores)")
    return parser


class StageError(RuntimeError):
    """A stage's script returned a non-zero status (it printed why)."""


def settings_of(opt: argparse.Namespace, settings: Settings) -> dict:
    """What decides a run's results (the stamp ``W/demo_settings.json``); --out, --gpu_ids,
    --torch_threads and --overwrite do not."""
    stamp = {"seed": opt.seed, "spacing_mm": opt.spacing_mm, "quick": opt.quick}
    stamp.update(dataclasses.asdict(settings))
    return json.loads(json.dumps(stamp))  # as read back (tuples become lists)


def option_problem(opt: argparse.Namespace, settings: Settings) -> str | None:
    """The first thing wrong with the options, before any work starts, or None (the phantom
    command's checks, on the phantom this run would draw)."""
    if settings.patients < 3:
        return "--patients must be at least 3 (train, val and test splits)"
    if opt.torch_threads < 0:
        return f"--torch_threads must be >= 0, got {opt.torch_threads}"
    out = Path(opt.out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    phantom_opt = argparse.Namespace(
        seed=opt.seed,
        patients=settings.patients,
        workers=1,
        spacing_mm=opt.spacing_mm,
        fracture_fraction=settings.fracture_fraction,
        out=str(out / "phantom"),
        levels=settings.levels,
    )
    return phantom_cli.option_problem(phantom_opt)


def clear_outputs(out: Path) -> None:
    """Remove the stages' outputs in W (``OUTPUTS``) and nothing else."""
    for rel in OUTPUTS:
        path = out / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def claim_output(out: Path, stamp: dict, overwrite: bool) -> str | None:
    """Make W hold this run's settings stamp, or say why not (W holds another run's outputs).

    With ``overwrite`` the old outputs are removed first; otherwise W is reused only when its
    stamp equals this run's settings (or it holds no outputs yet)."""
    path = out / SETTINGS_FILE
    if overwrite:
        path.unlink(missing_ok=True)
        clear_outputs(out)
    elif path.exists():
        try:
            saved = read_json(path)
        except (OSError, ValueError) as exc:
            return f"{path}: unreadable ({exc}); pass --overwrite to redo the demo in {out}, or another --out"
        if saved != stamp:
            differ = [k for k in sorted(set(saved) | set(stamp)) if saved.get(k) != stamp.get(k)]
            diff = [f"--{k} {saved.get(k)} there, {stamp.get(k)} now" for k in OPTION_KEYS if k in differ]
            if not diff:  # the same options, but this demo's sizes changed
                diff = [f"the demo's sizes differ: {', '.join(differ)}"]
            return (
                f"{out} holds a demo run made with other settings ({'; '.join(diff)}); pass --overwrite "
                "to redo it with these, or another --out"
            )
        return None
    elif any((out / rel).exists() for rel in OUTPUTS):
        return (
            f"{out} holds demo outputs without {SETTINGS_FILE} (an older demo, or not a demo's), so "
            "it cannot tell which settings made them; pass --overwrite to redo them, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, stamp)
    return None


def run_option_changes(run: Path, argv: list[str]) -> list[str]:
    """The options train.py would train ``argv`` with otherwise than the run saved in ``run``
    (its ``opt.json``), :func:`options.train_options.not_learning_options` aside; empty without a
    readable opt.json."""
    try:
        saved = json.loads((run / "opt.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict):
        return []
    now = TrainOptions().parse(argv)
    return option_changes(saved, now, not_learning_options(now))


def train_progress(run: Path) -> tuple[int, int] | None:
    """(last finished epoch, batches done of the next) from ``latest_train_state.pth``, or None
    when there is none (or it cannot be read: then the run trains from the start)."""
    path = run / "latest_train_state.pth"
    if not path.exists() or not (run / "latest_net_G.pth").exists():
        return None
    try:
        state = load_checkpoint(path)
    except InputError as exc:
        print(f"warning: {exc}; training from the start", file=sys.stderr)
        return None
    return int(state.get("epoch", 0)), int(state.get("batches_done", 0))


def written_since(folder: Path, result: Path) -> bool:
    """Whether a volume under ``folder`` is newer than ``result`` (False without ``result``)."""
    try:
        made = result.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return any(path.stat().st_mtime_ns > made for path in folder.rglob("*.nii.gz"))


class Pipeline:
    """Runs the stages in order, timing each."""

    def __init__(self, out: Path, opt: argparse.Namespace, settings: Settings):
        self.out, self.opt, self.s = out, opt, settings
        self.root = out / "phantom"
        self.checkpoints = out / "checkpoints"
        self.synthesis = out / "synthesis" / PLANE
        self.times: list[tuple[str, float]] = []
        # set once a stage made new results (a classifier or a HealthiVert run trained in this
        # process): what later stages finished before was made from the old ones, so they redo it
        self.redo = False

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        fn()
        self.times.append((name, time.perf_counter() - start))

    def call(self, script, argv: list[str]) -> int:
        argv = [*argv, "--overwrite"] if self.opt.overwrite or self.redo else argv
        return script.main(argv)

    def check(self, script, argv: list[str]) -> None:
        if self.call(script, argv) != 0:
            raise StageError(f"{script.__name__} {' '.join(argv)}")

    # --- stages -------------------------------------------------------------------------------
    def phantom(self) -> None:
        if (self.root / "vertebra_data.json").exists() and not self.opt.overwrite:
            print(f"{self.root}: phantom exists, reused")
            return
        # no finished phantom (its split file is written last): whatever a half-written one left,
        # and anything made from it, goes before the new one is drawn
        clear_outputs(self.out)
        s = self.s
        spacing = self.opt.spacing_mm
        generate(self.root, s.patients, self.opt.seed, spacing, s.levels, s.fracture_fraction, overwrite=True)

    def straighten(self) -> None:
        root = str(self.root)
        self.check(location_json_local, ["--dataroot", root])
        argv = ["--dataroot", root, "--spacing_mm", str(self.opt.spacing_mm), "--crop_mm"]
        self.check(straighten_mask_3d, argv + [str(mm) for mm in self.s.crop_mm])

    def attention(self) -> None:
        root = str(self.root)
        argv = ["--dataroot", root, "--checkpoints_dir", str(self.checkpoints), "--name", "classifier"]
        argv += ["--n_epochs", str(self.s.classifier_epochs)]
        argv += ["--iters_per_epoch", str(self.s.classifier_iters)]
        argv += ["--seed", str(self.opt.seed), "--gpu_ids", self.opt.gpu_ids]
        weights = self.checkpoints / "classifier" / "classifier.pth"
        # train_classifier.py skips when classifier.pth exists, but writes classifier.json after it:
        # only both mark a finished classifier; maps of an earlier classifier are stale
        finished = weights.exists() and config_path(weights).exists()
        if finished:
            parsed = train_classifier.build_parser().parse_args(argv)
            changes = train_classifier.saved_option_changes(weights, parsed)
        else:
            changes = []
        if changes:  # made by another version of this demo: its maps would not be this one's
            print(f"{weights}: trained with other options ({'; '.join(changes)}); trained again")
            finished = False
        self.check(train_classifier, argv if finished else [*argv, "--overwrite"])
        self.redo = self.redo or not finished
        argv = ["--dataroot", root, "--checkpoint", str(weights)]
        self.check(grad_CAM_3d_sagittal, argv if finished else [*argv, "--overwrite"])

    def train(self) -> None:
        """Train, or reuse a run whose train state says it finished every epoch; train.py writes
        ``latest_*`` during the run too (every --save_epoch_freq epochs and mid-epoch), so an
        unfinished one resumes from there."""
        run = self.checkpoints / "healthivert"
        s = self.s
        epochs = s.train_epochs + s.train_decay_epochs
        # a run trained on maps made before this process's classifier starts over
        progress = None if self.opt.overwrite or self.redo else train_progress(run)
        argv = self.train_argv()
        changes = run_option_changes(run, argv) if progress is not None else []
        if changes:  # left by a version of the demo with other defaults
            print(f"{run}: trained with other options ({'; '.join(changes)}); trained again")
            progress = None
        if progress == (epochs, 0):
            print(f"{run}: trained run exists, reused (its train state: all {epochs} epochs done)")
            return
        if progress is not None and progress[0] < epochs:
            epoch, batches = progress
            print(f"{run}: unfinished training ({epoch}/{epochs} epochs, {batches} batches more), resumed")
            argv += ["--continue_train", "--epoch", "latest"]
        self.redo = True  # from here on, what the old weights gave is stale
        if train.main(argv) != 0:  # train.py has no --overwrite: without --continue_train it starts over
            raise StageError("train.py " + " ".join(argv))

    def train_argv(self) -> list[str]:
        """train.py's command line for the demo's run."""
        s = self.s
        argv = ["--dataroot", str(self.root / "straightened"), "--vertebra_json"]
        argv += [str(self.root / "vertebra_data.json"), "--cam_folder", str(self.root / "heatmap")]
        argv += ["--name", "healthivert", "--checkpoints_dir", str(self.checkpoints)]
        argv += ["--model", "healthivert"]
        argv += ["--dataset_mode", f"aligned_{PLANE}"]
        argv += ["--n_epochs", str(s.train_epochs), "--n_epochs_decay", str(s.train_decay_epochs)]
        argv += ["--max_dataset_size", str(s.train_max_samples), "--batch_size", str(s.batch_size)]
        argv += ["--ndf", str(s.ndf)]
        argv += ["--num_threads", "0", "--val_freq", "0", "--seed", str(self.opt.seed)]
        argv += ["--gpu_ids", self.opt.gpu_ids, "--print_freq", "50", "--display_freq", "100000"]
        return argv

    def synthesise(self) -> None:
        argv = ["--dataroot", str(self.root / "straightened"), "--vertebra_json"]
        argv += [str(self.root / "vertebra_data.json"), "--name", "healthivert"]
        argv += ["--checkpoints_dir", str(self.checkpoints), "--plane", PLANE]
        argv += ["--output_dir", str(self.synthesis)]
        argv += ["--cam_folder", str(self.root / "heatmap"), "--gpu_ids", self.opt.gpu_ids]
        argv += ["--neighbours", self.s.neighbours]
        self.check(eval_3d_sagittal_twostage, argv)
        # crops whose outputs were made from other crops or maps are synthesised again: what the
        # later stages finished before that is stale
        self.redo = self.redo or written_since(self.synthesis, self.out / "rhlv" / "gan" / "rhlv.csv")

    def rhlv(self) -> None:
        for method in METHODS:
            argv = ["--label-folder", str(self.root / "straightened" / "label")]
            argv += ["--result-folder", str(self.out / "rhlv" / method), "--method", method]
            argv += ["--json-path", str(self.root / "vertebra_data.json")]
            argv += ["--truth", str(self.root / "truth")]
            if method == "gan":
                argv += ["--output-folder", str(self.synthesis)]
            self.check(RHLV_quantification, argv)

    def grading(self) -> None:
        for method in METHODS:
            argv = ["--rhlv-folder", str(self.out / "rhlv" / method)]
            argv += ["--output-folder", str(self.out / "grading" / method), "--folds", str(self.s.folds)]
            argv += ["--seed", str(self.opt.seed)]
            if self.call(SVM_grading, [*argv, "--classes", "genant"]) != 0:
                print(f"{method}: 4-class grading refused (see above); grading fracture / no fracture")
                self.check(SVM_grading, [*argv, "--classes", "fracture"])

    def metrics(self) -> None:
        argv = ["--dataroot", str(self.root), "--output-folder", str(self.synthesis)]
        argv += ["--result-folder", str(self.out / "metrics"), "--phase", "test", "--plane", PLANE]
        argv += ["--truth", str(self.root / "truth")]
        self.check(generation_eval_sagittal, argv)

    def run(self) -> None:
        self.stage("phantom", self.phantom)
        self.stage("straightening", self.straighten)
        self.stage("attention (classifier + Grad-CAM++)", self.attention)
        self.stage("HealthiVert training", self.train)
        self.stage("3D synthesis", self.synthesise)
        self.stage("RHLV (gan, neighbors)", self.rhlv)
        self.stage("grading (SVM)", self.grading)
        self.stage("metrics against truth", self.metrics)


# --- report ------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def headline(out: Path) -> dict[str, dict[str, float | None]]:
    """Per method, on the test split: height MAE (mm) and RHLV MAE of its fractured vertebrae
    (``n`` of them, ``unmeasured`` of those with a height missing); macro-F1 and accuracy of the
    grading of all its vertebrae (``graded``)."""
    figures = {}
    for method in METHODS:
        errors = read_json(out / "rhlv" / method / "truth_errors.json").get("test/fractured", {})
        grading = read_json(out / "grading" / method / "metrics.json")
        figures[method] = {
            "height_mae_mm": errors.get("height_mae_mm"),
            "rhlv_mae": errors.get("rhlv_mae"),
            "n": errors.get("n", 0),
            "unmeasured": errors.get("n_unmeasured", 0),
            "macro_f1": grading.get("macro_f1"),
            "accuracy": grading.get("accuracy"),
            "graded": grading.get("test", {}).get("n", 0),
            "classes": grading.get("classes", "genant"),
        }
    return figures


def fractured_count(figure: dict) -> str:
    """The fractured vertebrae a method's MAEs are over, and how many of them it left unmeasured."""
    n, unmeasured = figure["n"], figure.get("unmeasured", 0)
    return f"{n} ({unmeasured} not measured)" if unmeasured else str(n)


FIGURE_LIMIT = 8  # fractured test vertebrae shown in the report

SPLIT_GROUPS = (
    "train/fractured",
    "train/all",
    "val/fractured",
    "val/all",
    "test/fractured",
    "test/all",
    "all/fractured",
    "all/all",
)


def split_rows(out: Path) -> list[list]:
    """Per split and subset (``rhlv/<method>/truth_errors.json``): the vertebrae compared and each
    method's height MAE (mm) and RHLV MAE, GAN then neighbours, for the report's every-split table."""
    errors = {m: read_json(out / "rhlv" / m / "truth_errors.json") for m in METHODS}
    rows = []
    for group in SPLIT_GROUPS:
        if not any(group in e for e in errors.values()):
            continue
        row: list = [group, max(errors[m].get(group, {}).get("n", 0) for m in METHODS)]
        row += [fmt(errors[m].get(group, {}).get("height_mae_mm")) for m in METHODS]
        row += [fmt(errors[m].get(group, {}).get("rhlv_mae"), 3) for m in METHODS]
        rows.append(row)
    return rows


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fractured_test(root: Path) -> list[tuple[str, int, int]]:
    split = read_json(root / "vertebra_data.json").get("test", {})
    out = []
    for key, grade in sorted(split.items()):
        pid, vid = key.rsplit("_", 1)
        if int(grade) >= 1:
            out.append((pid, int(vid), int(grade)))
    return out


def describe_test_split(root: Path) -> str:
    """How many patients the test split has, and in how many of them its fractured vertebrae are."""
    split = read_json(root / "vertebra_data.json").get("test", {})
    patients = {key.rsplit("_", 1)[0] for key in split}
    fractured = fractured_test(root)
    holders = {pid for pid, _, _ in fractured}
    n, m = len(patients), len(fractured)
    if n == 1:
        return f"the test split is a single patient ({len(split)} vertebrae, {m} of them fractured)"
    if m == 0:
        return f"the test split is {n} patients ({len(split)} vertebrae) with no fractured vertebra"
    vertebrae = "fractured vertebra is" if m == 1 else f"{m} fractured vertebrae are"
    where = "all in one of them" if len(holders) == 1 and m > 1 else f"in {len(holders)} of them"
    return f"the test split is {n} patients ({len(split)} vertebrae) and its {vertebrae} {where}"


def vertebra_figures(out: Path, figures_dir: Path, limit: int) -> list[tuple[Path, str]]:
    """Input / pseudo-healthy / truth / height-loss map of the test split's fractured vertebrae
    (the first ``limit``)."""
    root = out / "phantom"
    store = CropStore(root / "straightened")
    truth = generation_eval_sagittal.TruthCache(root / "truth", root)
    synthesis = out / "synthesis" / PLANE
    items = []
    for pid, vid, grade in fractured_test(root)[:limit]:
        crop = store.load(f"{pid}_{vid}")
        fake_ct = load_fake(synthesis, "CT_fake", crop)
        fake_label = load_fake(synthesis, "label_fake", crop)
        ct, mask, window = truth.volumes(pid)
        true_ct, true_body = gm.truth_on_crop(
            ct.array, mask.array, ct.affine, crop.affine, crop.label.shape, vid, window
        )
        idx = np.nonzero(crop.label == vid)[2]
        k = int(round(idx.mean())) if idx.size else crop.label.shape[2] // 2
        spacing = tuple(float(s) for s in crop.spacing_mm[:2])
        fig, axes = plt.subplots(1, 4, figsize=(10, 3))
        draw_slice(axes[0], crop.ct[:, :, k] / 255.0, crop.label[:, :, k], spacing, "input", windowed=True)
        draw_slice(
            axes[1], fake_ct[:, :, k] / 255.0, np.rint(fake_label[:, :, k]), spacing, "pseudo-healthy", True
        )
        draw_slice(axes[2], true_ct[:, :, k] / 255.0, true_body[:, :, k] * vid, spacing, "truth", True)
        loss_map = out / "rhlv" / "gan" / "maps" / f"{pid}_{vid}.png"
        if loss_map.exists():
            axes[3].imshow(plt.imread(loss_map))
            axes[3].set_title("height-loss map (gan)", fontsize=8)
        axes[3].set_axis_off()
        png = figures_dir / f"{pid}_{vid}.png"
        save_figure(fig, png)
        items.append((png, f"{pid} {vertebra_name(vid)}, Genant grade {grade}"))
    return items


def write_report(out: Path, pipe: Pipeline, figures: dict, total_s: float) -> Path:
    opt, s = pipe.opt, pipe.s
    report = Report(out / "report.html", "HealthiVert demo")
    report.text(
        f"Phantom: {s.patients} patients, levels {s.levels}, {opt.spacing_mm:g} mm voxels, seed {opt.seed}"
        + (" (--quick: a tiny run; its numbers mean nothing)." if opt.quick else ".")
        + f" Dataset root: {pipe.root.name}/; trained runs: checkpoints/; total {total_s:.0f} s."
        + f" Synthesis: {SYNTHESIS_ORDER[s.neighbours]} (--neighbours {s.neighbours})."
    )
    report.section(
        "Fractured vertebrae of the test split",
        "Mid-sagittal slice of the crop: the input (fractured), HealthiVert's pseudo-healthy twin, the "
        "true pre-fracture vertebra on the same grid, and the axial height-loss map (RHLV per column "
        "against the GAN's twin).",
    )
    n_fractured = len(fractured_test(pipe.root))
    items = vertebra_figures(out, out / "figures", limit=FIGURE_LIMIT)
    if items:
        if n_fractured > len(items):
            report.text(f"The first {len(items)} of the test split's {n_fractured} fractured vertebrae:")
        report.figures(items, width=900)
    else:
        report.text("The test split has no fractured vertebra.")

    report.section(
        "Against the true anatomy (test split)",
        "Height MAE: the healthy heights each method estimates (the GAN's twin, or the mean of the "
        "neighbours) against the true pre-fracture heights, mm, over the anterior, middle and posterior "
        "regions. RHLV MAE: the estimated relative height loss against the true one. Both over the "
        "test split's fractured vertebrae (column 'fractured'). Macro-F1 and accuracy: the SVM "
        "grading of all the test split's vertebrae, fractured or not (column 'graded').",
    )
    rows = [
        [
            m,
            fractured_count(figures[m]),
            fmt(figures[m]["height_mae_mm"]),
            fmt(figures[m]["rhlv_mae"], 3),
            figures[m]["graded"],
            fmt(figures[m]["macro_f1"]),
            fmt(figures[m]["accuracy"]),
            figures[m]["classes"],
        ]
        for m in METHODS
    ]
    report.table(
        ["method", "fractured", "height MAE (mm)", "RHLV MAE", "graded", "macro-F1", "accuracy", "classes"],
        rows,
    )
    for m in METHODS:
        if figures[m]["classes"] == "fracture":
            report.text(
                f"{m}: too few vertebrae per Genant grade for {s.folds}-fold cross-validation, so the SVM "
                "grades fracture (grade >= 1) against no fracture instead of Genant grades 0-3."
            )
    report.text(
        "The same errors on every split (all: every graded vertebra; fractured: true grade >= 1). "
        f"The GAN trained on the train split's normal vertebrae only; {describe_test_split(pipe.root)}, "
        "so read the other splits before trusting one method over the other."
    )
    report.table(
        ["split / vertebrae", "n"]
        + [f"height MAE (mm), {m}" for m in METHODS]
        + [f"RHLV MAE, {m}" for m in METHODS],
        split_rows(out),
    )
    truth_summary = read_json(out / "metrics" / "summary.json").get("truth", {})
    if truth_summary:
        keys = [k for k in ("n", "ssim_band", "psnr_band", "dice", "height_mae_mm") if k in truth_summary]
        report.text("Pseudo-healthy twins against the truth (evaluation/generation_eval_sagittal.py):")
        report.table(keys, [[truth_summary[k] for k in keys]])
    files = [out / "rhlv" / m / "rhlv.csv" for m in METHODS]
    files += [out / "grading" / m / "metrics.json" for m in METHODS] + [out / "metrics" / "truth_eval.csv"]
    report.links("Files:", [(f, str(f.relative_to(out))) for f in files])

    report.section("Confusion matrices (test split)")
    report.figures(
        [(out / "grading" / m / "confusion_test.png", f"{m} ({figures[m]['classes']})") for m in METHODS],
        width=420,
    )
    report.section("Time of each stage")
    times = [[name, float(t)] for name, t in pipe.times]
    report.table(["stage", "seconds"], [*times, ["total", float(total_s)]])
    return report.save()


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    base = QUICK if opt.quick else DEFAULT
    settings = base if opt.patients is None else dataclasses.replace(base, patients=opt.patients)
    problem = option_problem(opt, settings)
    out = Path(opt.out)
    if problem is None:
        problem = claim_output(out, settings_of(opt, settings), opt.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if opt.torch_threads > 0:
        torch.set_num_threads(opt.torch_threads)
    torch.manual_seed(opt.seed)
    start = time.perf_counter()
    pipe = Pipeline(out, opt, settings)
    try:
        pipe.run()
        figures = headline(out)
        total = time.perf_counter() - start
        path = write_report(out, pipe, figures, total)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"error: the demo stopped at {exc}; see the messages above", file=sys.stderr)
        return 1
    parts = [
        f"{m}: height MAE {fmt(f['height_mae_mm'])} mm, RHLV MAE {fmt(f['rhlv_mae'], 3)} "
        f"over {fractured_count(f)} fractured vertebrae, macro-F1 {fmt(f['macro_f1'])} over all {f['graded']}"
        for m, f in figures.items()
    ]
    print(f"demo finished in {total:.0f} s (test split) {'; '.join(parts)}; open {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
