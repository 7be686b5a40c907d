"""`cuda_graphs=true`: the whole training step (forward, loss, backward, GradScaler, fused SGD)
captured once per batch shape as a CUDA graph and replayed, so a step costs a handful of
launches (the inputs' copies, the rate's fill, the replay, the outputs' copies) instead of
hundreds. CUDA only, and not yet run on a GPU by this project: it stays behind its flag until a
GPU run (`python -m benchmarks.gpu`) has measured it against the eager step.

What makes a replay the eager step's:
- Static inputs: each batch is copied into the graph's own input tensors; the learning rate is
  a float32 device tensor per parameter group, filled from the scheduler's float before each
  replay (the scheduler itself keeps working on floats, as in eager mode). torch's fused kernel
  reads a tensor rate as float32, so a replayed step uses the rate rounded to float32 where the
  eager step uses the float64 one: the two differ by that rounding (about 1e-7 of an update)
  unless the rate is a float32 number. A replay's loss and count are copied out, as the driver
  holds several steps' results until its log interval.
- Warm-up without trace: capture needs a few eager steps first (lazy state, cuDNN's choices); they
  run on the first batch of each shape and then every tensor they changed is put back: the
  parameters, BatchNorm's statistics and step count, SGD's momentum (zeros where it did not exist
  yet: momentum x 0 + gradient is the gradient, as SGD's first step, up to the sign of a zero),
  GradScaler's scale and growth count. Capture itself runs nothing, so the first replay is the
  run's first step.
- Capture in `thread_local` mode: the input pipeline's threads (the pin-memory thread, the
  TrivialAugment prefetcher, which moves batches to the GPU) may go on using CUDA meanwhile.
- One graph per batch shape (the epoch's short last batch adds one), each in its own memory
  pool, so one graph's gradients are never another's scratch space (the cost: a second pool
  the size of a step's activations, for the short batch).
- The tensors a graph reads (parameters, momentum, statistics, GradScaler's state) must stay
  the same objects: checkpoints are loaded before the first capture, and `__call__` captures
  again if the momentum buffers or GradScaler's tensors are no longer the captured ones.
What it refuses (core.recipe.validate and TorchBackend): a CPU, DDP, gradient accumulation,
MixUp/CutMix (their weights change per batch), OneCycle (torch's SGD takes momentum as a Python
number, which a graph would freeze), torch.compile on top, and an unfused optimizer.
"""

from __future__ import annotations

import torch

from torch_ref import steps
from torch_ref.augment import Targets

WARMUP_STEPS = 3  # eager steps before a capture (torch's examples use 3 on a side stream)


class Cuda:
    """What GraphedStep asks of CUDA; a test stands an eager imitation in for it on a CPU."""

    def warm_up(self, run) -> None:
        side = torch.cuda.Stream()  # torch's recipe: warm-up on a side stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, record) -> None:
        # records the kernels, runs none; other threads' CUDA calls stay allowed meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            record()

    def replay(self, graph) -> None:
        graph.replay()


class _Graph:
    def __init__(self, graph, x: torch.Tensor, y: torch.Tensor):
        self.graph = graph
        self.x, self.y = x.clone(), y.clone()
        self.loss = self.correct = None


class GraphedStep:
    """step(x, targets) -> (loss, correct), each step a replay of its shape's graph."""

    def __init__(self, model, optimizer, scaler, amp_dtype, smoothing: float, cuda=None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.amp_dtype, self.smoothing = amp_dtype, smoothing
        self.cuda = cuda or Cuda()
        device = next(model.parameters()).device
        # float32: what torch's fused CUDA kernels read a tensor rate as (see the module's
        # docstring for what that rounding does)
        groups = optimizer.param_groups
        self.lr = [torch.zeros((), dtype=torch.float32, device=device) for _ in groups]
        self.graphs: dict[tuple, _Graph] = {}
        self._captured_state: list = []

    def _fill_lr(self) -> None:
        for t, group in zip(self.lr, self.optimizer.param_groups, strict=True):
            rate = group["lr"]
            t.fill_(rate if not torch.is_tensor(rate) else rate.item())

    def _eager(self, x, y):
        return steps.train_step(
            self.model,
            self.optimizer,
            self.scaler,
            self.amp_dtype,
            x,
            Targets(y),
            1.0,
            self.smoothing,
        )

    def _snapshot(self) -> dict:
        if self.scaler.is_enabled() and getattr(self.scaler, "_scale", None) is None:
            # made now rather than in the warm-up, from its initial or loaded values, so that it
            # is saved and put back like the rest (a resumed run's growth count included)
            self.scaler._lazy_init_scale_growth_tracker(next(self.model.parameters()).device)
        opt_state = self.optimizer.state
        momentum = {p: opt_state[p].get("momentum_buffer") for p in opt_state}
        return {
            "model": [t.detach().clone() for t in self.model.state_dict().values()],
            "momentum": {p: None if b is None else b.clone() for p, b in momentum.items()},
            "scaler": [None if t is None else t.clone() for t in self._scaler_tensors()],
        }

    def _scaler_tensors(self) -> list:
        """GradScaler's scale and growth count, or None for each before its first use (and
        always when it is disabled)."""
        return [getattr(self.scaler, name, None) for name in ("_scale", "_growth_tracker")]

    def _restore(self, saved: dict) -> None:
        with torch.no_grad():
            for live, kept in zip(self.model.state_dict().values(), saved["model"], strict=True):
                live.copy_(kept)
            for p, state in self.optimizer.state.items():
                buf = state.get("momentum_buffer")
                if buf is None:
                    continue
                kept = saved["momentum"].get(p)
                buf.copy_(kept) if kept is not None else buf.zero_()
            for t, kept in zip(self._scaler_tensors(), saved["scaler"], strict=True):
                if t is not None:
                    t.copy_(kept)

    def _with_tensor_lr(self, fn):
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for t, group in zip(self.lr, self.optimizer.param_groups, strict=True):
            group["lr"] = t
        try:
            return fn()
        finally:
            for rate, group in zip(floats, self.optimizer.param_groups, strict=True):
                group["lr"] = rate

    def _capture(self, key, x, y) -> _Graph:
        g = _Graph(self.cuda.new_graph(), x, y)
        self._fill_lr()
        saved = self._snapshot()

        def warm_up():
            for _ in range(WARMUP_STEPS):
                self._eager(g.x, g.y)

        self._with_tensor_lr(lambda: self.cuda.warm_up(warm_up))
        self._restore(saved)
        self.optimizer.zero_grad(set_to_none=True)

        def record():
            logits, loss = steps.forward_and_loss(
                self.model, self.amp_dtype, g.x, Targets(g.y), self.smoothing
            )
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            g.loss = loss.detach()
            g.correct = (logits.detach().argmax(1) == g.y).sum()

        self._with_tensor_lr(lambda: self.cuda.capture(g.graph, record))
        self.graphs[key] = g
        self._captured_state = self._read_by_graphs()
        return g

    def _read_by_graphs(self) -> list:
        """The state tensors a torch call could replace with new ones (a load_state_dict)."""
        return [st.get("momentum_buffer") for st in self.optimizer.state.values()] + [
            t for t in self._scaler_tensors() if t is not None
        ]

    def __call__(self, x: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graphs and any(
            a is not b for a, b in zip(self._read_by_graphs(), self._captured_state, strict=False)
        ):
            self.graphs.clear()  # the graphs would read the old tensors: capture again
        key = (tuple(x.shape), x.dtype, x.stride())
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, x, targets.y)
        else:
            g.x.copy_(x)
            g.y.copy_(targets.y)
        self._fill_lr()
        self._with_tensor_lr(lambda: self.cuda.replay(g.graph))
        return g.loss.clone(), g.correct.clone()
