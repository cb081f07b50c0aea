"""N-way K-shot episodes from a pool of labelled images."""

from __future__ import annotations

import torch
from torch import Tensor


class ImageClasses:
    """Images grouped by class: ``images`` [M, C, H, W] uint8 and ``labels`` [M] in 0..classes-1."""

    def __init__(self, images: Tensor, labels: Tensor, names: list[str] | None = None):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [count, channels, height, width], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [count] = [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.num_classes = int(self.labels.max()) + 1 if labels.numel() else 0
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        self.members = list(torch.split(order, counts.tolist()))
        self.names = names or [str(i) for i in range(self.num_classes)]

    @classmethod
    def from_groups(cls, groups: list[Tensor], names: list[str] | None = None) -> ImageClasses:
        """From one uint8 tensor [n_i, C, H, W] per class."""
        if not groups:
            raise ValueError("no classes")
        labels = torch.cat([torch.full((g.shape[0],), i) for i, g in enumerate(groups)])
        return cls(torch.cat(groups), labels, names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def with_rotations(self, quarter_turns: tuple[int, ...] = (1, 2, 3)) -> ImageClasses:
        """Each class also rotated by 90°·k, as a new class (Santoro et al.; Finn et al. 2017)."""
        groups = [self.images[m] for m in self.members]
        names = list(self.names)
        for k in quarter_turns:
            groups += [torch.rot90(self.images[m], k, dims=(2, 3)) for m in self.members]
            names += [f"{n}@rot{90 * k}" for n in self.names]
        return ImageClasses.from_groups(groups, names)

    def subset(self, classes: list[int]) -> ImageClasses:
        return ImageClasses.from_groups([self.images[self.members[c]] for c in classes],
                                        [self.names[c] for c in classes])


class EpisodeSampler:
    """Samples tasks of ``ways`` classes with ``shots`` support and ``query`` query images each.

    Returns ``x_support`` [tasks, ways·shots, C, H, W] in [0, 1], ``y_support`` [tasks,
    ways·shots] in 0..ways-1, and the query set likewise. Class labels are permuted per task.
    """

    def __init__(self, classes: ImageClasses, ways: int, shots: int, query: int):
        if ways < 2 or shots < 1 or query < 1:
            raise ValueError(f"need ways >= 2, shots >= 1, query >= 1; got {ways}, {shots}, {query}")
        if classes.num_classes < ways:
            raise ValueError(f"{ways}-way episodes need at least {ways} classes; the split has {classes.num_classes}")
        small = [classes.names[c] for c, m in enumerate(classes.members) if len(m) < shots + query]
        if small:
            raise ValueError(f"{len(small)} classes have fewer than shots + query = {shots + query} images "
                             f"(e.g. {small[:3]})")
        self.classes, self.ways, self.shots, self.query = classes, ways, shots, query

    def sample(self, tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if tasks < 1:
            raise ValueError(f"need at least one task, got {tasks}")
        k = self.shots + self.query
        index = torch.empty(tasks, self.ways, k, dtype=torch.long)
        for t in range(tasks):
            chosen = torch.randperm(self.classes.num_classes, generator=generator)[: self.ways]
            for w, c in enumerate(chosen.tolist()):
                members = self.classes.members[c]
                index[t, w] = members[torch.randperm(len(members), generator=generator)[:k]]
        images = self.classes.images[index].float().div_(255)  # [T, ways, k, C, H, W]
        labels = torch.arange(self.ways).view(1, self.ways, 1).expand(tasks, self.ways, k)
        s = self.shots

        def flat(x):
            return x.reshape(tasks, -1, *x.shape[3:])

        return flat(images[:, :, :s]), flat(labels[:, :, :s]), flat(images[:, :, s:]), flat(labels[:, :, s:])
