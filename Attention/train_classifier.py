"""Train the fracture classifier whose Grad-CAM++ maps guide HealthiVert's attention (HGAM).

    python Attention/train_classifier.py --dataroot D [--checkpoints_dir C] [--name classifier]
        [--vertebra_json J] [--fracture_min_grade 2] [--plane sagittal|coronal] [--n_epochs 6]
        [--window_mm 128] [--central_fraction 0.6]
        [--gpu_ids auto|-1|0] [--cache_dir DIR] [--overwrite]

Learns fractured (Genant grade >= ``--fracture_min_grade``) against normal (grade 0) vertebrae
from the sagittal (or coronal) slices through the central ``--central_fraction`` of each target
vertebra of the straightened CT crops of the ``train`` split, each cut to a ``--window_mm`` square
around the target (the network is fully convolutional, so the maps are later made on whole
slices), with class-balanced sampling and light augmentation (small shifts and zooms, intensity
jitter, noise). After every epoch it reports, per vertebra (the mean probability over
its slices), the ``val`` split's ROC AUC, sensitivity and specificity; at the end the ``test``
split's too when the split file has one. Writes ``C/<name>/classifier.pth`` (the final weights,
a plain state dict) and ``C/<name>/classifier.json`` (architecture, options, metrics).
CUDA (bf16 autocast, channels_last) when present, else the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from Attention.classifier import ClassifierConfig, build_classifier, config_path, parameter_count
from Attention.dataset import SliceBank, binary_metrics, patients_shared, split_examples
from Attention.slices import PLANE_AXIS
from data.base_dataset import read_split
from data.crops import CropStore
from options.base_options import device_of, option_changes, parse_gpu_ids
from util.atomic import write_json
from util.checkpoint import record_sha256, save_checkpoint, seed_everything
from util.errors import InputError, folder_problem, input_error

CHECKPOINT_NAME = "classifier.pth"
# options that say where things are or run, not what is learnt
PLACE_OPTIONS = ("dataroot", "checkpoints_dir", "name", "gpu_ids", "vertebra_json", "cache_dir", "overwrite")


def add_common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options both attention scripts take."""
    parser.add_argument("--dataroot", required=True, help="dataset root holding straightened/CT and label")
    parser.add_argument("--checkpoints_dir", default="./checkpoints", help="where classifiers are saved")
    parser.add_argument("--name", default="classifier", help="classifier run: <checkpoints_dir>/<name>/")
    parser.add_argument(
        "--gpu_ids", default="auto", help="'auto': CUDA device 0 when present, else the CPU; '-1': the CPU"
    )
    parser.add_argument(
        "--vertebra_json", default=None, help="split file (default <dataroot>/vertebra_data.json)"
    )
    parser.add_argument("--cache_dir", default=None, help="keep decoded crops here as .npy (default: memory)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--fracture_min_grade", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--plane", default="sagittal", choices=sorted(PLANE_AXIS))
    parser.add_argument(
        "--central_fraction",
        type=float,
        default=0.6,
        help="train and validate on this central share of the slices through the target",
    )
    parser.add_argument(
        "--window_mm",
        type=float,
        default=128.0,
        help="train on a square window of this side (mm) around the target; 0: whole slices",
    )
    parser.add_argument("--n_epochs", type=int, default=6)
    parser.add_argument("--iters_per_epoch", type=int, default=0, help="0: one pass over the train slices")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--blocks", type=int, nargs=4, default=(1, 1, 1, 1), help="blocks per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="train again over an existing classifier")
    return parser


def split_digest(split_file: str | os.PathLike) -> str:
    """A digest of a split file's contents (its splits, vertebrae and grades; not its path or
    layout): which vertebrae the classifier learns from and is judged on."""
    return record_sha256(read_split(split_file))


def saved_option_changes(checkpoint: Path, opt: argparse.Namespace) -> list[str]:
    """What this command would learn otherwise than the classifier saved at ``checkpoint``
    (:func:`options.base_options.option_changes` against the options in its JSON, leaving out
    :data:`PLACE_OPTIONS`, and the contents of the split file). Empty when they agree. A JSON that
    is missing or cannot be read, or holds no options (the weights were written and the run
    stopped before its JSON), says nothing of how the weights were trained: that is a change."""
    try:
        extra = json.loads(config_path(checkpoint).read_text())["extra"]
        saved = extra["options"]
        changes = option_changes(saved, opt, PLACE_OPTIONS)
    except FileNotFoundError:
        return [f"no {config_path(checkpoint).name} beside the weights (a run stopped before writing it?)"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{config_path(checkpoint).name} unreadable or without the options it was trained with"]
    split_file = opt.vertebra_json or str(Path(opt.dataroot) / "vertebra_data.json")
    try:
        now = split_digest(split_file)
    except InputError:
        return changes  # the run itself names what is wrong with the split file
    made = extra.get("split_sha256")
    if made is None:
        changes.append("the split file not recorded there (saved before it was)")
    elif made != now:
        changes.append(f"another split file contents there ({split_file} now)")
    return changes


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation of a (B, 1, H, W) batch in [0, 1]: shift +-4 %, zoom +-5 %, intensity, noise."""
    b = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(b, *shape, generator=gen) * (hi - lo) + lo).to(x.device)

    scale = uniform(0.95, 1.05)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = uniform(-0.08, 0.08, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x * uniform(0.9, 1.1, 1, 1, 1) + uniform(-0.05, 0.05, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen).to(x.device) * 0.02
    return (x + noise).clamp_(0, 1)


def as_batch(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) slices to a float (B, 1, H, W) batch in [0, 1] on ``device``."""
    x = torch.as_tensor(images).to(device).unsqueeze(1).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """Probability of class 1 (fractured) for each uint8 slice."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = as_batch(images[start : start + batch_size], device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(model, bank: SliceBank, device: torch.device, batch_size: int) -> dict[str, float]:
    targets, scores = bank.vertebra_scores(predict(model, bank.images, device, batch_size))
    return binary_metrics(targets, scores)


def metrics_text(m: dict[str, float]) -> str:
    return (
        f"AUC {m['auc']:.3f} sens {m['sensitivity']:.2f} spec {m['specificity']:.2f} "
        f"({m['positives']} fractured, {m['negatives']} normal)"
    )


def train(opt: argparse.Namespace) -> int:
    device = device_of(opt)
    split_file = opt.vertebra_json or str(Path(opt.dataroot) / "vertebra_data.json")
    out_dir = Path(opt.checkpoints_dir) / opt.name
    checkpoint = out_dir / CHECKPOINT_NAME
    if checkpoint.exists() and not opt.overwrite:
        changes = saved_option_changes(checkpoint, opt)
        if changes:
            raise input_error(
                config_path(checkpoint),
                f"a classifier trained with other options ({'; '.join(changes)}); pass --overwrite "
                "to train it again with these, or another --name",
            )
        print(f"{checkpoint} exists: not training again (pass --overwrite to do so)")
        return 0

    problem = folder_problem(out_dir)  # found now, not after the training
    if problem:
        raise input_error(out_dir, f"the classifier's folder {problem}")
    store = CropStore(opt.dataroot, cache_dir=opt.cache_dir)
    train_ex = split_examples(store, split_file, "train", opt.fracture_min_grade)
    if len(set(train_ex.values())) < 2:
        raise input_error(split_file, "split 'train' needs both normal and fractured vertebrae")
    val_ex = split_examples(store, split_file, "val", opt.fracture_min_grade)
    has_test = bool(read_split(split_file).get("test"))
    test_ex = split_examples(store, split_file, "test", opt.fracture_min_grade) if has_test else {}

    seed_everything(opt.seed)
    gen = torch.Generator().manual_seed(opt.seed)
    train_bank = SliceBank.build(store, train_ex, opt.plane, opt.central_fraction, opt.window_mm)
    val_bank = SliceBank.build(store, val_ex, opt.plane, opt.central_fraction, opt.window_mm)
    spacing_mm = float(np.mean(store.load(train_bank.keys[0]).spacing_mm))

    config = ClassifierConfig(
        width=opt.width, blocks=tuple(opt.blocks), plane=opt.plane, spacing_mm=spacing_mm
    )
    model = build_classifier(config).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    iters = opt.iters_per_epoch or max(1, math.ceil(len(train_bank) / opt.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=opt.lr, total_steps=opt.n_epochs * iters, pct_start=0.15
    )
    weights = torch.as_tensor(train_bank.class_balanced_weights())
    images = torch.from_numpy(train_bank.images)
    targets = torch.from_numpy(train_bank.targets)
    print(
        f"classifier {config.arch} ({parameter_count(model):,} parameters) on {device}: "
        f"{len(train_ex)} train vertebrae ({len(train_bank)} {opt.plane} slices, "
        f"{int(train_bank.targets.sum())} fractured), {len(val_ex)} val vertebrae"
    )
    # a patient's vertebrae share anatomy, scanner and windowing: metrics on a split that holds
    # train patients measure memory, not generalisation; say so, and record it with the metrics
    shared = {name: patients_shared(split_file, name) for name in ("val", "test")[: 2 if has_test else 1]}
    shared = {name: pids for name, pids in shared.items() if pids}
    for name, pids in shared.items():
        print(
            f"warning: {split_file}: split {name!r} shares {len(pids)} patient(s) with 'train' "
            f"({', '.join(pids[:3])}{', ...' if len(pids) > 3 else ''}); its metrics are not an "
            "independent estimate",
            file=sys.stderr,
        )

    start = time.perf_counter()
    history = []
    bar = tqdm(total=opt.n_epochs * iters, desc="classifier", unit="it")
    for epoch in range(1, opt.n_epochs + 1):
        model.train()
        picks = torch.multinomial(weights, iters * opt.batch_size, replacement=True, generator=gen)
        losses = []
        for it in range(iters):
            idx = picks[it * opt.batch_size : (it + 1) * opt.batch_size]
            x = augment(as_batch(images[idx], device), gen)
            y = targets[idx].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        val = evaluate(model, val_bank, device, opt.batch_size)
        history.append(
            {"epoch": epoch, "loss": float(np.mean(losses)), **{f"val_{k}": v for k, v in val.items()}}
        )
        tqdm.write(f"epoch {epoch}/{opt.n_epochs} loss {np.mean(losses):.3f} val {metrics_text(val)}")
    bar.close()
    seconds = time.perf_counter() - start

    test = {}
    if test_ex:
        test = evaluate(
            model, SliceBank.build(store, test_ex, opt.plane, opt.central_fraction, opt.window_mm), device, 64
        )
    config.extra = {
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(opt).items())},
        "parameters": parameter_count(model),
        "train_seconds": seconds,
        "history": history,
        "val": history[-1] if history else {},
        "test": test,
        "patients_shared_with_train": shared,
        "split_sha256": split_digest(split_file),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(state, checkpoint)
    write_json(config_path(checkpoint), config.to_json())
    test_text = f"; test {metrics_text(test)}" if test else ""
    print(
        f"trained in {seconds / 60:.1f} min on {device}: val {metrics_text(val)}{test_text}; "
        f"weights in {checkpoint}"
    )
    return 0


def option_problem(opt: argparse.Namespace) -> str | None:
    """What is wrong with the numeric options (checked before any work), or None."""
    for name in ("n_epochs", "batch_size", "width"):
        if getattr(opt, name) < 1:
            return f"--{name} must be >= 1, got {getattr(opt, name)}"
    if min(opt.blocks) < 1:
        return f"--blocks must all be >= 1, got {' '.join(map(str, opt.blocks))}"
    if opt.iters_per_epoch < 0:
        return f"--iters_per_epoch must be >= 0, got {opt.iters_per_epoch}"
    if not 0 < opt.central_fraction <= 1:  # NaN fails this too
        return f"--central_fraction must be in (0, 1], got {opt.central_fraction}"
    if not (math.isfinite(opt.window_mm) and opt.window_mm >= 0):
        return f"--window_mm must be a finite number >= 0 (0: whole slices), got {opt.window_mm}"
    if not (math.isfinite(opt.lr) and opt.lr > 0):
        return f"--lr must be a finite number > 0, got {opt.lr}"
    if not (math.isfinite(opt.weight_decay) and opt.weight_decay >= 0):
        return f"--weight_decay must be a finite number >= 0, got {opt.weight_decay}"
    return None


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    problem = option_problem(opt)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        opt.gpu_ids = parse_gpu_ids(opt.gpu_ids)
        return train(opt)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
