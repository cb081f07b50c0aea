"""The data sets of ``python -m fastlaplace.train --dataset NAME``: one :class:`DatasetSpec`
each, in :data:`DATASETS`.

A spec is everything the programs ask of a data set: its default settings, how its problem
(tasks, network, loss, metric) is built from a run's settings, its task family (whose loss
the learner takes), the networks it accepts (the default first), what one task holds in
memory, whether it is read from ``--data-root``, and the figures of ``python -m
fastlaplace.plot`` that apply to its runs. The configuration, the run support and the
programs ask the spec; none of them tests a data set's name. A new data set is one
``DATASETS.register(name, DatasetSpec(...))`` beside its reader (``docs/architecture.md``,
"Where things go"); a spec's callables take the run's resolved settings, a
:class:`fastlaplace.config.Config`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from .data.episodes import ImageClasses
from .data.loaders import digits_splits, episode_samplers, miniimagenet_splits, omniglot_splits
from .data.sinusoid import SinusoidTasks
from .options import Loss, Registry
from .problems import ImageProblem, Problem, SinusoidProblem


class Footprint(NamedTuple):
    """What one task of a configuration holds, for :meth:`fastlaplace.config.Config.batch_memory`."""

    what: str  # the settings that size it, as flags
    support: int  # examples of a support set
    query: int  # examples of a query set
    per_example: int  # floats per example of a forward pass: its input and two of the first layer's activations
    params: int  # the network's parameters


@dataclass(frozen=True)
class DatasetSpec:
    """One data set of ``--dataset``."""

    help: str
    family: type[Problem]  # the problem class: the learner's loss, the metric
    problem: Callable[[Any], Problem]  # the problem of a run's resolved settings
    defaults: Mapping[str, object]  # settings filled in when not given (the model aside)
    models: tuple[str, ...]  # the networks it accepts (names in fastlaplace.models.MODELS), the default first
    footprint: Callable[[Any], Footprint]  # what one task of a run's resolved settings holds
    data_root: bool = False  # read from --data-root
    figures: tuple[str, ...] = ()  # the figures of python -m fastlaplace.plot that its runs can draw

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def loss(self) -> Loss:
        return self.family.loss

    def settings(self) -> dict[str, object]:
        """Every default setting, the default network included."""
        return {**self.defaults, "model": self.models[0]}


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# ---------------------------------------------------------------------------- sinusoid regression
def _sinusoid(cfg) -> SinusoidProblem:
    tasks = SinusoidTasks(x_range=tuple(cfg.x_range), support=cfg.support, query=cfg.query_points)
    return SinusoidProblem(tasks, model=cfg.model)


def mlp_footprint(cfg) -> Footprint:
    """A regression task of ``--support`` and ``--query-points`` points through the 1-40-40-1
    network (81 units, 1761 parameters)."""
    return Footprint(f"--support {cfg.support} + --query-points {cfg.query_points} points", cfg.support,
                     cfg.query_points, 2 + 2 * 81, 1761)


DATASETS.register("sinusoid", DatasetSpec(
    "sine waves of random amplitude and phase (Finn et al. 2017)", SinusoidProblem, _sinusoid,
    dict(iterations=10000, meta_batch=25, meta_lr=1e-3, inner_lr=0.01, inner_steps=1, test_inner_steps=[1, 10],
         eta=1e-6, tau=1e-3),
    ("mlp",), mlp_footprint, figures=("posterior",)))


# ---------------------------------------------------------------------------- few-shot image classification
def image_problem(dataset: str, read: Callable[..., dict[str, ImageClasses]], cfg) -> ImageProblem:
    """The episodes of ``read(root, seed, allow_pickle)``'s splits, as ``cfg`` sizes them."""
    splits = read(cfg.data_root, cfg.seed, cfg.allow_pickle)
    samplers = episode_samplers(dataset, splits, cfg.ways, cfg.shots, cfg.query)
    channels, size, _ = splits["train"].image_shape
    return ImageProblem(samplers, channels, size, cfg.ways, cfg.filters, model=cfg.model)


def conv4_footprint(image_shape: tuple[int, int, int], cfg) -> Footprint:
    """An episode of ``--ways`` × (``--shots`` + ``--query``) images through Conv4: the first
    convolution's output at full resolution; 9·C·F + 3·9·F² weights."""
    channels, height, width = image_shape
    return Footprint(f"--ways {cfg.ways} × (--shots {cfg.shots} + --query {cfg.query}) images, "
                     f"--filters {cfg.filters}", cfg.ways * cfg.shots, cfg.ways * cfg.query,
                     channels * height * width + 2 * cfg.filters * height * width,
                     9 * cfg.filters * (channels + 3 * cfg.filters))


def _images(name: str, help: str, read, image_shape: tuple[int, int, int], defaults: dict,
            data_root: bool = True) -> None:
    DATASETS.register(name, DatasetSpec(help, ImageProblem, functools.partial(image_problem, name, read),
                                        defaults, ("conv4", "resnet12"),
                                        functools.partial(conv4_footprint, image_shape), data_root,
                                        figures=("reliability",)))


# Defaults: the paper's (miniImageNet), Finn et al.'s (Omniglot), ours (digits).
_images("digits", "scikit-learn's handwritten digits, 16×16, no download", digits_splits, (1, 16, 16),
        dict(iterations=1000, meta_batch=4, meta_lr=1e-3, inner_lr=0.1, inner_steps=3, test_inner_steps=[5],
             ways=5, shots=1, query=5, eta=1e-6, tau=1e-3, filters=32), data_root=False)
_images("omniglot", "Omniglot's characters, 28×28 (--data-root)", omniglot_splits, (1, 28, 28),
        dict(iterations=60000, meta_batch=32, meta_lr=1e-3, inner_lr=0.4, inner_steps=1, test_inner_steps=[3],
             ways=5, shots=1, query=1, eta=1e-6, tau=1e-3, filters=64))
_images("miniimagenet", "miniImageNet, 84×84 RGB (--data-root)", miniimagenet_splits, (3, 84, 84),
        dict(iterations=60000, meta_batch=4, meta_lr=1e-3, inner_lr=0.01, inner_steps=5, test_inner_steps=[10],
             ways=5, shots=1, query=15, eta=1e-6, tau=1e-3, filters=64))
