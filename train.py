"""Train a model.

    python train.py --dataroot D --name NAME --model healthivert [--dataset_mode aligned_sagittal] ...

The loop is the pix2pix one: per iteration ``set_input`` + ``optimize_parameters``; result images
to the HTML page every ``--display_freq`` iterations; losses printed, logged and plotted every
``--print_freq``; checkpoints every ``--save_latest_freq`` iterations and ``--save_epoch_freq``
epochs, each with its train state. ``--continue_train --epoch latest`` (or ``--load_iter N`` for
``--save_by_iter`` saves) resumes optimisers, schedulers, counters and random state exactly; after
a mid-epoch save it replays that epoch's shuffle, skips (loads and drops) the batches already
trained and goes on from there, so the run equals a straight one (same ``--batch_size`` and
number of processes). Exact with ``--num_threads 0`` and with loader workers whose datasets take
no random numbers in the workers (the aligned datasets' slice draws are seeded); the learning-rate
schedule follows the train state, not ``--epoch_count``. A resume with another ``--lr_policy`` than
the train state's starts that policy afresh at the resumed epoch, with a warning
(:mod:`models.schedulers` says how for each policy).

Validation: every ``--val_freq`` epochs (and after the last one) the model runs on
``--val_phase`` (at most ``--max_val_samples`` samples, in eval mode, random state untouched)
and, if it has ``validation_metrics()``, the means are printed, appended to ``loss_log.txt`` and
to ``val_metrics.json``. For HealthiVert: masked-region SSIM/PSNR (a coronal slice's padding
columns left out), Dice and height error in mm.

Learning rate: stepped once per epoch, after validation. ``--lr_policy plateau`` cuts it by 0.2
when ``--plateau_metric`` has not improved by 1 % for 6 steps: ``loss_G`` (default) is the mean of
the generator's training loss over all the epoch's iterations (and all ranks), a validation metric
is stepped on only in the epochs that validate (its patience counts validations; it needs
``--val_freq > 0``). An unknown name is an error before the first epoch.
The end of each epoch also refreshes the HTML page and the loss log if the frequencies did not
fall in it (short runs still write them). On CUDA the models run under bf16 autocast with
channels_last unless ``--no_amp``. Trained on straightened crops, the run also records their grid
(voxels and voxel size of each distinct crop geometry) in ``train_crops.json``, so the 3D
synthesis can warn when it is given crops of another field of view or voxel size.

Several processes: ``torchrun --nproc_per_node N train.py ...`` (no extra flag) trains with
DistributedDataParallel, one process per GPU (NCCL) or per CPU share (gloo); plain ``python
train.py`` is one process. ``--batch_size`` is per process (an iteration uses ``N * batch_size``
samples; the iteration counters and frequencies count samples over all processes). Only rank 0
prints, writes checkpoints, logs, HTML, plots, ``opt.json`` and validation results; the other
ranks' stdout is silenced (errors still reach stderr). Every rank validates the whole
``--val_phase`` set (same weights, same numbers), so no rank waits on another. ``--sync_bn``
(CUDA) turns BatchNorm into SyncBatchNorm. Multi-node: torchrun's own ``--nnodes``,
``--node_rank`` / ``--rdzv_endpoint`` flags, with ``--checkpoints_dir`` on a shared file system.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data import create_dataset
from data.crops import dataset_crops, record_grids
from models import create_model
from options.base_options import option_changes, save_options, setup
from options.train_options import TrainOptions, not_learning_options
from util import distributed
from util.atomic import read_json, write_json
from util.checkpoint import rng_state, seed_everything, set_rng_state
from util.errors import InputError, failure_line, one_line
from util.registry import RegistryError
from util.visualizer import Visualizer


class DistributedTrainOptions(TrainOptions):
    """The training flags plus those of multi-process training (only meaningful under torchrun)."""

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = super().initialize(parser)
        g = parser.add_argument_group("several processes (torchrun)")
        g.add_argument(
            "--sync_bn", action="store_true", help="SyncBatchNorm over all processes (CUDA, under torchrun)"
        )
        g.add_argument(
            "--find_unused_parameters",
            action="store_true",
            help="for models whose networks leave parameters out of some losses (DDP's flag)",
        )
        return parser


def crossed(total: int, step: int, freq: int) -> bool:
    """True when the counter passed a multiple of ``freq`` in its last ``step``."""
    return freq > 0 and total // freq > (total - step) // freq


def record_crop_geometry(dataset, run_dir: Path) -> None:
    """Write ``train_crops.json`` (:func:`data.crops.record_grids`) for a dataset of straightened
    crops; advisory, so an unreadable header only gives a warning (and torchrun ranks stay in step)."""
    crops = dataset_crops(dataset)
    if crops is None:
        return
    try:
        record_grids(*crops, run_dir)
    except (InputError, ValueError) as exc:
        print(f"warning: the training crops' grid is not recorded ({exc})", file=sys.stderr)


def check_mid_epoch_resume(opt: argparse.Namespace, resume: dict | None, world: int) -> None:
    """A mid-epoch train state counts the epoch's finished batches: resuming it with another batch
    size or number of processes would skip other samples than were trained. InputError then."""
    if not (opt.continue_train and resume and resume.get("batches_done")):
        return
    saved_batch = (resume.get("options") or {}).get("batch_size")
    saved_world = resume.get("world_size", world)
    if saved_batch not in (None, opt.batch_size) or saved_world != world:
        raise InputError(
            f"{opt.name}: the train state was saved {resume['batches_done']} batches into epoch "
            f"{resume['epoch'] + 1} with --batch_size {saved_batch} on {saved_world} process(es), this run "
            f"has --batch_size {opt.batch_size} on {world}: resume a mid-epoch save with the same "
            "--batch_size and processes, or an end-of-epoch save (--epoch N)"
        )


# what a resume may change on purpose besides where things are, how a run is shown and what the
# model does not read: the schedule's length and policy, and the validation
RESUME_MAY_CHANGE = ("n_epochs", "n_epochs_decay", "lr_policy", "plateau_metric")
RESUME_MAY_CHANGE += ("val_freq", "val_phase", "max_val_samples")


def resumed_option_changes(saved: dict, opt: argparse.Namespace) -> list[str]:
    """What a resumed run learns with otherwise than its train state was trained with (hole, loss
    weights, class, split, attention maps ...; :func:`options.base_options.option_changes`). The
    run's opt.json then holds the new values, which test.py and the 3D synthesis use for the whole
    run. Empty for a train state that records no options."""
    if not saved:
        return []
    changes = option_changes(saved, opt, (*not_learning_options(opt), *RESUME_MAY_CHANGE))
    if bool(saved.get("cam_folder")) != bool(getattr(opt, "cam_folder", None)):
        # the folder may move; a run trained with maps and resumed without (or the other way) may not
        changes.insert(
            0, f"--cam_folder {saved.get('cam_folder')} there, {getattr(opt, 'cam_folder', None)} now"
        )
    return changes


def validation_options(opt: argparse.Namespace) -> argparse.Namespace:
    """The training options, set for a deterministic pass over ``--val_phase``."""
    val = copy.copy(opt)
    val.phase, val.isTrain, val.serial_batches, val.num_threads = opt.val_phase, False, True, 0
    val.max_dataset_size = opt.max_val_samples
    val.distributed_sampler = False  # every rank validates the whole set
    return val


def validate(model, dataset) -> dict[str, float | None]:
    """Mean of each ``model.validation_metrics()`` entry over ``dataset`` (eval mode, no gradients,
    random state restored, so validating does not change the training run)."""
    state = rng_state()
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        with torch.no_grad():
            for data in dataset:
                model.set_input(data)
                model.forward()
                for name, values in model.validation_metrics().items():
                    values = values.detach().float().reshape(-1)
                    finite = values[torch.isfinite(values)]  # each entry is a sample's; NaNs left out
                    sums[name] = sums.get(name, 0.0) + float(finite.sum())
                    counts[name] = counts.get(name, 0) + int(finite.numel())
    finally:
        model.train()
        set_rng_state(state)
    # a metric no sample gave a finite value of is None (null), never a 0 that reads as perfect
    return {name: total / counts[name] if counts[name] else None for name, total in sums.items()}


def validation_dataset(opt: argparse.Namespace, model):
    """The ``--val_phase`` dataset, or None: validation off (``--val_freq 0``), a model without
    ``validation_metrics()``, or a split that cannot be read (a warning; an InputError when the
    plateau policy watches a validation metric, which cannot do without it)."""
    if opt.val_freq <= 0 or not hasattr(model, "validation_metrics"):
        return None
    try:
        return create_dataset(validation_options(opt))
    except (InputError, ValueError) as exc:
        if model.plateau_watches_validation():
            raise InputError(f"{exc} (--plateau_metric {opt.plateau_metric} needs validation)") from None
        print(f"warning: no validation ({exc})", file=sys.stderr)
        return None


class EpochLoss:
    """The plateau policy's ``loss_G``: the mean of the generator loss over an epoch's iterations
    (every one, not only the printed ones), summed on the model's device without a sync per step.

    Under torchrun :meth:`mean` is the mean over every rank's iterations, so all ranks step their
    schedulers alike. :meth:`state` and :meth:`reset` carry a partial sum through a mid-epoch
    save, so a resumed epoch's mean is the straight run's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self, state: dict | None = None) -> None:
        state = state or {"sum": 0.0, "count": 0}
        self.sum = torch.tensor(state["sum"], dtype=torch.float64, device=self.device)
        self.count = int(state["count"])

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()
        self.count += 1

    def state(self) -> dict:
        return {"sum": float(self.sum), "count": self.count}

    def mean(self) -> float | None:
        """The mean over all ranks' iterations of this epoch (None if there were none)."""
        ranks = distributed.all_gather_objects(self.state())
        count = sum(r["count"] for r in ranks)
        return sum(r["sum"] for r in ranks) / count if count else None


def trim_validation_history(run_dir: Path, last_epoch: int) -> None:
    """Keep only the ``val_metrics.json`` records of epochs up to ``last_epoch`` (0: none): those of
    an earlier run of this name, or of epochs after the train state resumed, are not this run's."""
    path = run_dir / "val_metrics.json"
    if not path.exists():
        return
    history = read_json(path, "validation history")
    kept = [h for h in history if isinstance(h, dict) and int(h.get("epoch", 0)) <= last_epoch]
    if kept:
        write_json(path, kept)
    else:
        path.unlink()


def record_validation(run_dir: Path, epoch: int, metrics: dict[str, float | None], log_name: Path) -> str:
    """Print the metrics, append them to the loss log and to ``val_metrics.json``."""
    shown = " ".join(f"{k}: {'n/a' if v is None else f'{v:.4f}'}" for k, v in metrics.items())
    line = f"(validation epoch: {epoch}) {shown}"
    print(line)
    with open(log_name, "a") as f:
        f.write(line + "\n")
    path = run_dir / "val_metrics.json"
    history = read_json(path, "validation history") if path.exists() else []
    history = [h for h in history if h.get("epoch") != epoch] + [{"epoch": epoch, **metrics}]
    write_json(path, history)
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = DistributedTrainOptions()
    try:
        opt = options.parse(argv)
    except (RegistryError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if distributed.launched() and distributed.env_world_size() > 1 and opt.gpu_ids:
        opt.gpu_ids = [distributed.local_rank()]  # one GPU per process
    joined = distributed.init(use_cuda=bool(opt.gpu_ids))
    quiet = open(os.devnull, "w") if not distributed.is_main() else None  # noqa: SIM115
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            return train(opt, options, joined)
    finally:
        if quiet:
            quiet.close()
        if joined:
            distributed.shutdown()


def train(opt: argparse.Namespace, options: TrainOptions, joined: bool) -> int:
    """The training loop (every rank runs it; rank 0 writes)."""
    main_rank, world = distributed.is_main(), distributed.world_size()
    run_dir = Path(opt.checkpoints_dir) / opt.name
    try:
        # opt.json is written once the run is built: a command that fails leaves no run folder
        # behind and never overwrites the options an earlier run of this name was trained with
        setup(opt, options.parser_, save=False)
        if joined:  # each rank its own augmentation stream; DDP copies rank 0's initial weights
            seed_everything(opt.seed + distributed.rank())
        dataset = create_dataset(opt)
        model = create_model(opt)
        model.setup(opt)  # an unknown --norm, --gan_mode, --lr_policy, --plateau_metric ... is a ValueError
        check_mid_epoch_resume(opt, getattr(model, "resume_state", None), world)
        val_dataset = validation_dataset(opt, model)
        if main_rank:
            save_options(opt, run_dir / "opt.json")
            record_crop_geometry(dataset.dataset, run_dir)
    except (RegistryError, ValueError) as exc:  # InputError is a ValueError
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --checkpoints_dir
        print(f"error: {failure_line(exc, run_dir)}", file=sys.stderr)
        return 2
    if joined:
        print(f"DistributedDataParallel: {world} processes, batch {opt.batch_size} per process")
    visualizer = Visualizer(opt)
    # the plateau policy on the training loss: the epoch's mean of the generator loss
    epoch_loss = (
        EpochLoss(model.device)
        if opt.lr_policy == "plateau" and not model.plateau_watches_validation()
        else None
    )
    total_iters, first_epoch, skip, replay = 0, opt.epoch_count, 0, None
    loader = dataset.dataloader
    # persistent loader workers draw their seed from the random state once, in the first epoch
    # that iterates the loader; later epochs draw only their shuffle
    loader_started, persistent = False, loader.num_workers > 0 and loader.persistent_workers
    resume = getattr(model, "resume_state", None)
    if opt.continue_train and resume:  # the train state's epoch wins over --epoch_count
        first_epoch, total_iters = resume["epoch"] + 1, resume["total_iters"]
        skip, replay = resume.get("batches_done", 0), resume.get("epoch_start")
        if persistent and (not skip or replay["loader_started"]):
            # the straight run's workers were running at the start of the first epoch resumed:
            # start them here, outside the random stream, so its shuffle is drawn as there
            state = rng_state()
            iter(loader)
            set_rng_state(state)
            loader_started = True
    if opt.continue_train and resume:
        visualizer.resume_history(total_iters)  # the loss curve up to the train state resumed
        if main_rank:
            for line in resumed_option_changes(resume.get("options") or {}, opt):
                print(
                    f"warning: --continue_train with other options than the train state's: {line}",
                    file=sys.stderr,
                )
    if main_rank:  # validations of the run this one replaces (a fresh run: all; a resume: later ones)
        trim_validation_history(run_dir, first_epoch - 1 if opt.continue_train and resume else 0)
    last_epoch = opt.n_epochs + opt.n_epochs_decay
    step = opt.batch_size * world  # samples per iteration over all ranks
    start = time.time()
    for epoch in range(first_epoch, last_epoch + 1):
        epoch_start = iter_data_time = time.time()
        epoch_iter, data_time, printed = 0, 0.0, False
        visualizer.reset()
        dataset.set_epoch(epoch)
        model.train()
        batches = iter(dataset)
        if skip:
            # resume after a mid-epoch save, exactly: replay the epoch's shuffle from its starting
            # random state, load and drop the `skip` batches the weights have seen, then continue
            # with the random state of the save
            state = rng_state()
            set_rng_state(replay["rng"])
            epoch_iter = step * sum(1 for _ in itertools.islice(batches, skip))
            set_rng_state(state)
            print(f"resuming epoch {epoch} after {epoch_iter} samples")
            if epoch_loss is not None:  # the skipped batches' losses, as the save summed them
                epoch_loss.reset(replay.get("plateau_loss"))
        else:  # this epoch's shuffle is drawn from this random state (kept for mid-epoch saves)
            replay = {"rng": rng_state(), "loader_started": loader_started}
            if epoch_loss is not None:
                epoch_loss.reset()
        loader_started, skipped = True, epoch_iter
        bar = tqdm(
            batches,
            total=math.ceil(len(dataset) / step),
            initial=skip,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not main_rank,
        )
        skip = 0
        for data in bar:
            iter_start = time.time()
            t_data = iter_start - iter_data_time
            data_time += t_data
            total_iters += step
            epoch_iter += step
            model.set_input(data)
            model.optimize_parameters()
            if epoch_loss is not None:
                epoch_loss.add(model.generator_loss())
            if crossed(total_iters, step, opt.display_freq):
                model.compute_visuals()
                visualizer.display_current_results(
                    model.get_current_visuals(), epoch, crossed(total_iters, step, opt.update_html_freq)
                )
            if crossed(total_iters, step, opt.print_freq):
                losses = model.get_current_losses()
                t_comp = (time.time() - iter_start) / opt.batch_size
                visualizer.print_current_losses(epoch, epoch_iter, losses, t_comp, t_data)
                visualizer.plot_current_losses(epoch, epoch_iter / max(len(dataset), 1), losses, total_iters)
                printed = True
            if crossed(total_iters, step, opt.save_latest_freq):
                tag = f"iter_{total_iters}" if opt.save_by_iter else "latest"
                print(f"saving the latest model (epoch {epoch}, total_iters {total_iters})")
                model.save_networks(tag)
                # epoch - 1 finished, epoch_iter / step batches of this one (a resume skips them)
                start_state = replay if epoch_loss is None else {**replay, "plateau_loss": epoch_loss.state()}
                model.save_train_state(tag, epoch - 1, total_iters, epoch_iter // step, start_state)
            iter_data_time = time.time()
        bar.close()
        trained = epoch_iter > skipped  # a resume may find the epoch's batches all trained
        if trained and not visualizer.saved:  # short epochs still get their images
            model.compute_visuals()
            visualizer.display_current_results(model.get_current_visuals(), epoch, True)
        if trained and not printed:
            losses = model.get_current_losses()
            visualizer.print_current_losses(epoch, epoch_iter, losses, 0.0, 0.0)
            visualizer.plot_current_losses(epoch, 1.0, losses, total_iters)
        metrics = None  # validation first: the plateau policy may watch one of its metrics
        if val_dataset is not None and (epoch % opt.val_freq == 0 or epoch == last_epoch):
            metrics = validate(model, val_dataset)
            if main_rank:
                record_validation(visualizer.run_dir, epoch, metrics, visualizer.log_name)
        plateau = None
        if epoch_loss is not None:
            plateau = epoch_loss.mean()
        elif opt.lr_policy == "plateau" and metrics is not None:
            plateau = metrics.get(opt.plateau_metric)
            if plateau is None:  # no validation sample gave it a finite value: no step this epoch
                print(f"warning: no finite {opt.plateau_metric} in this validation; plateau not stepped")
        lr_used = model.optimizers[0].param_groups[0]["lr"] if model.optimizers else 0.0
        lr = model.update_learning_rate(plateau)
        if epoch % opt.save_epoch_freq == 0 or epoch == last_epoch:
            for tag in ("latest", epoch):
                model.save_networks(tag)
                model.save_train_state(tag, epoch, total_iters)
        seconds = time.time() - epoch_start
        print(
            f"end of epoch {epoch} / {last_epoch}, {seconds:.1f} s "
            f"(data loading {100 * data_time / max(seconds, 1e-9):.1f} %), "
            f"learning rate {lr_used:.7f} -> {lr:.7f}"
            + (f", plateau {opt.plateau_metric} {plateau:.6g}" if plateau is not None else "")
        )
    print(
        f"trained {opt.model} for epochs {first_epoch}-{last_epoch} ({total_iters} samples) "
        f"in {time.time() - start:.1f} s; checkpoints in {visualizer.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
