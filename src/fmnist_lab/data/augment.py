"""Augmentation of training batches where they already are: a whole batch at once, on the training device.

The device backend keeps the splits on the training device as tensors, so per-image PIL transforms would undo
its speed; `Augment` does the same three transforms torchvision offers (RandomCrop with padding,
RandomHorizontalFlip, RandomErasing) on a float batch [B, 1, 28, 28] with a few tensor operations. Its random
numbers come from torch's default generator of the batch's device: seeded by `seed`, saved in every checkpoint,
so a resumed run draws what the uninterrupted one would have drawn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# torchvision's RandomErasing defaults: the rectangle covers 2-33% of the image, aspect ratio 0.3-3.3
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)


class Augment:
    """`crop_padding`: pad by this many (black) pixels, then crop a random 28x28 window (0: off).
    `flip`: probability of a horizontal flip. `erase`: probability of setting a random rectangle to 0."""

    def __init__(self, crop_padding: int = 0, flip: float = 0.0, erase: float = 0.0) -> None:
        for key, value, ok, allowed in (
            ("crop_padding", crop_padding, isinstance(crop_padding, int) and not isinstance(crop_padding, bool)
             and 0 <= crop_padding <= 14, "an integer from 0 (off) to 14 pixels, e.g. 2"),
            ("flip", flip, isinstance(flip, int | float) and 0 <= flip <= 1, "a probability from 0 to 1, e.g. 0.5"),
            ("erase", erase, isinstance(erase, int | float) and 0 <= erase <= 1, "a probability from 0 to 1"),
        ):
            if not ok:
                raise ValueError(f"data.augment.{key}={value!r} is not valid: use {allowed}.")
        self.crop_padding, self.flip, self.erase = crop_padding, float(flip), float(erase)

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip or self.erase)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip}, erase={self.erase})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        device = x.device
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            top = torch.randint(0, 2 * p + 1, (n, 1, 1), device=device)
            left = torch.randint(0, 2 * p + 1, (n, 1, 1), device=device)
            rows = top + torch.arange(h, device=device).view(1, h, 1)
            cols = left + torch.arange(w, device=device).view(1, 1, w)
            x = padded[torch.arange(n, device=device).view(n, 1, 1), 0, rows, cols].unsqueeze(1)
        if self.flip:
            flipped = torch.rand(n, 1, 1, 1, device=device) < self.flip
            x = torch.where(flipped, x.flip(-1), x)
        if self.erase:
            area = h * w * torch.empty(n, device=device).uniform_(*ERASE_SCALE)
            ratio = torch.exp(torch.empty(n, device=device).uniform_(*map(math.log, ERASE_RATIO)))
            eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
            ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
            top = (torch.rand(n, device=device) * (h - eh + 1)).long()
            left = (torch.rand(n, device=device) * (w - ew + 1)).long()
            r = torch.arange(h, device=device).view(1, h, 1)
            c = torch.arange(w, device=device).view(1, 1, w)
            box = ((r >= top.view(n, 1, 1)) & (r < (top + eh).view(n, 1, 1))
                   & (c >= left.view(n, 1, 1)) & (c < (left + ew).view(n, 1, 1)))
            chosen = (torch.rand(n, device=device) < self.erase).view(n, 1, 1)
            x = x.masked_fill((box & chosen).unsqueeze(1), 0.0)
        return x

    def torchvision(self) -> list:
        """The same augmentation as torchvision transforms, for the dataloader backend: PIL image in, tensor out."""
        from torchvision import transforms

        steps = [transforms.RandomCrop(28, padding=self.crop_padding)] if self.crop_padding else []
        steps += [transforms.RandomHorizontalFlip(self.flip)] if self.flip else []
        steps.append(transforms.ToTensor())
        steps += [transforms.RandomErasing(self.erase, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0)] \
            if self.erase else []
        return steps
