"""Run a trained model on a split and write its result images to an HTML page.

python test.py --dataroot D --name NAME --model healthivert --phase test --epoch latest

The networks are rebuilt from the training options saved in ``checkpoints_dir/name/opt.json``
(sizes, model flags); flags given on this command line override them (data paths, split,
epoch, results folder). Without ``opt.json`` the command-line options are used as they are.
Results: ``results_dir/name/<phase>_<epoch>/index.html`` and ``images/`` (``<phase>_iter_<N>`` with
``--load_iter N``). The page is built in a hidden folder beside it and renamed into place at the
end, replacing an earlier result of the same name; a sample that cannot be read (a bad crop or CAM
map) ends the run with one error line and exit status 2, leaving any earlier result as it was.
Crops of another grid than the run was trained on (its ``train_crops.json``) are warned about.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from data import create_dataset
from data.crops import dataset_crops, grid_warnings
from models import create_model
from options.base_options import load_options
from options.test_options import TestOptions
from util.atomic import atomic_dir
from util.checkpoint import seed_everything
from util.errors import InputError, failure_line, input_error, one_line
from util.html import HTML
from util.registry import RegistryError
from util.visualizer import save_image, tensor2im

TEST_KEYS = ("isTrain", "results_dir", "aspect_ratio", "phase", "eval", "num_test", "epoch", "load_iter")
TEST_KEYS += ("serial_batches", "num_threads", "batch_size", "no_flip", "gpu_ids", "continue_train", "name")
TEST_KEYS += ("max_dataset_size",)  # a training run's sample cap is no cap on what is tested


def test_options(argv: list[str]):
    """Test options: the saved training options, overridden by test-only flags and by every flag
    that this command line names (at its default value too) or that has a non-default value."""
    options = TestOptions()
    opt = options.parse(argv)
    saved_path = Path(opt.checkpoints_dir) / opt.name / "opt.json"
    if not saved_path.exists():
        return opt
    parser = options.parser_
    # the flags this command line names, even at their default value (argparse leaves the
    # attributes a namespace already has alone unless the command line sets them)
    unset = object()
    named = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    given = {
        k: v
        for k, v in vars(opt).items()
        if k in TEST_KEYS or getattr(named, k, unset) is not unset or v != parser.get_default(k)
    }
    given["checkpoints_dir"] = opt.checkpoints_dir
    merged = load_options(saved_path, **given)
    merged.continue_train = False
    return merged


def loader_message(exc: BaseException) -> str:
    """The one-line message of an error from the data loader.

    An error raised in a loader worker process (``--num_threads`` > 0) comes back with the
    worker's traceback in its message; the original message is its last line.
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.partition(": ")[2] or last
    return one_line(text)


def sample_stem(paths: list, index: int, used: set[str]) -> str:
    """A unique image-name stem for a test sample: its file's stem, with the slice of a slice dataset
    (``case.nii.gz#slice40`` -> ``case_slice40``), never one an earlier sample of this page took."""
    if paths:
        name, _, part = Path(str(paths[0])).name.partition("#")
        stem = name.split(".")[0] + (f"_{part}" if part else "")
    else:
        stem = f"{index:05d}"
    if stem in used:
        stem = f"{stem}_{index:05d}"
    used.add(stem)
    return stem


def write_results(opt, dataset, model, web_dir: Path, title: str) -> int:
    """Test ``opt.num_test`` samples and write their images and ``index.html`` under ``web_dir``."""
    page = HTML(web_dir, title)
    if opt.eval:
        model.eval()
    done = 0
    used: set[str] = set()
    for i, data in enumerate(dataset):
        if i >= opt.num_test:
            break
        model.set_input(data)
        model.test()
        stem = sample_stem(model.get_image_paths(), i, used)
        names, paths = [], []
        for label, tensor in model.get_current_visuals().items():
            rel = f"images/{stem}_{label}.png"
            save_image(tensor2im(tensor), web_dir / rel)
            names.append(label)
            paths.append(rel)
        page.add_header(stem)
        page.add_images(paths, names, paths, width=opt.display_winsize)
        done += 1
    page.save()
    return done


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opt = test_options(argv)
        seed_everything(opt.seed)  # models that sample at test time (pix2pix's dropout) follow --seed
        dataset = create_dataset(opt)
        crops = dataset_crops(dataset.dataset)
        if crops is not None:
            for line in grid_warnings(*crops, {opt.name: Path(opt.checkpoints_dir) / opt.name}):
                print(line)
        model = create_model(opt)
        model.setup(opt)
    except (RegistryError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tag = f"iter_{opt.load_iter}" if opt.load_iter > 0 else opt.epoch
    web_dir = Path(opt.results_dir) / opt.name / f"{opt.phase}_{tag}"
    title = f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {tag}"
    # folders this run creates above the page, removed again if it fails
    created = [p for p in (web_dir.parent, *web_dir.parent.parents) if not p.exists()]
    finished = False
    try:
        if web_dir.exists() and not web_dir.is_dir():
            raise input_error(web_dir, "the results folder is a file")
        with atomic_dir(web_dir) as work:
            done = write_results(opt, dataset, model, work, title)
        finished = True
    except (InputError, OSError) as exc:
        message = loader_message(exc) if isinstance(exc, InputError) else failure_line(exc, web_dir)
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        if not finished:  # nothing of this run stays
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
    print(f"tested {done} samples; results in {web_dir}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
