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
    """A dataset and its DataLoader; uses a DistributedSampler under torch.distributed."""

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.dataset = find_dataset_using_name(opt.dataset_mode)(opt)
        self.sampler = None
        shuffle = not opt.serial_batches
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.sampler = torch.utils.data.distributed.DistributedSampler(self.dataset, shuffle=shuffle)
            shuffle = False
        self.dataloader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=opt.batch_size,
            shuffle=shuffle,
            sampler=self.sampler,
            num_workers=int(opt.num_threads),
            drop_last=bool(getattr(opt, "isTrain", False)) and len(self.dataset) >= opt.batch_size,
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
        for i, batch in enumerate(self.dataloader):
            if i * self.opt.batch_size >= self.opt.max_dataset_size:
                break
            yield batch


def create_dataset(opt: argparse.Namespace) -> DatasetLoader:
    return DatasetLoader(opt)
