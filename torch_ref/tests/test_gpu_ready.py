"""What makes a torch_ref step ready for a GPU, proved on a CPU: no host read of a device value
inside a training epoch except the driver's one per log interval; torch.compile with static
shapes (one graph per batch shape, none after the first epoch); the EMA without its sync;
cuda_graphs refused off CUDA. Where CUDA exists, torch's own sync debug mode checks the same."""

import contextlib
import json

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import testkit
from core import driver
from torch_ref import train
from torch_ref.ema import EMA

# 96 images at 20 per step: four full batches and a short one of 16 per epoch
QUICK = ["batch_size=20", "epochs=2", "train_subset=0", "eval_subset=0", "log_every_steps=2"]
ONE_EPOCH = ["epochs=1", "train_subset=60"]  # three steps: enough to see a per-step read
# the Python-level ways a tensor's value reaches the host; on CUDA each waits for the queued
# work. Not seen by this counting: .to("cpu"), a blocking copy to the device, boolean-mask
# indexing; on CUDA, torch's sync debug mode (the last test) sees those too.
READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
)
SYNCS = (
    (torch.cuda, "synchronize"),
    (torch.cuda.Stream, "synchronize"),
    (torch.cuda.Event, "synchronize"),
    (torch, "equal"),
    (torch, "allclose"),
)


class Phases:
    """Counts host reads of tensors, by where the run is: inside an epoch's steps ("epoch"),
    inside the driver's fetch at a log interval ("fetch"), or elsewhere (evaluation, saving)."""

    def __init__(self, monkeypatch):
        self.now, self.reads, self.fetches = "outside", {}, 0
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        for owner, name in SYNCS:
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._counting(name, original))

    def _counting(self, name, original):
        def read(*args, **kwargs):
            key = (self.now, name)
            self.reads[key] = self.reads.get(key, 0) + 1
            return original(*args, **kwargs)

        return read

    def count(self, phase: str) -> int:
        return sum(n for (where, _), n in self.reads.items() if where == phase)

    @contextlib.contextmanager
    def at(self, phase: str):
        before, self.now = self.now, phase
        try:
            yield
        finally:
            self.now = before

    def wrap(self, backend):
        batches, fetch = backend.batches, backend.fetch

        def epoch(epoch, start_step):
            with self.at("epoch"):
                yield from batches(epoch, start_step)

        def fetching(handles):
            self.fetches += 1
            with self.at("fetch"):
                return fetch(handles)

        backend.batches, backend.fetch = epoch, fetching
        return backend


def run(recipe, workdir, wrap=lambda backend: backend):
    make = train.backend_factory(recipe, "cpu")

    def factory(ckpt_dir, training):
        backend = make(ckpt_dir, training)
        return wrap(backend) if training else backend

    return driver.train_and_evaluate(factory, recipe, workdir, train.STACK)


@pytest.mark.parametrize(
    "extra",
    [
        ["ema_decay=0.9", "ema_every_steps=2"],  # float32, torch's loop SGD, the EMA
        ["fused_optimizer=on", "amp=fp16"],  # the CUDA default's path: fused SGD + GradScaler
    ],
    ids=["float32-ema", "fused-fp16"],
)
def test_no_host_read_in_an_epoch_but_at_the_log_interval(
    fashion_dir, tmp_path, monkeypatch, extra
):
    recipe = testkit.smoke_recipe("fashion_mnist", fashion_dir, *QUICK, *ONE_EPOCH, *extra)
    phases = Phases(monkeypatch)
    run(recipe, tmp_path / "run", phases.wrap)
    assert phases.count("epoch") == 0, phases.reads
    # the driver reads once per log interval (2 steps: 2 windows in the 3-step epoch), and
    # once after the first step for its "first batch loss" line ...
    assert phases.fetches == 1 + 2
    # ... and the counting sees those reads: it would see one inside a step too
    assert phases.count("fetch") >= phases.fetches


def test_the_counting_sees_gradscalers_sync_without_the_fused_optimizer(
    fashion_dir, tmp_path, monkeypatch
):
    """Unfused, GradScaler reads the overflow flag with .item() every step: the count above is
    zero because the fused path has no such read, not because the counting misses it."""
    recipe = testkit.smoke_recipe("fashion_mnist", fashion_dir, *QUICK, *ONE_EPOCH, "amp=fp16")
    phases = Phases(monkeypatch)
    run(recipe, tmp_path / "run", phases.wrap)
    assert phases.reads.get(("epoch", "item"), 0) >= 3  # one per step at least


def test_the_ema_is_torchs_averagedmodel_without_the_sync(monkeypatch):
    """The same bits as torch's AveragedModel (EMA lerp, buffers too) over updates, a restart and
    a reload, and no use of n_averaged's value (torch's compares it twice per update and copies
    it to the device once per dtype group)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    ours = EMA(model, 0.8)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    reads = []
    for step in range(6):
        model(torch.randn(2, 1, 5, 5)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        with monkeypatch.context() as m:
            # n_averaged lives on the host: torch's update compares it (two bool reads) and
            # copies it to each parameter group's device (a blocking copy on a GPU)
            to, as_bool = torch.Tensor.to, torch.Tensor.__bool__
            m.setattr(torch.Tensor, "__bool__", lambda t: reads.append("bool") or as_bool(t))
            m.setattr(
                torch.Tensor,
                "to",
                lambda t, *a, **k: (
                    (reads.append("to") if t is ours.n_averaged else None) or to(t, *a, **k)
                ),
            )
            ours.update_parameters(model)
        theirs.update_parameters(model)
        if step == 2:  # torchvision's warm-up restart
            ours.restart()
            theirs.n_averaged.fill_(0)
        if step == 4:
            again = EMA(model, 0.8)
            again.load_state_dict(ours.state_dict())
            ours = again
    assert reads == []
    want, got = theirs.state_dict(), ours.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_compile_makes_one_graph_per_batch_shape_and_none_after_the_first_epoch(
    fashion_dir, tmp_path
):
    """compile=true, two epochs with a short last batch: two graphs (20 and 16 rows), both with
    static shapes, made in epoch 1; epoch 2 reuses them. A recording backend stands in for
    inductor (the graphs and guards are dynamo's whatever compiles them; inductor's code
    generation would add minutes and nothing to what is counted)."""
    from torch._dynamo.backends.registry import register_backend

    graphs = []

    def recording(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        assert not any(isinstance(s, torch.SymInt) for t in example_inputs for s in _sizes(t))
        return gm.forward

    from torch._dynamo.backends.registry import _COMPILER_FNS

    _COMPILER_FNS.pop("recording_for_tests", None)  # a second run of this test in one process
    register_backend(recording, name="recording_for_tests")
    torch._dynamo.reset()
    per_epoch = []

    def wrap(backend):
        end = backend.end_epoch

        def end_epoch():
            per_epoch.append(len(graphs))
            end()

        backend.end_epoch = end_epoch
        return backend

    recipe = testkit.smoke_recipe(
        "fashion_mnist",
        fashion_dir,
        *QUICK,
        "compile=true",
        "compile_backend=recording_for_tests",
        "mixup_alpha=0.2",  # MixUp's weight, a new float each step, must not recompile
    )
    run(recipe, tmp_path / "run", wrap)
    assert per_epoch == [2, 2]
    assert {shapes[0][0] for shapes in graphs} == {20, 16}  # the images' rows


def _sizes(t):
    return t.shape if isinstance(t, torch.Tensor) else ()


def test_cuda_graphs_is_refused_off_cuda_and_with_what_a_graph_cannot_replay(fashion_dir):
    from core.errors import UserError

    recipe = testkit.smoke_recipe("fashion_mnist", fashion_dir, *QUICK, "cuda_graphs=true")
    with pytest.raises(UserError, match="cuda_graphs needs a CUDA device"):
        train.TorchBackend(recipe, "unused", "cpu")
    # and a compile backend torch does not know is said before the first step, not inside it
    recipe = recipe.replace(cuda_graphs=False, compile=True, compile_backend="nope")
    with pytest.raises(UserError, match="'nope' is not a torch.compile backend.*aot_eager"):
        train.TorchBackend(recipe, "unused", "cpu")
    for bad, why in (
        ("compile=true", "compile"),
        ("schedule=onecycle", "onecycle"),
        ("mixup_alpha=0.2", "MixUp"),
        ("grad_accum_steps=2", "accumulation"),
        ("fused_optimizer=off", "fused_optimizer=off"),
    ):
        with pytest.raises(UserError, match=f"cuda_graphs does not combine with .*{why}"):
            testkit.smoke_recipe("fashion_mnist", fashion_dir, *QUICK, "cuda_graphs=true", bad)


class EagerImitation:
    """CUDA graphs' contract run eagerly on a CPU: a capture runs nothing (the recorded step runs
    once to bind its outputs, then every tensor it changed is put back), a replay runs the step
    again on the graph's static inputs, writing (not adding to) the gradients."""

    def __init__(self):
        self.step = None  # the GraphedStep, set once it exists

    def warm_up(self, run):
        run()

    def new_graph(self):
        return {}

    def capture(self, graph, record):
        # what a real capture freezes must be tensors the replays refill: the rates
        for rate, group in zip(self.step.lr, self.step.optimizer.param_groups, strict=True):
            assert group["lr"] is rate
        saved = self.step._snapshot()
        record()
        self.step._restore(saved)
        graph["record"] = record

    def replay(self, graph):
        self.step.optimizer.zero_grad(set_to_none=True)
        graph["record"]()


def _records(workdir):
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "train_images_per_s")}
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def test_cuda_graphs_warm_up_and_capture_leave_the_run_as_eager_and_resume_exactly(
    fashion_dir, tmp_path, monkeypatch
):
    """GraphedStep's own logic on a CPU, the graph replaced by EagerImitation: its warm-up steps
    undone (parameters, BatchNorm statistics and count, momentum), a graph per batch shape (the
    short last batch), the rate as a tensor, outputs copied out. Two epochs end with the eager
    fused run's per-epoch state digests (parameters, statistics, momentum, EMA) and records, and
    so does a run stopped after step 3 and resumed."""
    from torch_ref import graphs

    monkeypatch.setattr(graphs, "WARMUP_STEPS", 2)  # what is undone, undone from 2 steps as 3
    recipe = testkit.smoke_recipe(
        "fashion_mnist", fashion_dir, *QUICK, "fused_optimizer=on", "ema_decay=0.9"
    )
    run(recipe, tmp_path / "eager")
    made = []

    def graphed(backend):
        imitation = EagerImitation()
        backend.graphed = graphs.GraphedStep(
            backend.model, backend.optimizer, backend.scaler, backend.amp_dtype, 0.0, imitation
        )
        imitation.step = backend.graphed
        made.append(backend.graphed.graphs)
        return backend

    run(recipe, tmp_path / "graphed", graphed)
    want = _records(tmp_path / "eager")
    assert len([m for m in want if "state_digest" in m]) == recipe.epochs
    assert _records(tmp_path / "graphed") == want
    assert sorted(key[0][0] for key in made[0]) == [16, 20]  # one graph per batch shape
    with pytest.raises(train.Preempted):
        make = train.backend_factory(recipe, "cpu")
        driver.train_and_evaluate(
            lambda d, t: graphed(make(d, t)) if t else make(d, t),
            recipe,
            tmp_path / "stopped",
            train.STACK,
            stop_after_step=3,
        )
    run(recipe, tmp_path / "stopped", graphed)
    assert _records(tmp_path / "stopped") == want


@pytest.mark.parametrize("growth_count", [0, 1], ids=["fresh", "resumed"])
def test_cuda_graphs_puts_gradscalers_state_back_after_the_warm_up(growth_count):
    """With GradScaler on (fp16's), the imitated graphed steps end with the eager steps' weights
    and scaler state, from a fresh scaler and from one loaded mid-run (a resume: its scale and
    growth count are made at first use from the loaded values)."""
    from torch_ref import graphs, steps
    from torch_ref.augment import Targets

    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 4

    def train(graphed: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 4),
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": growth_count})
        imitation = EagerImitation()
        step = graphs.GraphedStep(model, opt, scaler, None, 0.0, imitation)
        imitation.step = step
        for _ in range(4):
            if graphed:
                step(x, Targets(y))
            else:
                steps.train_step(model, opt, scaler, None, x, Targets(y), 1.0)
        return model.state_dict(), scaler.state_dict()

    (want_model, want_scaler), (got_model, got_scaler) = train(False), train(True)
    assert got_scaler == want_scaler
    assert want_scaler["scale"] != 2.0**10  # the scale grew in these steps: its count mattered
    for key in want_model:
        assert torch.equal(want_model[key], got_model[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [[], ["cuda_graphs=true"]], ids=["eager", "cuda-graphs"])
def test_on_cuda_torchs_sync_debug_mode_sees_no_sync_in_a_step(fashion_dir, tmp_path, extra):
    """The step, the EMA update and the input pipeline's next batch under torch's sync debug
    mode: any synchronising call raises."""
    recipe = testkit.smoke_recipe(
        "fashion_mnist", fashion_dir, *QUICK, "ema_decay=0.9", "ema_every_steps=2", *extra
    )

    def wrap(backend):
        def strictly(fn):
            def call(*args):
                if backend.graphed is not None and len(backend.graphed.graphs) < 2:
                    return fn(*args)  # a capture synchronises: epoch 1 captures both shapes
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return fn(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            return call

        batches = backend.batches

        def epoch(epoch, start_step):
            it = iter(batches(epoch, start_step))
            while True:
                try:
                    batch = strictly(next)(it)
                except StopIteration:
                    return
                yield batch

        backend.train_step = strictly(backend.train_step)
        backend.ema_update = strictly(backend.ema_update)
        backend.batches = epoch
        return backend

    make = train.backend_factory(recipe, "cuda")
    driver.train_and_evaluate(
        lambda d, t: wrap(make(d, t)) if t else make(d, t), recipe, tmp_path / "run", train.STACK
    )
