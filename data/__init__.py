"""Datasets (found by name), NIfTI I/O, label schemes and the synthetic spine phantom.

``--dataset_mode X`` loads ``data/X_dataset.py`` and its ``XDataset`` class, a subclass of
:class:`data.base_dataset.BaseDataset`. A new dataset is one new file.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.data

from data.base_dataset import BaseDataset
from util.registry import available, find_class


def available_datasets() -> list[str]:
    return available("data", "dataset")


def find_dataset_using_name(name: str) -> type[BaseDataset]:
    """The dataset class for ``name``; :class:`util.registry.RegistryError` lists the names if unknown."""
    return find_class("data", name, "dataset", BaseDataset)


def get_option_setter(name: str):
    return find_dataset_using_name(name).modify_commandline_options


class DatasetLoader:
    """A dataset and its DataLoader; uses a DistributedSampler under torch.distributed.

    Under torchrun each rank loads its own share of every epoch: the DistributedSampler permutes
    the indices with ``(--seed, epoch)`` (the same permutation on every rank) and gives rank r
    positions r, r + W, ... (W ranks), so the shares are disjoint and together cover the epoch
    (when the size is not a multiple of W a few samples are repeated to even the shares).
    ``--batch_size`` is per process: one iteration consumes ``batch_size * W`` samples. The
    dataset's own per-epoch draws (training slices) depend on ``(seed, epoch, index)`` only, so a
    sample is drawn the same whichever rank loads it. ``opt.distributed_sampler = False`` gives
    every rank the whole dataset (validation).
    """

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.dataset = find_dataset_using_name(opt.dataset_mode)(opt)
        self.sampler = None
        shuffle = not opt.serial_batches
        self.world = 1
        if (
            getattr(opt, "distributed_sampler", True)
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            self.sampler = torch.utils.data.distributed.DistributedSampler(
                self.dataset, shuffle=shuffle, seed=int(getattr(opt, "seed", 0))
            )
            self.world = self.sampler.num_replicas
            shuffle = False
        share = len(self.sampler) if self.sampler is not None else len(self.dataset)
        loaded = self.dataset
        limit = opt.max_dataset_size
        in_order = self.sampler is None and not shuffle
        if not getattr(opt, "isTrain", False) and in_order and limit < len(loaded):
            # an evaluation pass in order takes exactly the first --max_dataset_size samples (the
            # training loop's limit counts whole batches, as pix2pix's does)
            loaded = torch.utils.data.Subset(self.dataset, range(int(limit)))
        self.dataloader = torch.utils.data.DataLoader(
            loaded,
            batch_size=opt.batch_size,
            shuffle=shuffle,
            sampler=self.sampler,
            num_workers=int(opt.num_threads),
            drop_last=bool(getattr(opt, "isTrain", False)) and share >= opt.batch_size,
            persistent_workers=int(opt.num_threads) > 0,
        )
        print(f"dataset [{type(self.dataset).__name__}] was created ({len(self.dataset)} samples)")

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # per-epoch slice draws (data/aligned_sagittal_dataset.py)
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return int(min(len(self.dataset), self.opt.max_dataset_size))

    def __iter__(self):
        for i, batch in enumerate(self.dataloader):  # --max_dataset_size counts all ranks' samples
            if i * self.opt.batch_size * self.world >= self.opt.max_dataset_size:
                break
            yield batch


def create_dataset(opt: argparse.Namespace) -> DatasetLoader:
    return DatasetLoader(opt)
