"""The dataset base class and the split-file reader shared by dataset modes."""

from __future__ import annotations

import argparse
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch.utils.data

from util.atomic import read_json
from util.errors import input_error

SPLITS = ("train", "val", "test")


class BaseDataset(torch.utils.data.Dataset, ABC):
    """Subclasses implement ``__len__`` and ``__getitem__`` (a dict of tensors and paths)."""

    #: options of the shared parser this dataset does not read (see ``BaseModel.IGNORED_OPTIONS``)
    IGNORED_OPTIONS: tuple[str, ...] = ()

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.root = opt.dataroot

    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        """Add dataset-specific flags or change defaults."""
        return parser

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> dict: ...


def split_key(key: str) -> tuple[str, int]:
    """'sub-verse401_series0_20' -> ('sub-verse401_series0', 20): the vertebra id is after the last '_'."""
    pid, _, vid = key.rpartition("_")
    if not pid or not vid.isdigit():
        raise ValueError(f"split key {key!r} is not '<pid>_<vertebra id>'")
    return pid, int(vid)


def read_split(path: str | os.PathLike, phase: str | None = None) -> dict:
    """Read ``vertebra_data.json``; with ``phase``, that split's {key: grade} (an error if empty)."""
    path = Path(path)
    data = read_json(path, "split file")
    if not isinstance(data, dict) or not set(data) <= set(SPLITS):
        raise input_error(path, f"expected {{{'|'.join(SPLITS)}: {{'<pid>_<vid>': grade}}}}")
    for name, entries in data.items():
        for key, grade in entries.items():
            try:
                split_key(key)
            except ValueError as exc:
                raise input_error(path, f"split {name!r}: {exc}") from exc
            if grade not in (0, 1, 2, 3):
                raise input_error(path, f"split {name!r}: {key} has grade {grade!r}; expected 0-3")
    if phase is None:
        return data
    if not data.get(phase):
        raise input_error(path, f"split {phase!r} is empty or missing")
    return data[phase]
