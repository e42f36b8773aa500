"""``--dataset_mode aligned_coronal``: the sagittal dataset's samples from coronal slices.

A coronal slice is taken at fixed crop axis 1 (anterior-posterior), giving rows x right-left; it
is padded centred (CT -1, masks 0) to the crop's anterior-posterior width, so both planes give
H x W images of the same size; ``col_start``/``col_stop`` say which columns hold data. Slice
choice, hole, neighbours and CAM work as in :mod:`data.aligned_sagittal_dataset`.
"""

from __future__ import annotations

from data.aligned_sagittal_dataset import AlignedSagittalDataset


class AlignedCoronalDataset(AlignedSagittalDataset):
    """Squeezed single-slice samples in the coronal plane (REFERENCE.md section 3.4)."""

    PLANE = "coronal"
