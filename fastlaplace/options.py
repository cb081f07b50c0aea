"""Every named option of the library, once: enums whose values are the strings users pass,
and the :class:`Registry` of the open sets of names (data sets, methods, networks).

Each closed option is a ``str`` enum, so ``LogdetMethod.EXACT == "exact"`` and either
spelling is accepted wherever an option is taken. :func:`parse` is the one check: it turns
a string or a member into the member, or raises a ``ValueError`` that names the option and
lists its choices. :func:`choices` gives the strings for argparse and configuration checks.

The sets that grow (``--dataset``, ``--method``, ``--model``) are registries instead: a
name and its entry are registered beside the entry's code (``fastlaplace.datasets``,
``fastlaplace.methods``, ``fastlaplace.models``), and every program asks the registry, so a
new entry needs no other change. A registry is its own list of choices (argparse's
``choices=`` and ``in`` see the entries registered so far).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Generic, Literal, TypeVar


class Option(str, Enum):
    """A named choice; ``str(member)`` and f-strings give its value (as ``enum.StrEnum``, 3.11+)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class LogdetMethod(Option):
    """How log det(c·A⊗G + τI) is taken, and which posterior precision goes with it
    (``docs/design.md`` §2-3)."""

    FACTORED = "factored"  # (√c·A + π√τ·I) ⊗ (√c·G + (√τ/π)·I), Martens & Grosse's damping (default)
    EXACT = "exact"  # Σᵢⱼ log(c·aᵢ·gⱼ + τ) over the factors' eigenvalues


class FisherType(Option):
    """Which likelihood gradient makes K-FAC's g rows (:mod:`fastlaplace.curvature`)."""

    AUTO = "auto"  # Gauss-Newton for one-output regression, sampled otherwise
    GAUSS_NEWTON = "gauss_newton"
    SAMPLED = "sampled"
    EMPIRICAL = "empirical"


class Likelihood(Option):
    """The likelihood whose negative log is the curvature's loss."""

    GAUSSIAN = "gaussian"  # unit noise: ½Σ(f − y)²
    CATEGORICAL = "categorical"


class Loss(Option):
    """The inner and query loss of a meta-learner: the mean negative log likelihood."""

    MSE = "mse"
    CROSS_ENTROPY = "cross_entropy"

    @property
    def likelihood(self) -> Likelihood:
        return Likelihood.GAUSSIAN if self is Loss.MSE else Likelihood.CATEGORICAL


class ImplicitPrior(Option):
    """The inner loop's implicit prior as the posterior's prior (:class:`fastlaplace.prior.Prior`)."""

    EARLY_STOPPING = "early_stopping"  # exact per eigen-direction (exact method only)
    EARLY_STOPPING_FIRST_ORDER = "early_stopping_first_order"  # τ = 1/(s·α·K)


class ConvStrategy(Option):
    """How a task-batched convolution runs (:class:`fastlaplace.batched.ConvPlanner`)."""

    GROUPED = "grouped"  # one grouped convolution, groups = tasks
    LOOP = "loop"  # one plain convolution per task, the outputs stacked
    AUTO = "auto"  # the faster of the two, measured once per layer shape (not bit-reproducible)


# For type hints: what a caller may pass (the member or its string).
LogdetMethodLike = LogdetMethod | Literal["factored", "exact"]
FisherTypeLike = FisherType | Literal["auto", "gauss_newton", "sampled", "empirical"]
LossLike = Loss | Literal["mse", "cross_entropy"]
ImplicitPriorLike = ImplicitPrior | Literal["early_stopping", "early_stopping_first_order"]
ConvStrategyLike = ConvStrategy | Literal["grouped", "loop", "auto"]

E = TypeVar("E", bound=Option)
T = TypeVar("T")


def choices(kind: type[Option]) -> tuple[str, ...]:
    """The accepted strings of an option, in declaration order."""
    return tuple(member.value for member in kind)


def parse(kind: type[E], value: object, name: str) -> E:
    """``value`` (a member of ``kind`` or its string) as the member; otherwise a ``ValueError``
    naming the option ``name`` and listing its choices."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value)  # a lookup by value, which Dynamo traces (torch 2.11's cannot iterate an Enum)
        except ValueError:
            pass
    raise ValueError(f"{name} must be one of {choices(kind)}, got {value!r}")


class Registry(Generic[T]):
    """Entries by name, in the order registered: ``registry[name]`` (a ``ValueError`` that
    names the option and lists the names) and :meth:`register`. Iterating gives the names."""

    def __init__(self, option: str):
        self.option = option  # how users name the choice, e.g. "dataset"
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (a new name: a second entry of one name is refused)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.option} is registered under a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.option} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: object) -> T:
        if name not in self:
            raise ValueError(f"{self.option} must be one of {tuple(self)}, got {name!r}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __repr__(self) -> str:
        return repr(tuple(self))
