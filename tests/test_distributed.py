"""DistributedDataParallel on the CPU: 2 gloo processes spawned here (torchrun's environment variables).

One step: the ranks load disjoint samples that cover the epoch and end with identical weights.
train.py: 2 epochs write files on rank 0 only; resuming from epoch 1 under 2 processes gives the
straight run's weights exactly. Helpers: rank shares and the single-process answers.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from util import distributed
from util.checkpoint import load_checkpoint

WORLD = 2
DATA = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--crop_size", "32", "--gpu_ids", "-1"]
SMALL = ["--ngf", "8", "--ndf", "8", "--num_threads", "0", "--batch_size", "2", "--display_id", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_env(rank: int, world: int, port: int) -> None:
    """What torchrun exports for a process (single node)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def spawn(fn, *args) -> None:
    """Run ``fn(rank, port, *args)`` in WORLD fresh processes (a failure in one fails the test)."""
    mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=True)


# --- workers (top level, so spawn can pickle them) ------------------------------------------------
def one_step_worker(rank: int, port: int, model_name: str, out: str, cuda: bool = False) -> None:
    torchrun_env(rank, WORLD, port)
    from data import create_dataset
    from models import create_model
    from train import DistributedTrainOptions
    from util.checkpoint import seed_everything

    assert distributed.init(use_cuda=cuda)
    try:
        argv = [*DATA, *SMALL, "--model", model_name, "--name", "x"]
        if cuda:
            argv += ["--gpu_ids", "0", "--sync_bn"]
        opt = DistributedTrainOptions().parse(argv)
        if cuda:
            opt.gpu_ids = [rank]  # what train.py does under torchrun
        opt.checkpoints_dir = out
        seed_everything(100 + rank)  # different initial weights per rank: DDP must make them equal
        dataset = create_dataset(opt)
        dataset.set_epoch(1)
        seen = [k for batch in dataset for k in batch["key"]]
        model = create_model(opt)
        model.setup(opt)
        before = {n: [p.detach().clone() for p in net.parameters()] for n, net in model.networks().items()}
        model.set_input(next(iter(dataset)))
        model.optimize_parameters()
        flat = {
            n: torch.cat([p.detach().reshape(-1) for p in net.parameters()])
            for n, net in model.networks().items()
        }
        moved = {
            n: any(not torch.equal(a, b) for a, b in zip(before[n], net.parameters(), strict=True))
            for n, net in model.networks().items()
        }
        gathered = distributed.all_gather_objects({"seen": seen, "flat": flat, "moved": moved})
        if rank == 0:
            diff = {n: float((gathered[0]["flat"][n] - gathered[1]["flat"][n]).abs().max()) for n in flat}
            result = {"seen": [g["seen"] for g in gathered], "diff": diff, "moved": gathered[0]["moved"]}
            modules = [m for net in model.networks().values() for m in net.modules()]
            result["sync_bn"] = any(isinstance(m, torch.nn.SyncBatchNorm) for m in modules)
            Path(out, "result.json").write_text(json.dumps(result))
    finally:
        distributed.shutdown()


def train_worker(rank: int, port: int, args: list[str], per_rank_dir: str | None) -> None:
    torchrun_env(rank, WORLD, port)
    import train

    if per_rank_dir:  # each rank its own folder: shows which ranks write
        args = [*args, "--checkpoints_dir", str(Path(per_rank_dir) / f"rank{rank}")]
    assert train.main(args) == 0


def synthesis_worker(rank: int, port: int, argv: list[str]) -> None:
    torchrun_env(rank, WORLD, port)
    import eval_3d_sagittal_twostage as synth_cli

    assert synth_cli.main(argv) == 0


# --- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["healthivert", pytest.param("pix2pix", marks=pytest.mark.slow)])
def test_one_step_disjoint_samples_and_equal_weights(tmp_path, model_name):
    spawn(one_step_worker, model_name, str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    a, b = (set(s) for s in result["seen"])
    assert len(result["seen"][0]) == len(result["seen"][1]) == 4
    assert not a & b and a | b == {f"synthetic_{i}" for i in range(8)}
    assert all(result["moved"].values()), result["moved"]  # the step changed every network
    assert all(d == 0.0 for d in result["diff"].values()), result["diff"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_one_step_on_two_gpus_with_sync_bn(tmp_path):
    spawn(one_step_worker, "healthivert", str(tmp_path), True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sync_bn"] and all(result["moved"].values())
    assert all(d == 0.0 for d in result["diff"].values()), result["diff"]


def test_train_two_processes_rank0_writes_and_resume_is_exact(tmp_path):
    # 8 samples, batch 2 per process, 2 processes = 2 iterations per epoch; 2 epochs
    common = [*DATA, *SMALL, "--model", "healthivert", "--max_dataset_size", "8", "--n_epochs", "1"]
    common += ["--n_epochs_decay", "1", "--val_freq", "1", "--val_phase", "val", "--max_val_samples", "2"]
    common += ["--save_epoch_freq", "1", "--print_freq", "4"]
    spawn(train_worker, [*common, "--name", "straight"], str(tmp_path / "per_rank"))
    assert not (tmp_path / "per_rank" / "rank1").exists()  # rank 1 wrote nothing, not even a folder
    run = tmp_path / "per_rank" / "rank0" / "straight"
    for name in ("latest_net_G.pth", "latest_net_D.pth", "opt.json", "loss_log.txt", "web/index.html"):
        assert (run / name).exists(), name
    assert "(epoch: 1, iters: 4" in (run / "loss_log.txt").read_text()  # counters count both ranks
    assert json.loads((run / "val_metrics.json").read_text())[-1]["epoch"] == 2
    state = load_checkpoint(run / "1_train_state.pth")
    assert state["total_iters"] == 8 and len(state["rng_ranks"]) == WORLD

    resumed = tmp_path / "shared" / "resumed"
    resumed.mkdir(parents=True)
    for name in ("1_net_G.pth", "1_net_D.pth", "1_train_state.pth"):
        (resumed / name).write_bytes((run / name).read_bytes())
    args = [*common, "--name", "resumed", "--checkpoints_dir", str(tmp_path / "shared")]
    spawn(train_worker, [*args, "--continue_train", "--epoch", "1"], None)
    for net in ("G", "D"):
        a = load_checkpoint(run / f"latest_net_{net}.pth")
        b = load_checkpoint(resumed / f"latest_net_{net}.pth")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net
    assert load_checkpoint(resumed / "latest_train_state.pth")["total_iters"] == 16


def test_single_process_answers_without_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and not distributed.init(use_cuda=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather_objects("x") == ["x"]
    assert distributed.backend_for(False) == "gloo"


def test_rank_slices_are_disjoint_and_cover():
    items = list(range(11))
    shares = [distributed.rank_slice(items, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == items and shares[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError):
        distributed.rank_slice(items, 3, 3)


def test_two_process_synthesis_writes_what_one_process_writes(tmp_path):
    import eval_3d_sagittal_twostage as synth_cli
    from data.nifti_io import load_ct
    from tests.test_synthesis import cli_args, write_dataset, write_healthivert_run

    write_dataset(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    write_healthivert_run(checkpoints, "real_sagittal", "sagittal", tmp_path / "straightened")
    torch.set_num_threads(1)
    assert synth_cli.main(cli_args(tmp_path, checkpoints, tmp_path / "one", "--name", "real_sagittal")) == 0
    spawn(synthesis_worker, cli_args(tmp_path, checkpoints, tmp_path / "two", "--name", "real_sagittal"))
    for sub in ("CT_fake", "label_fake"):
        one = sorted(p.name for p in (tmp_path / "one" / sub).iterdir())
        two = sorted(p.name for p in (tmp_path / "two" / sub).iterdir())
        assert one == two and len(one) == 3, (one, two)
        for name in one:
            a, b = load_ct(tmp_path / "one" / sub / name), load_ct(tmp_path / "two" / sub / name)
            assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine), name
    # the completeness check: complete, then one volume lost (as from a killed array task)
    from util import check_outputs

    check = ["--dataroot", str(tmp_path / "straightened"), "--output_dir", str(tmp_path / "two")]
    assert check_outputs.main(check) == 0
    (tmp_path / "two" / "label_fake" / "p1_20.nii.gz").write_bytes(b"cut short")
    assert check_outputs.main(check) == 1
    assert check_outputs.main([*check, "--vertebra_json", str(tmp_path / "vertebra_data.json")]) == 1
    assert check_outputs.main([*check[:2]]) == 2
