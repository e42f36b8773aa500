"""Train a model.

    python train.py --dataroot D --name NAME --model healthivert [--dataset_mode aligned_sagittal] ...

The loop is the pix2pix one: per iteration ``set_input`` + ``optimize_parameters``; result images
to the HTML page every ``--display_freq`` iterations; losses printed, logged and plotted every
``--print_freq``; checkpoints every ``--save_latest_freq`` iterations and ``--save_epoch_freq``
epochs. ``--continue_train --epoch latest`` resumes optimisers, schedulers, counters and random
state exactly.
"""

from __future__ import annotations

import sys
import time

from data import create_dataset
from models import create_model
from options.base_options import setup
from options.train_options import TrainOptions
from util.errors import InputError
from util.registry import RegistryError
from util.visualizer import Visualizer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = TrainOptions()
    try:
        opt = options.parse(argv)
        setup(opt, options.parser_)
        dataset = create_dataset(opt)
        model = create_model(opt)
        model.setup(opt)
    except (RegistryError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    visualizer = Visualizer(opt)
    total_iters, first_epoch = 0, opt.epoch_count
    resume = getattr(model, "resume_state", None)
    if opt.continue_train and resume:
        first_epoch, total_iters = resume["epoch"] + 1, resume["total_iters"]
    last_epoch = opt.n_epochs + opt.n_epochs_decay
    start = time.time()
    for epoch in range(first_epoch, last_epoch + 1):
        epoch_start = iter_data_time = time.time()
        epoch_iter = 0
        visualizer.reset()
        dataset.set_epoch(epoch)
        model.train()
        for data in dataset:
            iter_start = time.time()
            t_data = iter_start - iter_data_time
            total_iters += opt.batch_size
            epoch_iter += opt.batch_size
            model.set_input(data)
            model.optimize_parameters()
            if total_iters % opt.display_freq == 0:
                model.compute_visuals()
                visualizer.display_current_results(
                    model.get_current_visuals(), epoch, total_iters % opt.update_html_freq == 0
                )
            if total_iters % opt.print_freq == 0:
                losses = model.get_current_losses()
                t_comp = (time.time() - iter_start) / opt.batch_size
                visualizer.print_current_losses(epoch, epoch_iter, losses, t_comp, t_data)
                visualizer.plot_current_losses(epoch, epoch_iter / max(len(dataset), 1), losses)
            if total_iters % opt.save_latest_freq == 0:
                tag = f"iter_{total_iters}" if opt.save_by_iter else "latest"
                print(f"saving the latest model (epoch {epoch}, total_iters {total_iters})")
                model.save_networks(tag)
            iter_data_time = time.time()
        lr = model.update_learning_rate()
        if epoch % opt.save_epoch_freq == 0 or epoch == last_epoch:
            for tag in ("latest", epoch):
                model.save_networks(tag)
                model.save_train_state(tag, epoch, total_iters)
        print(
            f"end of epoch {epoch} / {last_epoch}, {time.time() - epoch_start:.1f} s, learning rate {lr:.7f}"
        )
    print(
        f"trained {opt.model} for epochs {first_epoch}-{last_epoch} ({total_iters} samples) "
        f"in {time.time() - start:.1f} s; checkpoints in {visualizer.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
