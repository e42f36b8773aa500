"""A buffer of previously generated images (Shrivastava et al.): discriminators see a history of
fakes, not only the latest, which steadies adversarial training (CycleGAN uses 50)."""

from __future__ import annotations

import random

import torch


class ImagePool:
    def __init__(self, pool_size: int):
        self.pool_size = int(pool_size)
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch: each image is the new one, or with probability 1/2 (once the pool is
        full) a stored one that the new image replaces."""
        if self.pool_size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image)
                out.append(image)
            elif random.random() > 0.5:
                i = random.randrange(self.pool_size)
                out.append(self.images[i].clone())
                self.images[i] = image
            else:
                out.append(image)
        return torch.cat(out, 0)
