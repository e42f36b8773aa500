"""Run a trained model on a split and write its result images to an HTML page.

python test.py --dataroot D --name NAME --model healthivert --phase test --epoch latest

The networks are rebuilt from the training options saved in ``checkpoints_dir/name/opt.json``
(sizes, model flags); flags given on this command line override them (data paths, split,
epoch, results folder). Without ``opt.json`` the command-line options are used as they are.
Results: ``results_dir/name/<phase>_<epoch>/index.html`` and ``images/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data import create_dataset
from models import create_model
from options.base_options import load_options
from options.test_options import TestOptions
from util.errors import InputError
from util.html import HTML
from util.registry import RegistryError
from util.visualizer import save_image, tensor2im

TEST_KEYS = ("isTrain", "results_dir", "aspect_ratio", "phase", "eval", "num_test", "epoch", "load_iter")
TEST_KEYS += ("serial_batches", "num_threads", "batch_size", "no_flip", "gpu_ids", "continue_train", "name")


def test_options(argv: list[str]):
    """Test options: the saved training options, overridden by test-only flags and by every flag
    that this command line sets to a non-default value."""
    options = TestOptions()
    opt = options.parse(argv)
    saved_path = Path(opt.checkpoints_dir) / opt.name / "opt.json"
    if not saved_path.exists():
        return opt
    parser = options.parser_
    given = {k: v for k, v in vars(opt).items() if k in TEST_KEYS or v != parser.get_default(k)}
    given["checkpoints_dir"] = opt.checkpoints_dir
    merged = load_options(saved_path, **given)
    merged.continue_train = False
    return merged


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opt = test_options(argv)
        dataset = create_dataset(opt)
        model = create_model(opt)
        model.setup(opt)
    except (RegistryError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    web_dir = Path(opt.results_dir) / opt.name / f"{opt.phase}_{opt.epoch}"
    page = HTML(web_dir, f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {opt.epoch}")
    if opt.eval:
        model.eval()
    done = 0
    for i, data in enumerate(dataset):
        if i >= opt.num_test:
            break
        model.set_input(data)
        model.test()
        stem = (
            Path(str(model.get_image_paths()[0])).name.split(".")[0]
            if model.get_image_paths()
            else f"{i:05d}"
        )
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
    print(f"tested {done} samples; results in {web_dir}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
