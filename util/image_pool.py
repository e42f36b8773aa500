"""A buffer of previously generated images (Shrivastava et al.): discriminators see a history of
fakes, not only the latest, which steadies adversarial training (CycleGAN uses 50).

The buffer is training state: :meth:`ImagePool.state_dict` and :meth:`ImagePool.load_state_dict`
let a resumed run start with the images the interrupted one held."""

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

    def state_dict(self) -> dict:
        """The stored images (on the CPU) and the pool size."""
        return {"pool_size": self.pool_size, "images": [image.detach().cpu() for image in self.images]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        """Restore what :meth:`state_dict` returned (images moved to ``device``); a smaller pool
        keeps the first ``pool_size`` of them."""
        self.images = [image.to(device) for image in list(state["images"])[: self.pool_size]]
