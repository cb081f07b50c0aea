"""The meta-iteration as one CUDA graph: ``python -m fastlaplace.train --device cuda --cuda-graph``.

On a GPU a few-shot meta-iteration is bound by kernel launches, not by the kernels: the
sinusoid LLAMA step is about 225 launches (forward, backward, the finite check, Adam) and,
uncaptured, at least one host synchronisation (reading the loss). :class:`GraphStep`
records the whole step once (forward, backward, the finite check, a capturable Adam step)
and then replays it with one launch. Outside the graph stay the task sampling on the CPU
(its generator is the checkpoint's), whose batches are copied into static device buffers
through pinned staging buffers, and reading the losses, which is the only host
synchronisation and happens only when the caller asks (to log, save or stop): a device
flag records whether a loss or a gradient was non-finite since the last read.

Requirements: CUDA, one process, the same shapes every iteration (true of every built-in
data set). Written without a GPU at hand: ``tests/test_graphs.py`` checks it against the
uncaptured step when one is present.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cli import UsageError


def any_nonfinite(tensors: list[Tensor], found: Tensor | None = None) -> Tensor:
    """A device flag (float, 1 or 0): whether any of the tensors holds a NaN or an Inf. One
    multi-tensor kernel, no host synchronisation (GradScaler's check; the scale 1 leaves
    the tensors as they are)."""
    found = torch.zeros(1, device=tensors[0].device) if found is None else found
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=found.device))
    return found


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as an uncaptured run writes it (not capturable, Adam's step
    counts on the CPU), so that checkpoints do not depend on ``--cuda-graph``."""
    state = optimizer.state_dict()
    if not any(group.get("capturable") for group in state["param_groups"]):
        return state
    return {"state": {k: {n: v.detach().to("cpu", torch.float32) if n == "step" else v for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": [{**group, "capturable": False} for group in state["param_groups"]]}


def _make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Adam's step counts on the parameters' device, as a capturable optimiser keeps them."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise UsageError(f"--cuda-graph needs an optimiser that can be captured, not {type(optimizer).__name__}")
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device, torch.float32)


class GraphStep:
    """One meta-iteration of ``learner`` and ``optimizer`` (Adam), captured on the first batch.

    ``step(batch)`` replays it on a new batch of the same shapes; ``read()`` returns the
    last iteration's (loss, mean query loss, mean log det or None) and whether everything stayed
    finite since the previous read. Capturing runs two warm-up iterations (they allocate
    Adam's state and the libraries' workspaces) and then puts the parameters, the optimiser
    state and the generator back as they were: the results equal the uncaptured step's.
    """

    def __init__(self, learner, optimizer: torch.optim.Optimizer, generator: torch.Generator | None,
                 batch: tuple[Tensor, ...]):
        self.learner, self.optimizer, self.generator = learner, optimizer, generator
        self.params = [p for p in learner.parameters() if p.requires_grad]
        device = self.params[0].device
        if device.type != "cuda":
            raise UsageError(f"--cuda-graph needs --device cuda (the learner is on {device})")
        if getattr(learner, "check_finite", False):  # its input check reads a flag on the host
            raise UsageError("--cuda-graph needs a learner made with check_finite=False")
        _make_capturable(optimizer)
        self.inputs = [t.to(device) for t in batch]  # the graph's static inputs
        self.staging = [[t.pin_memory() for t in batch] for _ in range(2)]  # alternate: one may still be copying
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.found = torch.zeros(1, device=device)  # > 0: something was non-finite since the last read
        self.summary = torch.zeros(3, device=device)

        saved = self._snapshot()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        self._restore(*saved)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None and generator.device.type == "cuda":
            self.graph.register_generator_state(generator)  # its offsets advance with each replay
        with torch.cuda.graph(self.graph):
            self._body()

    def _body(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes fresh gradients
        parts = self.learner.meta_objective(*self.inputs, generator=self.generator)
        parts.loss.backward()
        loss = parts.loss.detach()
        self.has_logdet = parts.logdet is not None  # a learner's objective has one or not, at every step
        logdet = loss.new_zeros(()) if parts.logdet is None else parts.logdet.detach().mean()
        self.summary.copy_(torch.stack([loss, parts.query_loss.detach().mean(), logdet]))
        any_nonfinite([loss.reshape(1), *(p.grad for p in self.params if p.grad is not None)], self.found)
        self.optimizer.step()

    def _snapshot(self):
        state = {p: {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in self.params if p in self.optimizer.state}
        return ([p.detach().clone() for p in self.params], state,
                None if self.generator is None else self.generator.get_state())

    @torch.no_grad()
    def _restore(self, params, state, generator_state) -> None:
        """In place: the graph keeps the addresses of the parameters and of Adam's state."""
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        for p in self.params:
            for k, v in self.optimizer.state[p].items():
                if torch.is_tensor(v):
                    v.copy_(state[p][k]) if p in state else v.zero_()  # a fresh Adam state is zeros
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self.found.zero_()

    def step(self, batch: tuple[Tensor, ...]) -> None:
        """Copy ``batch`` (CPU tensors) into the static inputs and replay the meta-iteration."""
        for new, static in zip(batch, self.inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(f"--cuda-graph needs the same shapes every iteration: got {tuple(new.shape)} "
                                 f"{new.dtype}, captured {tuple(static.shape)} {static.dtype}")
        staging = self.staging[self.turn]
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()  # the copy out of it two iterations ago has ended
        for pinned, new in zip(staging, batch):
            pinned.copy_(new)
        for static, pinned in zip(self.inputs, staging):
            static.copy_(pinned, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        self.turn ^= 1
        self.graph.replay()

    def read(self) -> tuple[float, float, float | None, bool]:
        """(loss, mean query loss, mean log det: None without one) of the last iteration, and
        whether every loss and gradient since the previous read was finite: one host
        synchronisation."""
        loss, query_loss, logdet, found = torch.cat([self.summary, self.found]).tolist()
        self.found.zero_()
        return loss, query_loss, logdet if self.has_logdet else None, found == 0
