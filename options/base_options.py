"""Options shared by training and testing, in the pix2pix/CycleGAN shape.

``BaseOptions().parse(args)`` takes an explicit argument list and only parses: the model and the
dataset mode may add their own flags (``modify_commandline_options``), so parsing runs in two
passes. :func:`setup` is the separate step that prints the options, saves ``opt.json`` next to
the checkpoints and seeds the random generators. :func:`load_options` reads a saved
``opt.json`` back, so evaluation rebuilds networks from the training options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from util.atomic import read_json, write_json
from util.checkpoint import seed_everything
from util.errors import InputError


class BaseOptions:
    """Flags common to every script; subclasses add train or test flags."""

    is_train = False

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = parser.add_argument_group("experiment")
        g.add_argument("--dataroot", default=None, help="dataset root (raw/, straightened/, heatmap/)")
        g.add_argument(
            "--name", default="experiment", help="experiment name; checkpoints go to checkpoints_dir/name"
        )
        g.add_argument(
            "--gpu_ids",
            default="auto",
            help="'auto': CUDA device 0 when present, else the CPU; '-1': the CPU; '0,1': these devices",
        )
        g.add_argument(
            "--checkpoints_dir", default="./checkpoints", help="where models and options are saved"
        )
        g.add_argument("--seed", type=int, default=0, help="random seed")
        g.add_argument("--verbose", action="store_true", help="print more")
        g.add_argument(
            "--suffix", default="", help="appended to --name, may use {model} and other option names"
        )

        g = parser.add_argument_group("model")
        g.add_argument("--model", default="healthivert", help="model name: models/<model>_model.py")
        g.add_argument("--input_nc", type=int, default=1, help="input channels")
        g.add_argument("--output_nc", type=int, default=1, help="output channels")
        g.add_argument("--ngf", type=int, default=16, help="generator filters in the first layer")
        g.add_argument("--ndf", type=int, default=64, help="discriminator filters in the first layer")
        g.add_argument(
            "--netD", default="basic", help="discriminator: basic (70x70 PatchGAN) | n_layers | pixel"
        )
        g.add_argument("--netG", default="", help="generator architecture (model specific)")
        g.add_argument("--n_layers_D", type=int, default=3, help="layers of an n_layers discriminator")
        g.add_argument("--norm", default="batch", help="normalisation: instance | batch | none")
        g.add_argument(
            "--init_type", default="normal", help="weight init: normal | xavier | kaiming | orthogonal"
        )
        g.add_argument("--init_gain", type=float, default=0.02, help="scale of the weight init")
        g.add_argument("--no_dropout", action="store_true", help="no dropout in the generator")

        g = parser.add_argument_group("data")
        g.add_argument("--dataset_mode", default="aligned_sagittal", help="dataset: data/<mode>_dataset.py")
        g.add_argument("--direction", default="BtoA", help="AtoB or BtoA")
        g.add_argument("--serial_batches", action="store_true", help="take samples in order, no shuffling")
        g.add_argument("--num_threads", type=int, default=4, help="data loader worker processes")
        g.add_argument("--batch_size", type=int, default=12, help="batch size")
        g.add_argument("--load_size", type=int, default=256, help="scale images to this size")
        g.add_argument("--crop_size", type=int, default=256, help="then crop to this size")
        g.add_argument(
            "--max_dataset_size", type=float, default=float("inf"), help="use at most this many samples"
        )
        g.add_argument("--preprocess", default="none", help="resize_and_crop | crop | scale_width | none")
        g.add_argument("--no_flip", action="store_true", help="no flipping augmentation")
        g.add_argument("--display_winsize", type=int, default=256, help="display window size")
        g.add_argument("--epoch", default="latest", help="which epoch to load: a number or 'latest'")
        g.add_argument("--load_iter", type=int, default=0, help="load by iteration when > 0")

        g = parser.add_argument_group("vertebrae")
        g.add_argument("--vertebra_json", default=None, help="split file {train|val|test: {pid_vid: grade}}")
        g.add_argument("--cam_folder", default=None, help="folder of Grad-CAM++ maps <pid>_<vid>.nii.gz")
        g.add_argument("--vert_class", default="normal", help="train on 'normal' or 'abnormal' vertebrae")
        g.add_argument(
            "--normal_max_grade",
            type=int,
            default=0,
            help="largest Genant grade that counts as normal (the reference used 1)",
        )
        g.add_argument("--mask_height_mm", type=float, default=40.0, help="height of the hole, in mm")
        g.add_argument("--spacing_mm", type=float, default=1.0, help="voxel size of the straightened crops")
        g.add_argument("--label_scheme", default="verse", help="vertebra ids: verse | totalseg")
        g.add_argument("--plane", default="sagittal", help="sagittal | coronal")
        return parser

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        return self.initialize(parser)

    def parse(self, args: list[str] | None = None) -> argparse.Namespace:
        """Parse ``args`` (an explicit list; ``None`` means no arguments, never ``sys.argv``)."""
        import data
        import models

        args = [] if args is None else list(args)
        parser = self.parser()
        opt, _ = parser.parse_known_args(args)
        parser = models.get_option_setter(opt.model)(parser, self.is_train)
        opt, _ = parser.parse_known_args(args)
        parser = data.get_option_setter(opt.dataset_mode)(parser, self.is_train)
        opt = parser.parse_args(args)
        opt.isTrain = self.is_train
        ignored = [
            f"--{name} {getattr(opt, name)}"
            for name in ignored_options(opt)
            if hasattr(opt, name) and getattr(opt, name) != parser.get_default(name)
        ]
        if ignored:  # accepted so the reference's commands run; saying so beats training as if they acted
            print(
                f"warning: --model {opt.model} on --dataset_mode {opt.dataset_mode} does not use "
                f"{', '.join(ignored)}: ignored",
                file=sys.stderr,
            )
        if opt.suffix:
            opt.name = f"{opt.name}_{opt.suffix.format(**vars(opt))}"
        opt.gpu_ids = parse_gpu_ids(opt.gpu_ids)
        self.parser_ = parser
        return opt


def ignored_options(opt: argparse.Namespace) -> tuple[str, ...]:
    """Options of the shared parser that ``opt.model`` and ``opt.dataset_mode`` do not read (their
    ``IGNORED_OPTIONS``): accepted for the reference's commands, without effect."""
    import data
    import models

    model = models.find_model_using_name(opt.model).IGNORED_OPTIONS
    return (*model, *data.find_dataset_using_name(opt.dataset_mode).IGNORED_OPTIONS)


def parse_gpu_ids(spec: str) -> list[int]:
    """``--gpu_ids``: 'auto' (CUDA device 0 when present), '-1' (the CPU) or device ids like '0,1'.

    Without CUDA, device ids fall back to the CPU with a warning; anything else is an InputError.
    """
    if spec == "auto":
        return [0] if torch.cuda.is_available() else []
    try:
        ids = [i for i in (int(s) for s in str(spec).split(",") if s.strip() != "") if i >= 0]
    except ValueError:
        raise InputError(f"--gpu_ids {spec!r}: expected auto, -1 or device ids like 0,1") from None
    if ids and not torch.cuda.is_available():
        warnings.warn(f"--gpu_ids {spec}: CUDA is not available here; running on the CPU", stacklevel=3)
        return []
    return ids


def device_of(opt: argparse.Namespace) -> torch.device:
    """The device the options ask for (CPU when no GPU id is given)."""
    return torch.device(f"cuda:{opt.gpu_ids[0]}") if opt.gpu_ids else torch.device("cpu")


def options_text(opt: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> str:
    """The options, one per line, with defaults shown where the value differs."""
    lines = ["----------------- Options ---------------"]
    for key, value in sorted(vars(opt).items()):
        default = parser.get_default(key) if parser is not None else None
        note = (
            f"\t[default: {default}]"
            if parser is not None and value != default and default is not None
            else ""
        )
        lines.append(f"{key:>25}: {value!s:<30}{note}")
    lines.append("----------------- End -------------------")
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return value


def save_options(opt: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write the options as JSON (atomically)."""
    write_json(path, {k: _jsonable(v) for k, v in sorted(vars(opt).items())})


def option_changes(saved: dict, now: argparse.Namespace, ignore=()) -> list[str]:
    """``--key saved there, now now`` for each option of ``now`` whose value differs from the one
    in ``saved`` (a run's options as its JSON holds them), and ``--key not recorded there ...``
    for each option ``saved`` lacks: a run saved before that option existed was trained by code
    that did whatever it did then, which this version cannot tell from its default. Leaves out the
    names in ``ignore`` (where things are, how a run is shown or run) and options ``now`` leaves to
    be decided when the run starts (None)."""

    def as_saved(values: dict) -> dict:  # tuples as lists, inf as opt.json writes it
        return json.loads(json.dumps({k: _jsonable(v) for k, v in values.items()}))

    current, saved = as_saved(vars(now)), as_saved(saved)
    changes = []
    for key, value in sorted(current.items()):
        if key in ignore or value is None:
            continue
        if key not in saved:
            changes.append(f"--{key} not recorded there (saved before the option existed), {value} now")
        elif saved[key] != value:
            changes.append(f"--{key} {saved[key]} there, {value} now")
    return changes


def load_options(path: str | os.PathLike, **overrides) -> argparse.Namespace:
    """Read a saved ``opt.json`` back into a namespace, with ``overrides`` applied."""
    values = read_json(path, "saved options", "opt.json is written when training starts")
    if values.get("max_dataset_size") == "inf":
        values["max_dataset_size"] = float("inf")
    values.update(overrides)
    return argparse.Namespace(**values)


def setup(opt: argparse.Namespace, parser: argparse.ArgumentParser | None = None, save: bool = True) -> str:
    """Print the options, save them to ``checkpoints_dir/name/opt.json`` and seed the generators."""
    text = options_text(opt, parser)
    print(text)
    if save:
        save_options(opt, Path(opt.checkpoints_dir) / opt.name / "opt.json")
    seed_everything(opt.seed)
    return text
