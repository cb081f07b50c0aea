"""A run's folder: its files, its checkpoints, and the learner and problem rebuilt from them.

``python -m fastlaplace.train`` writes to its output folder ``config.json`` (the resolved
settings), ``metrics.jsonl`` (one JSON line per logged iteration), ``checkpoint.pt`` (the one
before kept as ``checkpoint.prev.pt``), with ``--val-every`` ``best.pt`` (the parameters that
validated best, the best before kept as ``best.prev.pt``), ``results.json``, for a network with adapted
convolutions ``conv_strategy.json`` (the strategy each ran,
:meth:`fastlaplace.MAML.conv_choices`) and, when ``tensorboard`` is installed,
``tensorboard/``. This module reads and writes them for every program: :func:`build`
makes a run's problem and freshly initialised learner from its :class:`Config`,
:func:`load_for_evaluation` the trained learner from a checkpoint, :func:`settings` a run's
settings from the command line, a ``--config`` file and (resuming) the run's own config.json.

A checkpoint is ``torch.save`` of ``{"format": 1, "sha256": hex, "payload": uint8 tensor}``,
the payload being ``torch.save`` of the run's state (tensors and plain values only). Both
layers are loaded with ``weights_only=True``, so a file holding anything else (for instance
a pickled object whose ``__reduce__`` would run code) is refused before anything of it runs;
the digest catches a flipped byte or a truncated file. Writing a new checkpoint first moves
the current one to ``*.prev.pt``, so a crash at any point leaves at least one good file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch

try:
    import fcntl  # the run folder's lock (lock_output)
except ImportError:  # not on Windows
    fcntl = None

from .cli import UsageError, check_device, one_line, refuse_inputs
from .config import USER_ONLY, Config, config_from_dict, read_settings
from .datasets import DATASETS
from .files import atomic_write
from .meta import MAML
from .methods import METHODS
from .options import Loss
from .problems import Problem

FORMAT = 1
CHECKPOINT, SETTINGS, METRICS, RESULTS = "checkpoint.pt", "config.json", "metrics.jsonl", "results.json"
CONV_STRATEGY = "conv_strategy.json"
BEST, BEST_PREV = "best.pt", "best.prev.pt"  # --val-every: the parameters that validated best, the best before
TENSORBOARD = "tensorboard"  # the folder of TensorBoard's event files
# Another run's files: a new run replaces them only with --overwrite.
STALE = (RESULTS, METRICS, SETTINGS, CONV_STRATEGY, BEST, BEST_PREV)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, truncated, refused or of another run."""


def previous(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def run_files(folder: str | os.PathLike) -> list[Path]:
    """The files (and TensorBoard's folder) that a run writes in ``folder``: inputs of the
    programs that read a run, never one of their outputs."""
    folder = Path(folder)
    checkpoint = folder / CHECKPOINT
    return [checkpoint, previous(checkpoint), checkpoint.with_name(CHECKPOINT + ".corrupt"),
            *(folder / name for name in (SETTINGS, METRICS, RESULTS, CONV_STRATEGY, BEST, BEST_PREV,
                                         BEST + ".corrupt", BEST_PREV + ".corrupt", TENSORBOARD))]


def checkpoint_inputs(*checkpoints: str | None) -> list[Path]:
    """Each checkpoint given and the run files beside it."""
    return [p for c in checkpoints if c for p in (Path(c), *run_files(Path(c).parent))]


def save_checkpoint(path: Path, state: dict, keep_previous: bool = True) -> None:
    """Write ``state`` (tensors and plain values) to ``path``, keeping the previous file
    (unless not ``keep_previous``: then the one before stays)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    wrapper = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
               "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    atomic_write(Path(path), lambda f: torch.save(wrapper, f),
                 keep_previous=previous(Path(path)) if keep_previous else None)


def _load_plain(source, what: str) -> object:
    if not zipfile.is_zipfile(source):  # every file torch.save writes is a zip archive
        raise CheckpointError(f"{what} is corrupted or not a checkpoint (not a torch.save archive)")
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{what} holds objects other than tensors and plain values; it is refused because "
                              "loading them could run code (checkpoints of fastlaplace.train never do)") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} is corrupted or not a checkpoint ({reason})") from exc


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved in ``path``, after verifying its checksum; :class:`CheckpointError`
    (naming the previous checkpoint when there is one) if it cannot be trusted to be intact."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        wrapper = _load_plain(path, str(path))
        if isinstance(wrapper, dict) and "format" in wrapper:
            if wrapper.get("format") != FORMAT or not isinstance(wrapper.get("payload"), torch.Tensor) \
                    or wrapper["payload"].dtype != torch.uint8 or not isinstance(wrapper.get("sha256"), str):
                raise CheckpointError(f"{path} is not a fastlaplace checkpoint of format {FORMAT}")
            data = wrapper["payload"].numpy().tobytes()
            if hashlib.sha256(data).hexdigest() != wrapper["sha256"]:
                raise CheckpointError(f"{path} is corrupted (checksum mismatch)")
            state = _load_plain(io.BytesIO(data), str(path))
        else:  # written before checkpoints carried a checksum: still loaded without running code
            state = wrapper
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
                or not isinstance(state.get("learner"), dict) or not isinstance(state.get("iteration"), int):
            raise CheckpointError(f"{path} is not a checkpoint written by fastlaplace.train")
    except CheckpointError as exc:
        prev = previous(path)
        if prev.is_file():
            raise CheckpointError(f"{exc}; the previous checkpoint is {prev}") from exc
        raise
    _check_finite(state, path)
    return state


def _check_finite(state: dict, path: Path) -> None:
    """Refuse NaN or infinite parameters or optimiser state: fastlaplace.train never saves
    them, so an intact file holding them was edited or written by something else. Not a
    :class:`CheckpointError`, which ``--resume`` passes over for the previous checkpoint."""
    parts = {"parameters": state["learner"], "optimiser state": state.get("optimizer")}
    for part, tree in parts.items():
        for name, tensor in named_tensors(tree):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{path} holds non-finite values (NaN or infinity) in its {part} ({name}); "
                                 "fastlaplace.train never saves such a checkpoint: use the previous one or train again")


def named_tensors(tree, prefix: str = ""):
    """(dotted name, tensor) of every tensor in nested dicts, lists and tuples (a state dict)."""
    if isinstance(tree, torch.Tensor):
        yield prefix or "tensor", tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from named_tensors(v, f"{prefix}[{i}]")


def read_latest(path: Path, log=None) -> tuple[dict, Path] | None:
    """The newest intact checkpoint of a run: ``path``, or its previous one when ``path`` is
    damaged or missing (said through ``log``); ``None`` when the run has none."""
    prev = previous(path)
    if not path.exists() and not prev.exists():
        return None
    try:
        return read_checkpoint(path), path
    except (CheckpointError, FileNotFoundError) as exc:
        if not prev.is_file():
            raise
        state = read_checkpoint(prev)
        if log is not None:
            log(f"warning: {str(exc).split('; the previous')[0]}; continuing from {prev} "
                f"(iteration {state['iteration']})")
        return state, prev


def restore_best(out: Path, iteration: int, validation: dict | None = None, log=None) -> tuple[int, float, int] | None:
    """On ``--resume`` from the checkpoint of ``iteration``: (iteration, validation figure, its
    diverged tasks) of the run's best.pt, or ``None``. Best files written after that checkpoint
    belong to iterations the run does again: they are removed (best.prev.pt, which the
    training keeps as the best as of the last checkpoint, then becomes best.pt); a damaged one
    is kept aside as ``*.corrupt``. Said through ``log``. With ``validation`` (the run's
    validation tasks, seed and steps), a best.pt validated otherwise is refused: its figure
    would not compare."""
    say = log or (lambda message: None)
    best = Path(out) / BEST
    states, damaged = {}, {}
    for path in (best, previous(best)):
        if path.exists():
            try:
                states[path] = read_checkpoint(path)
            except CheckpointError as exc:
                damaged[path] = exc
    past = [path for path, state in states.items() if state["iteration"] > iteration]
    kept = [path for path in states if path not in past]  # best.pt first
    figure = states[kept[0]].get("validation") if kept else None
    if kept:  # checked before anything in the folder changes
        if not isinstance(figure, dict) or not isinstance(figure.get("mean"), float) \
                or not isinstance(figure.get("diverged"), int):
            raise CheckpointError(f"{kept[0]} holds no validation figure: it is not a best.pt of fastlaplace.train")
        differ = {k: v for k, v in (validation or {}).items() if figure.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {figure.get(k)} (now {v})" for k, v in differ.items())
            raise UsageError(f"{kept[0]} was validated with {what}: its figure would not compare with this run's; "
                             "resume with its settings (--val-tasks), or move it away to start the comparison afresh")
    for path, exc in damaged.items():
        os.replace(path, path.with_name(path.name + ".corrupt"))
        say(f"warning: {str(exc).split('; the previous')[0]}; kept aside as {path.name}.corrupt")
    for path in past:
        path.unlink()
        say(f"{path} (iteration {states[path]['iteration']}) is past iteration {iteration}, where the run "
            "continues: removed, the run validates those iterations again")
    if not kept:
        return None
    if kept[0] != best:
        os.replace(kept[0], best)
    return states[kept[0]]["iteration"], figure["mean"], figure["diverged"]


class FolderLock:
    """An exclusive ``flock`` on a folder, held until :meth:`close` (or the process ends)."""

    def __init__(self, folder: Path):
        self.fd: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise UsageError(f"another process is training into {folder}: wait for it to end (or stop it), or "
                             "choose another --out") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_output(out: Path) -> FolderLock | None:
    """An exclusive lock on the run folder ``out`` (made if missing) for this process, so that
    a second process training into the same folder (the same command started twice, or
    ``--resume`` while the run still runs) is refused instead of interleaving its checkpoints
    with the first's. The folder itself is locked: no file is written. ``None`` where the
    system has no ``flock`` (not Linux or macOS)."""
    if fcntl is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    return FolderLock(out)


def open_output(out: Path, resume: bool, overwrite: bool = False, accept=None) -> tuple[dict, Path] | None:
    """Make the output folder and return the checkpoint to continue from, ``(state, path)``,
    or ``None`` (a new run, or ``resume`` with no checkpoint yet). A new run refuses a folder
    that holds a checkpoint, and one that holds another run's results, metrics, settings or
    TensorBoard events unless ``overwrite`` (they are then removed). ``accept(state, path)`` may refuse the
    checkpoint before anything in the folder changes; a damaged ``checkpoint.pt`` passed over
    for the previous one is then kept aside as ``checkpoint.pt.corrupt``, out of the rotation."""
    path = out / CHECKPOINT
    if resume and overwrite:
        raise UsageError("--overwrite starts a new run: it cannot be combined with --resume")
    if not resume:
        if path.exists() or previous(path).exists():
            raise FileExistsError(f"{path} exists: pass --resume to continue that run, or choose another --out")
        stale = [name for name in STALE if (out / name).exists()]
        events = sorted((out / TENSORBOARD).glob("events.out.tfevents.*"))
        if events:
            stale.append(f"TensorBoard events ({TENSORBOARD}/)")
        if stale and not overwrite:
            raise FileExistsError(f"{out} holds another run's {', '.join(stale)} (and no checkpoint): pass "
                                  "--overwrite to replace them, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        for file in [out / name for name in STALE if (out / name).exists()] + events:
            file.unlink()
        return None
    out.mkdir(parents=True, exist_ok=True)
    latest = read_latest(path, log=lambda m: print(m, file=sys.stderr))
    if latest is not None and accept is not None:
        accept(*latest)
    if latest is not None and latest[1] != path and path.exists():
        os.replace(path, path.with_name(path.name + ".corrupt"))
    return latest


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON, written atomically."""
    atomic_write(Path(path), lambda f: f.write(json.dumps(value, indent=2).encode()))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash (or otherwise unreadable) is skipped."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
    return rows


def is_validation(row: dict) -> bool:
    """A line of ``--val-every``'s validations (``val_accuracy`` or ``val_mse``, ...)."""
    return any(key.startswith("val_") for key in row)


def truncate_metrics(path: Path, iteration: int, validated_again: bool = False) -> None:
    """Drop lines logged after ``iteration`` (the checkpoint a run continues from; 0 when there
    is none yet), which the run will log again, and any partial line; with
    ``validated_again``, also the validation line of ``iteration`` itself."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row["iteration"] < iteration
            or (row["iteration"] == iteration and not (validated_again and is_validation(row)))]
    atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in keep).encode()))


# ---------------------------------------------------------------------------- settings and rebuilding
def settings(given: dict, config_file: str | None = None, resume: bool = False) -> Config:
    """A run's settings: those ``given`` on the command line, over those of ``config_file``
    (``--config``), over, when resuming, those the run saved in its config.json (except the
    ones only the user gives: USER_ONLY), over the data set's defaults (filled in by
    :meth:`Config.resolved`)."""
    values = read_settings(Path(config_file)) if config_file else {}
    values.update(given)
    if not (config_file or resume):
        return Config(**values)
    out = Path(values.get("out") or Config(**values).resolved().out)
    if config_file:  # the run writes config.json: --config is never one of its files
        for written in run_files(out):
            refuse_inputs(f"this run's {written.name}", written, [config_file])
    if resume and (out / SETTINGS).exists():  # the run's own settings, under those given now
        saved = read_settings(out / SETTINGS)
        values = {**{k: v for k, v in saved.items() if k not in USER_ONLY}, **values, "out": str(out)}
    return Config(**values)


def make_problem(cfg: Config) -> Problem:
    """The task distribution, network and metric of a (resolved) configuration."""
    spec = DATASETS[cfg.dataset]
    problem = spec.problem(cfg)
    if not isinstance(problem, spec.family):  # its loss would not be the one the spec declares
        raise TypeError(f"the data set {cfg.dataset!r} built a {type(problem).__name__}, but its DatasetSpec's "
                        f"family is {spec.family.__name__}")
    return problem


def make_learner(cfg: Config, model: torch.nn.Module, loss: Loss) -> MAML:
    """The configured method's learner around ``model``, with the problem's ``loss``."""
    return METHODS[cfg.method](model, loss, cfg)


def build(cfg: Config, device: str | None = None):
    """The problem and a freshly initialised learner (seeded, without touching global RNG),
    on ``device`` (default: the configured one)."""
    problem = make_problem(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = problem.build_model()
    return problem, make_learner(cfg, model, problem.loss).to(device or cfg.device)


def load_for_evaluation(checkpoint: str, device: str | None = None, data_root: str | None = None,
                        allow_pickle: bool = False, datasets: tuple[str, ...] | None = None, purpose: str = ""):
    """(learner, problem, config) from a checkpoint written by ``fastlaplace.train``; with
    ``datasets``, a checkpoint of another data set is refused (before its data is read),
    saying what ``purpose`` needs.

    The data folder of an image data set is ``data_root``, never the one the checkpoint
    names: a checkpoint may come from elsewhere, and reading data can mean reading what an
    attacker put there."""
    state = read_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], f"the configuration in {checkpoint}")
    for registry in (DATASETS, METHODS):
        name = getattr(cfg, registry.option)
        if name not in registry:
            raise UsageError(f"{checkpoint} is a run of the {registry.option} {name!r}, which is not registered here "
                             f"(known: {', '.join(registry)}): import the module that registers it first")
    if datasets is not None and cfg.dataset not in datasets:
        raise UsageError(f"{checkpoint} is a {cfg.dataset} run: {purpose}")
    if device:
        cfg.device = device
    else:
        try:
            check_device(cfg.device)
        except UsageError as exc:
            raise UsageError(f"{checkpoint} was trained on {cfg.device!r} ({exc}): pass --device cpu") from exc
    if DATASETS[cfg.dataset].data_root and not data_root:
        raise UsageError(f"{checkpoint} is a {cfg.dataset} run: pass --data-root with the folder of its data "
                         f"(the folder the checkpoint names, {cfg.data_root!r}, is only used when you pass it)")
    cfg.data_root, cfg.allow_pickle = data_root, allow_pickle
    cfg.validate()
    problem, learner = build(cfg)
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint} does not fit its own configuration ({one_line(exc)})") from exc
    return learner.to(cfg.device), problem, cfg
