"""Training flags: display and saving frequencies, schedule, optimiser, resuming."""

from __future__ import annotations

import argparse

from options.base_options import BaseOptions, ignored_options

# options that say where things are, how a run is shown, saved, resumed or run: not what it learns
PLACE_OPTIONS = (
    "dataroot",
    "vertebra_json",
    "cam_folder",
    "crop_cache_dir",
    "checkpoints_dir",
    "name",
    "gpu_ids",
    "num_threads",
    "continue_train",
    "epoch",
    "epoch_count",
    "load_iter",
    "print_freq",
    "no_html",
    "update_html_freq",
    "save_epoch_freq",
    "save_latest_freq",
    "save_by_iter",
    "verbose",
    "suffix",
    "display_id",
    "display_freq",
    "display_env",
    "display_ncols",
    "display_port",
    "display_server",
    "display_winsize",
    "no_amp",
    "grad_checkpoint",
    "isTrain",
    "phase",
)


def not_learning_options(opt: argparse.Namespace) -> tuple[str, ...]:
    """Options that cannot make two runs of ``opt.model`` learn differently: where things are and
    how a run is shown (:data:`PLACE_OPTIONS`) and the options neither the model nor its dataset
    reads (:func:`options.base_options.ignored_options`)."""
    return (*PLACE_OPTIONS, *ignored_options(opt))


class TrainOptions(BaseOptions):
    is_train = True

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = super().initialize(parser)
        g = parser.add_argument_group("display and saving")
        g.add_argument("--display_freq", type=int, default=400, help="iterations between saved result images")
        g.add_argument("--display_ncols", type=int, default=4, help="images per row in visdom")
        g.add_argument("--display_id", type=int, default=0, help="visdom window id; 0 = no visdom (default)")
        g.add_argument("--display_server", default="http://localhost", help="visdom server")
        g.add_argument("--display_env", default="main", help="visdom environment")
        g.add_argument("--display_port", type=int, default=8097, help="visdom port")
        g.add_argument("--update_html_freq", type=int, default=1000, help="iterations between HTML updates")
        g.add_argument("--print_freq", type=int, default=100, help="iterations between loss prints")
        g.add_argument("--no_html", action="store_true", help="do not write the HTML page")
        g.add_argument("--save_latest_freq", type=int, default=5000, help="iterations between 'latest' saves")
        g.add_argument("--save_epoch_freq", type=int, default=5, help="epochs between numbered saves")
        g.add_argument("--save_by_iter", action="store_true", help="name checkpoints by iteration")
        g.add_argument("--continue_train", action="store_true", help="resume from --epoch (exactly)")
        g.add_argument("--epoch_count", type=int, default=1, help="first epoch number")
        g.add_argument("--phase", default="train", help="train | val | test")
        g = parser.add_argument_group("schedule and optimiser")
        g.add_argument("--n_epochs", type=int, default=200, help="epochs at the initial learning rate")
        g.add_argument("--n_epochs_decay", type=int, default=800, help="epochs of linear decay to zero")
        g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
        g.add_argument("--lr", type=float, default=2e-4, help="initial learning rate")
        g.add_argument("--gan_mode", default="vanilla", help="vanilla | lsgan | hinge | wgangp")
        g.add_argument("--pool_size", type=int, default=0, help="image buffer for the discriminators")
        g.add_argument("--lr_policy", default="linear", help="linear | step | plateau | cosine")
        g.add_argument(
            "--plateau_metric",
            default="loss_G",
            help="what the plateau policy watches (x0.2 after 6 epochs without a 1 %% gain): loss_G, "
            "the epoch's mean generator training loss, or a validation metric of the model (healthivert: "
            "ssim | psnr | dice | coarse_dice | height_error_mm; pix2pix: ssim | psnr), then stepped only "
            "on the epochs that validate (--val_freq), so its patience counts validations",
        )
        g.add_argument(
            "--no_amp",
            action="store_true",
            help="on CUDA: no bf16 autocast / channels_last (CPU is always fp32)",
        )
        g = parser.add_argument_group("validation")
        g.add_argument("--val_freq", type=int, default=15, help="epochs between validations (0: none)")
        g.add_argument("--val_phase", default="val", help="split used for validation")
        g.add_argument(
            "--max_val_samples", type=int, default=200, help="validate on at most this many samples"
        )
        g = parser.add_argument_group("schedule and optimiser (cont.)")
        g.add_argument("--lr_decay_iters", type=int, default=50, help="step policy: epochs between decays")
        return parser
