"""Quality on the phantom: HealthiVert vs linear interpolation vs pix2pix after bounded CPU training.

    python -m benchmarks.phantom_quality --dataroot D/straightened --vertebra_json D/vertebra_data.json
        [--minutes 20] [--clock cpu|wall] [--batch_size 4] [--torch_threads 0] [--val_draws 1]
        [--models healthivert pix2pix] [--healthivert_args '--lr 1e-3'] [--pix2pix_args '...']
        [--profile_rows 4] [--decay_fraction 0.5]

Each model trains for ``--minutes`` of this process's CPU time (``--clock cpu``, the default: fair
to both models on a shared machine; ``--clock wall`` for wall time) on the ``train`` split
(normal vertebrae, the default options of the model, the same data) under train.py's schedule in
time instead of epochs: the learning rate is held for the first ``1 - --decay_fraction`` of the
budget, then falls linearly to 0 at its end (``--decay_fraction 0``: held throughout, the
benchmark's schedule before this option). Both are then evaluated on
the ``val`` split's grade-0 vertebrae at their central slices (``--val_draws K`` > 1: K seeded
draws per vertebra from the central 80 % of its slices instead, as in training, for tighter
figures). Figures (printed):

* masked-region L1: mean |prediction - ground truth| over the target's rows [x1, x2) of the
  original slice (all columns), on the [-1, 1] intensity scale;
* linear interpolation: those rows filled, column by column, linearly between the row above
  (x1 - 1) and the row below (x2) of the ground truth (it is told the true height);
* HealthiVert's height error in mm: |inserted rows - (x2 - x1)| x row spacing (slice height);
* two diagnostics of where HealthiVert's error comes from: its fine image composed with the
  **true** height (x2 - x1 rows), and its coarse image composed with its own predicted coarse
  height (split and profiled as the methods are). (Where the inserted band covers rows
  [x1, x2), as it mostly does with the reference's rounding up, those rows hold the same
  generated pixels whatever the height: the first diagnostic then differs only where the
  prediction is short.)
* every method's L1 split into the **endplate rows** (within ``ENDPLATE_MM`` of the target's
  first or last row) and the **interior** rows between them: where along the height the error is;
* with ``--profile_rows K``, every method's error row by row over the first K rows from the
  target's top (x1 + k) and from its bottom (x2 - 1 - k): the mean |error| and the mean signed
  error (bias). An endplate drawn in the wrong place shows as a bias of one sign on those rows;
  an endplate in the right place but noisy shows as a large |error| with a bias near 0.
* every method's L1 (all rows and endplate rows) grouped by HealthiVert's signed error of the
  inserted height on the same slice, in rows (inserted - true, -2 or less and +2 or more pooled):
  whether HealthiVert's endplate rows are worse where it inserts the wrong height, or everywhere.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.optim import lr_scheduler  # noqa: E402

from data import create_dataset  # noqa: E402
from models import create_model  # noqa: E402
from models.composite import compose  # noqa: E402
from options.train_options import TrainOptions  # noqa: E402

# rows within this distance of the target's first or last row count as its endplates
ENDPLATE_MM = 4.0


def target_rows_mask(batch: dict, part: str = "all") -> torch.Tensor:
    """(B, 1, H, W) mask of rows [x1, x2) of each sample; ``part`` 'endplates' keeps the rows within
    :data:`ENDPLATE_MM` of x1 or x2 - 1, 'interior' the rest."""
    ct = batch["ct"]
    r = torch.arange(ct.shape[-2]).reshape(1, 1, -1, 1)
    x1, x2 = batch["x1"].reshape(-1, 1, 1, 1), batch["x2"].reshape(-1, 1, 1, 1)
    inside = (r >= x1) & (r < x2)
    if part != "all":
        margin = ENDPLATE_MM / batch["row_spacing_mm"].reshape(-1, 1, 1, 1).float()
        near = ((r - x1).float() < margin) | ((x2 - 1 - r).float() < margin)
        inside &= near if part == "endplates" else ~near
    return inside.float().expand_as(ct)


def linear_fill(batch: dict) -> torch.Tensor:
    """Ground truth with rows [x1, x2) replaced by a linear ramp between rows x1 - 1 and x2."""
    ct = batch["ct"].clone()
    h = ct.shape[-2]
    for i in range(ct.shape[0]):
        x1, x2 = int(batch["x1"][i]), int(batch["x2"][i])
        above, below = ct[i, :, max(x1 - 1, 0)], ct[i, :, min(x2, h - 1)]
        for k, row in enumerate(range(x1, x2)):
            t = (k + 1) / (x2 - x1 + 1)
            ct[i, :, row] = (1 - t) * above + t * below
    return ct


def region_l1(prediction: torch.Tensor, batch: dict, part: str = "all") -> list[float]:
    """Per-sample mean |prediction - ground truth| over :func:`target_rows_mask` (NaN where empty)."""
    m = target_rows_mask(batch, part)
    err = ((prediction.float().cpu() - batch["ct"]).abs() * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return err.tolist()


def add_scores(scores: dict[str, list[float]], name: str, prediction: torch.Tensor, batch: dict) -> None:
    for part in ("all", "endplates", "interior"):
        key = name if part == "all" else f"{name} [{part}]"
        scores.setdefault(key, []).extend(region_l1(prediction, batch, part))


def row_profile(prediction: torch.Tensor, batch: dict, rows: int) -> dict[tuple[str, int], list]:
    """Per sample, the mean |error| and mean signed error over each of the first ``rows`` rows of
    the target from its top (``("top", k)``: row x1 + k) and its bottom (``("bottom", k)``: row
    x2 - 1 - k), on all columns; rows outside [x1, x2) are skipped. Values: lists of (|e|, e)."""
    err = prediction.float().cpu()[:, 0] - batch["ct"][:, 0]  # (B, H, W)
    out: dict[tuple[str, int], list] = {}
    for i in range(err.shape[0]):
        x1, x2 = int(batch["x1"][i]), int(batch["x2"][i])
        for k in range(rows):
            for end, r in (("top", x1 + k), ("bottom", x2 - 1 - k)):
                if x1 <= r < x2:
                    e = err[i, r]
                    out.setdefault((end, k), []).append((e.abs().mean().item(), e.mean().item()))
    return out


def add_profile(profiles: dict, name: str, prediction: torch.Tensor, batch: dict, rows: int) -> None:
    if rows <= 0:
        return
    for key, values in row_profile(prediction, batch, rows).items():
        profiles.setdefault(name, {}).setdefault(key, []).extend(values)


def by_height_error(
    scores: dict[str, list[float]], errors: list[int], clip: int = 2
) -> dict[int, dict[str, float]]:
    """Mean of every score list over the slices of each signed height error (rows, clipped to
    ``[-clip, clip]``): ``{error: {name: mean, "n": count}}``, errors in ascending order. The score
    lists hold one value per slice in the order of ``errors``; NaN values are left out."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(errors):
        groups.setdefault(max(-clip, min(clip, int(e))), []).append(i)
    out: dict[int, dict[str, float]] = {}
    for e in sorted(groups):
        row: dict[str, float] = {"n": float(len(groups[e]))}
        for name, values in scores.items():
            if len(values) != len(errors):
                continue
            kept = [values[i] for i in groups[e] if values[i] == values[i]]
            row[name] = statistics.mean(kept) if kept else float("nan")
        out[e] = row
    return out


def lr_factor(progress: float, decay_fraction: float) -> float:
    """The learning rate's factor at ``progress`` (0 to 1) of the training budget: 1 until
    ``1 - decay_fraction``, then linearly down to 0 at the end (train.py's constant-then-linear
    schedule, in time instead of epochs)."""
    if decay_fraction <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / decay_fraction))


def time_schedules(optimizers, progress, decay_fraction: float) -> list[lr_scheduler.LambdaLR]:
    """One scheduler per optimizer whose factor is :func:`lr_factor` at ``progress()`` (the share
    of the budget spent): set at creation, then again at every ``step()`` after an iteration."""
    return [
        lr_scheduler.LambdaLR(optimizer, lambda _: lr_factor(progress(), decay_fraction))
        for optimizer in optimizers
    ]


def train_for(model_name: str, args: argparse.Namespace) -> object:
    opt = TrainOptions().parse(
        ["--model", model_name, "--dataset_mode", "aligned_sagittal", "--dataroot", args.dataroot]
        + ["--vertebra_json", args.vertebra_json, "--batch_size", str(args.batch_size), "--num_threads", "0"]
        + ["--checkpoints_dir", "/tmp/phantom_quality", "--name", model_name, "--gpu_ids", "-1"]
        + shlex.split(getattr(args, f"{model_name}_args", "") or "")
    )
    dataset = create_dataset(opt)
    torch.manual_seed(0)
    model = create_model(opt)
    model.setup(opt)
    model.train()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start = clock()
    deadline = start + 60 * args.minutes
    iters, epoch = 0, 0
    progress = lambda: (clock() - start) / max(deadline - start, 1e-9)  # noqa: E731
    schedules = time_schedules(model.optimizers, progress, args.decay_fraction)
    while clock() < deadline:
        epoch += 1
        dataset.set_epoch(epoch)
        for data in dataset:
            model.set_input(data)
            model.optimize_parameters()
            for schedule in schedules:
                schedule.step()
            iters += 1
            if clock() >= deadline:
                break
    spent = (clock() - start) / 60
    print(f"{model_name}: {iters} iterations ({epoch} epochs) in {spent:.1f} min ({args.clock})")
    return model


def score_batch(
    models: dict,
    batch: dict,
    scores: dict[str, list[float]],
    height_mm: list[float],
    profiles: dict | None = None,
    profile_rows: int = 0,
    height_rows: list[int] | None = None,
) -> None:
    """Add one val batch's masked-region L1 of every method (and HealthiVert's diagnostics), and
    with ``profile_rows`` > 0 its per-row profile (:func:`row_profile`) to ``profiles``."""
    profiles = {} if profiles is None else profiles
    if "healthivert" in models:
        hv = models["healthivert"]
        out = hv.synthesise(batch)
        add_scores(scores, "healthivert", out["ct"], batch)
        add_profile(profiles, "healthivert", out["ct"], batch, profile_rows)
        ct, x1, x2 = hv.sample["ct"], hv.sample["x1"], hv.sample["x2"]
        true_rows = batch["height"].reshape(-1).to(ct.device)
        oracle = compose(hv.out.fine_image.float(), ct, x1, x2, true_rows, -1.0)
        scores["healthivert, true height"] += region_l1(oracle, batch)
        add_scores(scores, "healthivert coarse", hv.fake_coarse, batch)
        add_profile(profiles, "healthivert coarse", hv.fake_coarse, batch, profile_rows)
        spacing = batch["row_spacing_mm"].reshape(-1)
        error_rows = out["rows"].cpu() - batch["height"].reshape(-1).long()
        height_mm += (error_rows.abs() * spacing).tolist()
        if height_rows is not None:
            height_rows += error_rows.tolist()
    if "pix2pix" in models:
        p2p = models["pix2pix"]
        p2p.set_input(batch)
        p2p.forward()
        add_scores(scores, "pix2pix", p2p.fake_B, batch)
        add_profile(profiles, "pix2pix", p2p.fake_B, batch, profile_rows)
    linear = linear_fill(batch)
    add_scores(scores, "linear interpolation", linear, batch)
    add_profile(profiles, "linear interpolation", linear, batch, profile_rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--vertebra_json", required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what --minutes counts")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--decay_fraction",
        type=float,
        default=0.5,
        help="the last fraction of the budget over which the learning rate falls linearly to 0",
    )
    parser.add_argument("--torch_threads", type=int, default=0)
    parser.add_argument("--val_draws", type=int, default=1, help="slices per val vertebra (1: central)")
    parser.add_argument(
        "--models", nargs="+", choices=("healthivert", "pix2pix"), default=["healthivert", "pix2pix"]
    )
    for name in ("healthivert", "pix2pix"):
        parser.add_argument(
            f"--{name}_args", default="", help=f"more train.py options for {name}, e.g. '--lr 1e-3'"
        )
    parser.add_argument(
        "--profile_rows",
        type=int,
        default=0,
        help="print each method's error on the first K rows from each end",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.decay_fraction <= 1.0:
        parser.error(f"--decay_fraction must be between 0 and 1, got {args.decay_fraction}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    val_args = ["--dataset_mode", "aligned_sagittal", "--dataroot", args.dataroot, "--vertebra_json"]
    val_opt = TrainOptions().parse([*val_args, args.vertebra_json, "--phase", "val", "--gpu_ids", "-1"])
    val_opt.isTrain, val_opt.serial_batches, val_opt.num_threads, val_opt.batch_size = False, True, 0, 4
    val_opt.normal_max_grade = 0
    val = create_dataset(val_opt)
    models = {name: train_for(name, args) for name in args.models}
    names = [*args.models, "linear interpolation"]
    if "healthivert" in models:
        names += ["healthivert, true height", "healthivert coarse"]
    scores: dict[str, list[float]] = {name: [] for name in names}
    height_mm: list[float] = []
    height_rows: list[int] = []
    profiles: dict = {}
    if args.val_draws > 1:
        val.dataset.random_slices = True
    with torch.no_grad():
        for draw in range(max(1, args.val_draws)):
            val.set_epoch(draw + 1)
            for batch in val:
                grade0 = batch["grade"].reshape(-1) == 0
                if not grade0.any():
                    continue
                batch = {k: (v[grade0] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                score_batch(models, batch, scores, height_mm, profiles, args.profile_rows, height_rows)
    n = len(scores["linear interpolation"])
    print(f"val grade-0 slices: {n}; masked-region L1 on [-1, 1] (mean, median):")
    for name, values in scores.items():
        values = [v for v in values if v == v]  # a target shorter than two margins has no interior
        if not values:
            continue
        print(
            f"  {name:>38}: {statistics.mean(values):.4f}  {statistics.median(values):.4f}  (n={len(values)})"
        )
    if height_mm:
        print(
            f"  HealthiVert height error: {statistics.mean(height_mm):.2f} mm mean, "
            f"{statistics.median(height_mm):.2f} mm median"
        )
    if height_rows:
        print("by HealthiVert's inserted height - true height (rows): mean L1, all rows / endplate rows")
        for error, row in by_height_error(scores, height_rows).items():
            parts = [
                f"{name} {row[name]:.3f} / {row.get(f'{name} [endplates]', float('nan')):.3f}"
                for name in [*args.models, "healthivert coarse", "linear interpolation"]
                if name in row
            ]
            print(f"  {error:+d} ({int(row['n'])} slices): " + "; ".join(parts))
    if profiles:
        print("per row from each end of the target: mean |error|, mean signed error (bias)")
    for name, profile in profiles.items():
        for (end, k), values in sorted(profile.items()):
            l1 = statistics.mean(a for a, _ in values)
            bias = statistics.mean(b for _, b in values)
            print(f"  {name:>20} {end:>6} row +{k}: |error| {l1:.3f}  bias {bias:+.3f}  (n={len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
