"""Run a trained model on a split and write its result images to an HTML page.

python test.py --dataroot D --name NAME --model healthivert --phase test --epoch latest
"""

from __future__ import annotations

import sys
from pathlib import Path

from data import create_dataset
from models import create_model
from options.test_options import TestOptions
from util.errors import InputError
from util.html import HTML
from util.registry import RegistryError
from util.visualizer import save_image, tensor2im


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opt = TestOptions().parse(argv)
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
