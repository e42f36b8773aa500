"""Shared fixtures: paths to the shared real data, tiny NIfTI writers, small phantom datasets."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HEALTHIVERT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@functools.cache
def test_script():
    """The project's ``test.py`` as a module, loaded by its path: the name ``test`` is also the
    standard library's test package."""
    spec = importlib.util.spec_from_file_location(
        "test_script", Path(__file__).resolve().parents[1] / "test.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared(relative: str) -> Path:
    """A file under the shared sample data; the test is skipped if the data is not on this machine."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared sample data not found: {path}")
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="session")
def phantom_2mm(tmp_path_factory) -> Path:
    """Three patients at 2 mm with plenty of fractures (generated once per session)."""
    from data.phantom import generate

    out = tmp_path_factory.mktemp("phantom_2mm")
    generate(out, patients=3, seed=7, spacing_mm=2.0, fracture_fraction=0.4, progress=False)
    return out


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (a 2-core machine shared with other jobs); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def use_cuda_precision_on_cpu(monkeypatch) -> list[str]:
    """Run models on the CPU down the CUDA path: bf16 autocast and channels_last (``--no_amp``
    still turns it off). No GPU reaches CI, so this is where the mixed-precision code is exercised:
    most dtype mix-ups there (a bf16 tensor into an fp32-only op, a loss summed across dtypes) fail
    here as they would on a GPU, though CPU and CUDA autocast do not cast every op alike; CUDA's
    own kernels are left to the ``gpu`` tests. Returns a list that gets the model's class name each
    time a forward pass enters bf16 autocast, so a test can check the mixed path ran."""
    from models.base_model import BaseModel

    entered: list[str] = []
    autocast = BaseModel.autocast

    def recording_autocast(self):
        if self.use_amp:
            entered.append(type(self).__name__)
        return autocast(self)

    monkeypatch.setattr(BaseModel, "use_amp", property(lambda self: not getattr(self.opt, "no_amp", False)))
    monkeypatch.setattr(BaseModel, "autocast", recording_autocast)
    return entered
