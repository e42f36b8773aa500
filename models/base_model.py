"""The model base class, with the pix2pix API that users of that codebase know.

Subclasses fill ``loss_names``, ``model_names`` (networks are attributes ``net<name>``),
``visual_names`` and ``optimizers``, and implement ``set_input``, ``forward`` and
``optimize_parameters``. Losses are stored as attributes ``loss_<name>``.

Checkpoints: ``<epoch>_net_<name>.pth`` holds one network's state_dict (loadable by pix2pix tools),
and ``<epoch>_train_state.pth`` holds the optimisers, schedulers, epoch, iteration, random state
and options, so ``--continue_train`` resumes exactly. Everything is written atomically and read
with ``torch.load(weights_only=True)``.

The ``plateau`` learning-rate policy watches ``--plateau_metric`` (:meth:`BaseModel.plateau_mode`):
``loss_G``, the epoch's mean of :meth:`BaseModel.generator_loss` (the sum of the logged losses
:meth:`BaseModel.generator_loss_names` lists), or one of the model's validation metrics, declared
with their direction in ``validation_higher_is_better``. ``train.py`` measures it and hands it to
:meth:`BaseModel.update_learning_rate`.

Under torchrun (:mod:`util.distributed`) :meth:`BaseModel.setup` wraps every training network of
``model_names`` in DistributedDataParallel after loading, so models need no code of their own:
``self.netG(x)`` goes through DDP, which averages gradients over the ranks in ``backward``. Only
rank 0 writes checkpoints; every rank reads the same ones, so all resume from the same state.
"""

from __future__ import annotations

import argparse
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.optim import lr_scheduler

from models.schedulers import TRAINING_LOSS, LinearDecay, fresh_start, get_scheduler, policy_of_state
from options.base_options import device_of
from util import distributed
from util.checkpoint import (
    file_sha256,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_mismatch,
)
from util.errors import input_error


class DistributedNet(nn.parallel.DistributedDataParallel):
    """DDP that steps aside when it has nothing to synchronise.

    A forward pass without autograd (``torch.no_grad``: validation, visuals, synthesis) or through a
    network whose parameters are all frozen (a GAN's discriminator during the generator step, after
    ``set_requires_grad(netD, False)``) calls the wrapped module directly. Plain DDP would expect
    gradients for that pass and fail at the next iteration, or sync buffers in a collective that
    ranks may not all reach. Gradients still flow through such a pass to the networks before it.
    """

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.module.parameters()):
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DataParallel/DistributedDataParallel wrapper (``net`` itself otherwise)."""
    if isinstance(net, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return net.module
    return getattr(net, "unwrapped_module", net)


def distribute(net: nn.Module, **ddp_kwargs) -> nn.Module:
    """``net`` in :class:`DistributedNet`; a ModuleDict/ModuleList (no forward of its own, its
    members are called: ``netD['global'](x)``) becomes the same container of wrapped members,
    with the original kept as ``unwrapped_module`` for checkpoints (keys unchanged)."""
    if isinstance(net, nn.ModuleDict | nn.ModuleList):
        members = net.items() if isinstance(net, nn.ModuleDict) else enumerate(net)
        wrapped = {str(k): distribute(m, **ddp_kwargs) for k, m in members}
        out = nn.ModuleDict(wrapped) if isinstance(net, nn.ModuleDict) else nn.ModuleList(wrapped.values())
        object.__setattr__(out, "unwrapped_module", net)  # not a registered child: keys stay as they are
        return out
    if not any(p.requires_grad for p in net.parameters()):
        return net  # nothing to average
    return DistributedNet(net, **ddp_kwargs)


class BaseModel(ABC):
    """Base class of every model."""

    #: options the shared parser accepts (the reference's commands use them) that this model and its
    #: datasets do not read: a value other than the default is warned about when options are parsed
    IGNORED_OPTIONS: tuple[str, ...] = ()

    #: each entry of ``validation_metrics()`` (for a model that has it) and whether more is better
    #: (SSIM, PSNR, Dice: True) or less (an error: False); ``--plateau_metric`` may name any of them
    validation_higher_is_better: dict[str, bool] = {}

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.gpu_ids = list(getattr(opt, "gpu_ids", []))
        self.isTrain = bool(getattr(opt, "isTrain", False))
        self.device = device_of(opt)
        self.save_dir = Path(opt.checkpoints_dir) / opt.name
        if getattr(opt, "preprocess", "none") != "scale_width":
            torch.backends.cudnn.benchmark = True
        self.loss_names: list[str] = []
        self.model_names: list[str] = []
        self.visual_names: list[str] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list = []
        self.image_paths: list[str] = []

    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        """Add model-specific flags or change defaults."""
        return parser

    @abstractmethod
    def set_input(self, input: dict) -> None:
        """Unpack a batch from the data loader and move it to the device."""

    @abstractmethod
    def forward(self) -> None:
        """Run the networks forward."""

    @abstractmethod
    def optimize_parameters(self) -> None:
        """Compute losses and gradients and update the networks, once per iteration."""

    # --- set-up ---------------------------------------------------------------------------
    def setup(self, opt: argparse.Namespace) -> None:
        """Create schedulers; load networks when testing or resuming; print the networks."""
        if self.isTrain:
            mode = self.plateau_mode()  # an unknown --plateau_metric fails here, before any epoch
            self.schedulers = [get_scheduler(optimizer, opt, mode) for optimizer in self.optimizers]
        if not self.isTrain or getattr(opt, "continue_train", False):
            suffix = f"iter_{opt.load_iter}" if opt.load_iter > 0 else opt.epoch
            self.load_networks(suffix)
            if self.isTrain:
                self.load_train_state(suffix)
        if self.isTrain and distributed.is_initialized():
            self.wrap_distributed(bool(getattr(opt, "sync_bn", False)))
        self.print_networks(getattr(opt, "verbose", False))

    def wrap_distributed(self, sync_bn: bool = False) -> None:
        """Wrap each network of ``model_names`` with trainable parameters in :class:`DistributedNet`.

        DDP copies rank 0's parameters and buffers to every rank here, so all start equal. With
        ``sync_bn`` (CUDA only) BatchNorm layers become SyncBatchNorm first (batch statistics over
        all ranks); the parameters stay the same objects, so the optimisers need no change.
        """
        cuda = self.device.type == "cuda"
        if sync_bn and not cuda:
            logging.getLogger(__name__).warning("--sync_bn needs CUDA; BatchNorm stays per process")
        find_unused = bool(getattr(self.opt, "find_unused_parameters", False))
        for name, net in self.networks().items():
            if unwrap(net) is not net or not any(p.requires_grad for p in net.parameters()):
                continue  # already wrapped, or frozen (a loss's feature extractor): nothing to average
            if sync_bn and cuda:
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            wrapped = distribute(
                net,
                device_ids=[self.device.index] if cuda else None,
                output_device=self.device.index if cuda else None,
                find_unused_parameters=find_unused,
            )
            setattr(self, f"net{name}", wrapped)

    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, f"net{name}") for name in self.model_names}

    def eval(self) -> None:
        for net in self.networks().values():
            net.eval()

    def train(self) -> None:
        for net in self.networks().values():
            net.train()

    def test(self) -> None:
        """Forward without gradients, then compute the extra visuals."""
        with torch.no_grad():
            self.forward()
            self.compute_visuals()

    def compute_visuals(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Compute additional images for display (optional)."""

    def get_image_paths(self) -> list[str]:
        return self.image_paths

    # --- the learning-rate schedule -------------------------------------------------------
    def generator_loss_names(self) -> list[str]:
        """The entries of ``loss_names`` whose sum is the generator's objective (the plateau
        policy's ``loss_G``): by default those whose name starts with ``G``. A model whose
        generator has other terms (HealthiVert's Dice, edge and height losses, CycleGAN's cycle
        and identity losses) overrides it; discriminator losses never belong here."""
        return [name for name in self.loss_names if name.startswith("G")]

    def generator_loss(self) -> torch.Tensor:
        """The last iteration's generator loss: the sum of :meth:`generator_loss_names`, detached,
        in fp32 on the model's device (adding it up per iteration needs no device sync)."""
        total = torch.zeros((), device=self.device)
        for name in self.generator_loss_names():
            value = torch.as_tensor(getattr(self, f"loss_{name}"), device=self.device)
            total = total + value.detach().float()
        return total

    def plateau_mode(self) -> str:
        """The direction in which ``--plateau_metric`` improves: ``min`` for ``loss_G`` and errors,
        ``max`` for validation metrics where more is better.

        Raises:
            ValueError: a name that is neither ``loss_G`` nor in ``validation_higher_is_better``,
                or (with ``--lr_policy plateau``) a validation metric without validation
                (``--val_freq 0``)."""
        name = getattr(self.opt, "plateau_metric", TRAINING_LOSS)
        if name == TRAINING_LOSS:
            return "min"
        if name not in self.validation_higher_is_better:
            validation = " | ".join(self.validation_higher_is_better)
            raise ValueError(
                f"unknown --plateau_metric {name!r} for --model {self.opt.model}; use {TRAINING_LOSS} "
                "(the epoch's mean generator training loss)"
                + (f" or a validation metric: {validation}" if validation else "")
            )
        if self.opt.lr_policy == "plateau" and getattr(self.opt, "val_freq", 0) <= 0:
            raise ValueError(f"--plateau_metric {name} is a validation metric: it needs --val_freq > 0")
        return "max" if self.validation_higher_is_better[name] else "min"

    def plateau_watches_validation(self) -> bool:
        """True when the plateau policy is on and watches a validation metric (it then steps only on
        the epochs that validate: its patience counts validations)."""
        name = getattr(self.opt, "plateau_metric", TRAINING_LOSS)
        return self.opt.lr_policy == "plateau" and name != TRAINING_LOSS

    def update_learning_rate(self, metric: float | None = None) -> float:
        """Step every scheduler once (per epoch); returns the new learning rate.

        The plateau policy steps on ``metric``, this epoch's value of ``--plateau_metric``, and not
        at all without one (an epoch that did not validate, when it watches a validation metric)."""
        for scheduler in self.schedulers:
            if self.opt.lr_policy != "plateau":
                scheduler.step()
            elif metric is not None:
                scheduler.step(metric)
        return self.optimizers[0].param_groups[0]["lr"] if self.optimizers else 0.0

    def get_current_visuals(self) -> OrderedDict:
        return OrderedDict((name, getattr(self, name)) for name in self.visual_names if isinstance(name, str))

    def get_current_losses(self) -> OrderedDict:
        def scalar(value) -> float:
            return float(value.detach().item()) if isinstance(value, torch.Tensor) else float(value)

        return OrderedDict((name, scalar(getattr(self, f"loss_{name}"))) for name in self.loss_names)

    # --- checkpoints ----------------------------------------------------------------------
    def save_networks(self, epoch: int | str) -> None:
        """Write ``<epoch>_net_<name>.pth`` for each network (CPU tensors, no DataParallel prefix).

        Under torchrun only rank 0 writes (the ranks' weights are equal)."""
        if not distributed.is_main():
            return
        for name, net in self.networks().items():
            state = {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()}
            save_checkpoint(state, self.save_dir / f"{epoch}_net_{name}.pth")

    def load_networks(self, epoch: int | str) -> None:
        for name, net in self.networks().items():
            path = self.save_dir / f"{epoch}_net_{name}.pth"
            state = load_checkpoint(path, map_location=self.device)
            problem = state_mismatch(unwrap(net).state_dict(), state)
            if problem:
                raise input_error(path, f"does not fit the network its run's options build: {problem}")
            unwrap(net).load_state_dict(state)

    def save_train_state(
        self,
        epoch: int | str,
        epoch_done: int,
        total_iters: int,
        batches_done: int = 0,
        epoch_start: dict | None = None,
    ) -> None:
        """Write ``<epoch>_train_state.pth``: optimisers, schedulers, counters, random state, options.

        ``epoch_done`` is the last finished epoch. A save in the middle of epoch ``epoch_done + 1``
        (``--save_latest_freq``) also gives ``batches_done``, the batches of that epoch already
        trained, and ``epoch_start``, what ``train.py`` needs to replay that epoch's shuffle (the
        random state at its start, ``rng``, and whether the data loader's workers were already
        running, ``loader_started``; with the plateau policy on ``loss_G`` also the epoch's running
        loss sum, ``plateau_loss``), so a resume can skip those batches and go on exactly. Under
        torchrun every rank must call this (it gathers each rank's random state into ``rng_ranks``
        and ``epoch_start`` into ``epoch_start_ranks``); rank 0 writes."""
        rng_ranks = distributed.all_gather_objects(rng_state())
        extra_ranks = distributed.all_gather_objects(self.extra_train_state())
        start_ranks = distributed.all_gather_objects(epoch_start) if batches_done else None
        if not distributed.is_main():
            return
        state = {
            "epoch": int(epoch_done),
            "total_iters": int(total_iters),
            "batches_done": int(batches_done),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "extra_ranks": extra_ranks,
            "options": {
                k: v for k, v in vars(self.opt).items() if isinstance(v, str | int | float | bool | list)
            },
        }
        if start_ranks is not None:
            state["epoch_start_ranks"] = start_ranks
        # the set of files a resume loads: a save interrupted between them leaves networks of
        # another iteration beside this state, which load_train_state then refuses
        state["network_sha256"] = {
            name: file_sha256(path) for name, path in self._network_files(epoch).items() if path.exists()
        }
        save_checkpoint(state, self.save_dir / f"{epoch}_train_state.pth")

    def _network_files(self, epoch: int | str) -> dict[str, Path]:
        return {name: self.save_dir / f"{epoch}_net_{name}.pth" for name in self.networks()}

    def extra_train_state(self) -> dict:
        """A model's own training state beyond optimisers, schedulers and random state (e.g.
        CycleGAN's image pools), saved per rank in the train state; empty by default."""
        return {}

    def load_extra_train_state(self, state: dict | None) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`extra_train_state` returned (this rank's, or rank 0's under another
        world size); None for a train state saved without it."""

    def load_train_state(self, epoch: int | str) -> dict:
        """Restore optimisers, schedulers and random state; returns the saved counters:
        ``epoch`` (last finished), ``total_iters``, ``batches_done`` (of the next epoch, 0 at an
        epoch's end) and ``epoch_start`` (this rank's ``epoch_start`` of that save, or None).

        A train state of another ``--lr_policy`` (its options say which; one saved without them, its
        scheduler state) leaves its scheduler state unloaded: this run's policy starts afresh at
        the resumed epoch (:mod:`models.schedulers` says how), with a warning. With the same policy
        the schedulers go on exactly; a plateau record of another ``--plateau_metric`` starts
        afresh, and one of validations counted at another ``--val_freq`` is kept with a warning."""
        # on the CPU: random states must be CPU byte tensors; Adam's state follows its parameters
        state_path = self.save_dir / f"{epoch}_train_state.pth"
        state = load_checkpoint(state_path, map_location="cpu")
        for name, digest in (state.get("network_sha256") or {}).items():
            path = self._network_files(epoch).get(name)
            if path is not None and path.exists() and file_sha256(path) != digest:
                raise input_error(
                    path,
                    f"not the network {state_path.name} was saved with (a save interrupted between "
                    "the two?); resume from another --epoch",
                )
        # this command's initial rates, before the saved optimiser state replaces them
        initial_rates = [[g.get("initial_lr", g["lr"]) for g in o.param_groups] for o in self.optimizers]
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        options = state.get("options") or {}
        saved_policy = options.get("lr_policy") or next(map(policy_of_state, state["schedulers"]), None)
        if saved_policy is not None and saved_policy != self.opt.lr_policy:
            self._start_schedule_afresh(state_path, saved_policy, int(state["epoch"]) + 1, initial_rates)
        else:
            self._load_schedulers(state_path, state)

        def own(ranks: list) -> dict:
            # each rank continues its own random stream; a different world size starts from rank 0's
            return ranks[distributed.rank()] if len(ranks) == distributed.world_size() else ranks[0]

        set_rng_state(own(state.get("rng_ranks") or [state["rng"]]))
        self.load_extra_train_state(own(state["extra_ranks"]) if state.get("extra_ranks") else None)
        batches_done = int(state.get("batches_done", 0))
        self.resume_state = {
            "epoch": state["epoch"],
            "total_iters": state["total_iters"],
            "batches_done": batches_done,
            "epoch_start": own(state["epoch_start_ranks"]) if batches_done else None,
            # what a mid-epoch resume's batch count means: the processes (and the options' batch size)
            "world_size": len(state.get("rng_ranks") or [state["rng"]]),
            "options": options,  # what the run was trained with so far
        }
        return self.resume_state

    def _load_schedulers(self, state_path: Path, state: dict) -> None:
        """Load the saved scheduler states (of this run's policy) into the schedulers."""
        log = logging.getLogger(__name__)
        options = state.get("options") or {}
        watched = getattr(self.opt, "plateau_metric", TRAINING_LOSS)
        saved_watch = options.get("plateau_metric")
        # a plateau record of another metric (or, saved before --plateau_metric existed, of the
        # constant 0 the policy was fed then) is no record of this one: the rate stays, the record
        # starts afresh
        stale = saved_watch != watched and any(
            isinstance(s, lr_scheduler.ReduceLROnPlateau) for s in self.schedulers
        )
        if stale:
            log.warning(
                "%s: its plateau scheduler watched %s, this run watches %s; the plateau record starts afresh",
                state_path.name,
                saved_watch or "nothing (a constant 0)",
                watched,
            )
        saved_val_freq = options.get("val_freq")
        if (
            not stale
            and self.plateau_watches_validation()
            and saved_val_freq not in (None, self.opt.val_freq)
        ):
            log.warning(
                "%s was saved with --val_freq %s, this run has --val_freq %s: the plateau record of %s goes "
                "on, but its patience counts validations, now %s epochs apart instead of %s",
                state_path.name,
                saved_val_freq,
                self.opt.val_freq,
                watched,
                self.opt.val_freq,
                saved_val_freq,
            )
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            if stale and isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                continue
            scheduler.load_state_dict(saved)
            if isinstance(scheduler, LinearDecay) and "epoch_count" not in saved:
                # a state saved before the scheduler kept its first epoch: the epoch after the
                # last finished one is step last_epoch
                scheduler.epoch_count = int(state["epoch"]) + 1 - scheduler.last_epoch
                scheduler.set_rate()

    def _start_schedule_afresh(
        self, state_path: Path, saved_policy: str, epoch: int, initial_rates: list[list[float]]
    ) -> None:
        """Build this run's schedulers as a fresh run of its policy started at ``epoch`` would
        have them (:func:`models.schedulers.fresh_start`), on the optimisers just restored: their
        initial rates are this command's again (``initial_lr``, which the saved optimiser state had
        replaced), and so is the rate, but for ``plateau``, which keeps the saved one."""
        plateau = self.opt.lr_policy == "plateau"
        for optimizer, rates in zip(self.optimizers, initial_rates, strict=True):
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                if plateau:  # the rate stays; a fresh plateau scheduler sets no initial rate
                    group.pop("initial_lr", None)
                else:  # the fresh scheduler takes its base rate from here and sets the rate
                    group["initial_lr"] = group["lr"] = rate
        fresh = argparse.Namespace(**{**vars(self.opt), "epoch_count": epoch})
        mode = self.plateau_mode()
        self.schedulers = [get_scheduler(optimizer, fresh, mode) for optimizer in self.optimizers]
        logging.getLogger(__name__).warning(
            "%s was saved with --lr_policy %s, this run has %s: the saved schedule is not loaded; %s starts "
            "afresh at epoch %d, %s (learning rate %g)",
            state_path.name,
            saved_policy,
            self.opt.lr_policy,
            self.opt.lr_policy,
            epoch,
            fresh_start(fresh, epoch),
            self.optimizers[0].param_groups[0]["lr"] if self.optimizers else 0.0,
        )
        if plateau and any(g["lr"] <= 1e-12 for o in self.optimizers for g in o.param_groups):
            # e.g. a cosine schedule saved at its end: the plateau policy only lowers the rate
            logging.getLogger(__name__).warning(
                "%s: the learning rate it was saved with is 0, and --lr_policy plateau only lowers it: "
                "this run will not change the weights; resume with --lr_policy %s, or start a new run",
                state_path.name,
                saved_policy,
            )

    def print_networks(self, verbose: bool = False) -> None:
        print("---------- Networks initialized -------------")
        for name, net in self.networks().items():
            n = sum(p.numel() for p in net.parameters())
            if verbose:
                print(net)
            print(f"[Network {name}] Total number of parameters : {n / 1e6:.3f} M")
        print("-----------------------------------------------")

    # --- mixed precision (opt-in per model) -------------------------------------------------
    @property
    def use_amp(self) -> bool:
        """bf16 autocast and channels_last: on CUDA unless ``--no_amp``; never on the CPU."""
        return self.device.type == "cuda" and not getattr(self.opt, "no_amp", False)

    def autocast(self):
        """Context for a model's forward passes: bf16 autocast when :attr:`use_amp`, else a no-op.

        Models that never call it run in fp32 everywhere, so the switch is harmless to them."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels_last when :attr:`use_amp` and 4-D, else unchanged."""
        return x.contiguous(memory_format=torch.channels_last) if self.use_amp and x.dim() == 4 else x

    @staticmethod
    def set_requires_grad(nets: nn.Module | list[nn.Module | None], requires_grad: bool = False) -> None:
        for net in nets if isinstance(nets, list) else [nets]:
            if net is not None:
                for param in net.parameters():
                    param.requires_grad = requires_grad
