"""The run driver against a framework-free backend: two "processes" (threads that sum through a
barrier, as DDP's all-reduce does), so the driver's own contract is tested without torch or JAX.

What the fake computes is arbitrary but deterministic in (epoch, step, rank), like a real run on a
CPU: an uninterrupted run and a stopped-and-resumed one must write the same record, bit for bit.
"""

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from configs import get_config
from core import driver
from testkit import samples
from core.errors import CorruptData, UserError
from core.preemption import Preempted


class Exchange:
    """What process group collectives do, for threads."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def all_sum(self, rank: int, values) -> np.ndarray:
        self.slots[rank] = np.asarray(values, np.float64)
        self.barrier.wait()
        total = np.sum(self.slots, axis=0)
        self.barrier.wait()
        return total


class FakeBackend:
    framework, checkpoint_format = "fake", "fake/1"
    per_process_metrics = True
    steps_per_epoch, num_eval = 4, 10

    def __init__(
        self,
        ckpt_dir: Path,
        rank: int,
        exchange: Exchange,
        nan_steps=(),
        corrupt_at=None,
        allowed: int = 0,
        crash_at=None,
    ):
        self.ckpt_dir, self.rank, self.exchange = Path(ckpt_dir), rank, exchange
        self.is_main, self.num_processes = rank == 0, exchange.world
        self.replicas, self.num_train = exchange.world, 8 * exchange.world
        self.nan_steps, self.corrupt_at, self.crash_at = set(nan_steps), corrupt_at, crash_at
        self.nonfinite_steps_allowed = allowed
        self.w, self.steps_done = 1.0, 0
        self.ema, self.ema_count, self.ema_log, self.last_step = 0.0, 0, [], None
        # the processes meet here, as a real backend's start does (torch.distributed's and
        # jax.distributed's initialisation): each has read the workdir's config before the
        # main process writes it (without this, a "process" started late saw the other's
        # config.json, took the resume path alone and its collectives went out of step)
        exchange.barrier.wait()

    def describe(self):
        return f"fake x {self.num_processes}"

    def device_name(self):
        return "fake"

    def libraries(self):
        return {}

    def num_params(self):
        return 1

    def batches(self, epoch, start_step):
        for step in range(start_step, self.steps_per_epoch):
            if (epoch, step) == self.corrupt_at:
                raise CorruptData(f"image of step {step} is corrupt")
            yield epoch, step

    def train_step(self, batch):
        epoch, step = batch
        g = epoch * self.steps_per_epoch + step
        if g == self.crash_at:
            raise RuntimeError(f"the process died before step {g}")  # no checkpoint written
        self.last_step = g
        self.w = 0.9 * self.w + 0.1 * np.sin(g)  # the same on every rank, as after all-reduce
        loss = np.nan if g in self.nan_steps else abs(self.w) + 0.01 * (self.rank + 1) * step
        return loss, float((g + self.rank) % 3), 4.0 + self.rank  # uneven shares

    def fetch(self, handles):
        rows = np.array(handles, np.float64)
        return driver.StepMetrics.of(rows[:, 0], rows[:, 1], rows[:, 2], np.isfinite(rows[:, 0]))

    def all_sum(self, values):
        return self.exchange.all_sum(self.rank, values)

    def any_process(self, flag):
        return bool(self.all_sum([float(flag)])[0] > 0)

    def evaluate(self, between=None, weights="model"):
        confusion = np.zeros((10, 10), np.int64)  # fashion_mnist's 10 classes: 5 right of 10
        confusion[0, 0], confusion[0, 1] = 5, 5
        return 10 * abs(self.ema if weights == "ema" else self.w), 5.0, 10.0, confusion

    def ema_update(self, restart):
        self.ema_log.append((self.last_step, restart))
        self.ema = self.w if self.ema_count == 0 else 0.5 * self.ema + 0.5 * self.w
        self.ema_count = 0 if restart else self.ema_count + 1

    def end_epoch(self):
        pass

    def digest(self):
        return hashlib.sha256(np.float64(self.w).tobytes()).hexdigest()[:16]

    def save(self, meta, best):
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"meta": meta, "w": self.w, "ema": [self.ema, self.ema_count]})
            for name in ("best", "last") if best else ("last",):
                (self.ckpt_dir / f"{name}.json").write_text(text)
        self.exchange.barrier.wait()

    def resume_candidates(self):
        return [str(self.ckpt_dir / "last.json")] if (self.ckpt_dir / "last.json").exists() else []

    def restore(self, where, check):
        saved = json.loads(Path(where).read_text())
        check(saved["meta"], where)
        self.w = saved["w"]
        self.ema, self.ema_count = saved["ema"]
        return saved["meta"]

    def restore_for_eval(self, path, check, weights="model"):
        raise NotImplementedError

    def close(self):
        pass


def run_two(workdir, stop_after_step=None, recipe_changes=None, **kw):
    """Both ranks' train_and_evaluate, each in a thread; their results (or exceptions)."""
    recipe = get_config("fashion_mnist", "smoke").replace(
        epochs=4, log_every_steps=3, **(recipe_changes or {})
    )
    exchange = Exchange(2)
    out = [None, None]

    def one(rank):
        make = lambda ckpt_dir, train: FakeBackend(ckpt_dir, rank, exchange, **kw)  # noqa: E731
        try:
            out[rank] = driver.train_and_evaluate(
                make, recipe, workdir, "fake", stop_after_step, main_process=rank == 0
            )
        except Exception as err:  # noqa: BLE001 - handed to the test
            out[rank] = err

    threads = [threading.Thread(target=one, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def records(workdir):
    drop = ("epoch_time", "train_images_per_s")
    return [
        {k: v for k, v in json.loads(x).items() if k not in drop}
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def test_two_processes_resumed_mid_epoch_record_what_an_uninterrupted_run_does(tmp_path):
    """Stopped at global step 10 (the processes agree on stopping every 10 steps), in the middle
    of epoch 3, and resumed. The epoch's running sums of both processes are in the checkpoint
    and counted once: the resumed epoch's train loss and accuracy equal the uninterrupted run's."""
    straight = run_two(tmp_path / "straight")
    assert all(isinstance(r, dict) for r in straight), straight
    stopped = run_two(tmp_path / "stopped", stop_after_step=9)
    assert all(isinstance(r, Preempted) and int(str(r)) == 10 for r in stopped), stopped
    resumed = run_two(tmp_path / "stopped")
    assert resumed[0]["global_step"] == resumed[1]["global_step"] == 16
    want = records(tmp_path / "straight")
    assert len([m for m in want if "train_acc" in m]) == 4
    assert records(tmp_path / "stopped") == want
    # the uneven shares (4 and 5 examples) both count: 9 per step, 36 per epoch
    assert [m["train_acc"] for m in want if "train_acc" in m] == [
        pytest.approx(sum(((e * 4 + s) % 3) * 1.0 + ((e * 4 + s + 1) % 3) for s in range(4)) / 36)
        for e in range(4)
    ]


def test_the_ema_follows_every_nth_step_restarts_in_the_warmup_and_resumes(tmp_path):
    """The driver updates the EMA after steps 0, 3, 6, ... of each epoch (torchvision's
    ``i % model_ema_steps == 0``), with a restart after each update of the warm-up epochs, and
    evaluates it beside the model; a run stopped mid-epoch resumes to the same record."""
    ema = dict(ema_decay=0.5, ema_every_steps=3, warmup_epochs=1)
    straight = run_two(tmp_path / "straight", recipe_changes=ema)
    assert all(isinstance(r, dict) for r in straight), straight
    # 4 steps an epoch: indices 0 and 3 of each; the restarts are epoch 1's (the warm-up)
    assert straight[0]["test_acc_ema"] == 0.5
    want = records(tmp_path / "straight")
    losses = [(m["test_loss"], m["test_loss_ema"]) for m in want if "test_loss" in m]
    assert len(losses) == 4 and all(a != b for a, b in losses[1:])  # the EMA lags the model
    stopped = run_two(tmp_path / "stopped", stop_after_step=9, recipe_changes=ema)
    assert all(isinstance(r, Preempted) for r in stopped), stopped
    run_two(tmp_path / "stopped", recipe_changes=ema)
    assert records(tmp_path / "stopped") == want


def test_the_ema_update_points(tmp_path):
    """Which steps update the EMA and which restart it: 0 and 3 of each 4-step epoch, restarts in
    the first (warm-up) epoch only."""
    from core import schedules

    r = get_config("fashion_mnist", "smoke").replace(
        epochs=4, ema_decay=0.5, ema_every_steps=3, warmup_epochs=1
    )
    points = [
        (e * 4 + s, schedules.ema_restarts(r, e))
        for e in range(4)
        for s in range(4)
        if schedules.ema_updates_after(r, s)
    ]
    assert points == [(0, True), (3, True), (4, False), (7, False), (8, False), (11, False)] + [
        (12, False),
        (15, False),
    ]
    assert not schedules.ema_updates_after(r.replace(ema_decay=0.0), 0)
    # torchvision's adjustment with its V2 values: 8 GPUs x 128, every 32 steps, 600 epochs
    v2 = r.replace(epochs=600, batch_size=128, ema_every_steps=32, ema_decay=0.99998)
    assert schedules.ema_decay(v2, 8) == 1.0 - (1.0 - 0.99998) * (8 * 128 * 32 / 600)
    assert schedules.ema_decay(r, 2) == 0.0  # alpha capped at 1: the EMA copies the model


def test_a_crash_rewinds_the_record_and_the_tensorboard_files(tmp_path):
    """Killed at global step 10 (log lines at steps 3, 6, 9; the last checkpoint at step 8),
    then rerun: the steps after 8 are done again, and neither the record nor TensorBoard holds
    any of them twice or from the dead process."""
    straight = run_two(tmp_path / "straight")
    assert all(isinstance(r, dict) for r in straight), straight
    crashed = run_two(tmp_path / "crashed", crash_at=10)
    assert all(isinstance(r, RuntimeError) for r in crashed), crashed
    before = samples.tensorboard_scalars(tmp_path / "crashed")
    assert [s for s, _ in before["LR"]] == [3, 6, 9]  # step 9 is past the checkpoint
    resumed = run_two(tmp_path / "crashed")
    assert all(isinstance(r, dict) for r in resumed), resumed
    assert records(tmp_path / "crashed") == records(tmp_path / "straight")
    want = samples.tensorboard_scalars(tmp_path / "straight")
    assert want["Loss/train_step"] and len(want["Accuracy/val"]) == 4
    # only the main process writes: one event file for the two "processes"
    assert len(list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert samples.tensorboard_scalars(tmp_path / "crashed") == want


def test_a_resume_with_tensorboard_off_still_drops_the_discarded_steps(tmp_path):
    """Otherwise a later resume with it on again would keep the dead process's steps 9..."""
    run_two(tmp_path / "w", crash_at=10)
    assert [s for s, _ in samples.tensorboard_scalars(tmp_path / "w")["LR"]] == [3, 6, 9]
    out = run_two(tmp_path / "w", recipe_changes={"tensorboard": False})
    assert all(isinstance(r, dict) for r in out), out
    assert [s for s, _ in samples.tensorboard_scalars(tmp_path / "w")["LR"]] == [3, 6]


def test_a_rewind_drops_the_confusion_files_of_a_discarded_epoch(tmp_path):
    from core.plot import Pictures
    from core.records import RunRecord

    rec = RunRecord(tmp_path, "fake", get_config("fashion_mnist", "smoke"), writer=True)
    rec.log(step=4, epoch=1, test_acc=0.5, train_loss=1.0, test_loss=1.0, train_acc=0.5)
    rec.log(step=8, epoch=2, test_acc=0.6, train_loss=1.0, test_loss=1.0, train_acc=0.5)
    for name in ("confusion.json", "confusion.png"):
        (tmp_path / name).write_text(json.dumps({"step": 8}))
    rec.rewind(8)  # the checkpoint holds epoch 2: its matrix stays
    assert (tmp_path / "confusion.json").exists() and (tmp_path / "confusion.png").exists()
    rec.rewind(4)  # epoch 2 is done again: its files go, the curves show epoch 1 only
    assert not (tmp_path / "confusion.json").exists()
    assert not (tmp_path / "confusion.png").exists()
    assert [m["step"] for m in rec.read_metrics()] == [4]
    Pictures(rec).redraw()  # what the driver does after the rewind
    assert (tmp_path / "curves.png").exists()


def test_pictures_are_drawn_at_most_every_30_seconds_and_when_the_run_ends(tmp_path, monkeypatch):
    """Drawing takes ~0.5 s a picture: a short run draws once, at its end (flush); a long one
    after any epoch that ends 30 s or more after the last drawing. close() (a stop, a failure)
    draws what is left and lets a failed drawing go; flush() (a finished run) does not."""
    from core import plot
    from core.records import RunRecord

    rec = RunRecord(tmp_path, "fake", get_config("fashion_mnist", "smoke"), writer=True)
    now = [0.0]
    pictures = plot.Pictures(rec, clock=lambda: now[0])
    curves = tmp_path / "curves.png"

    def epoch(k):
        m = dict(step=4 * k, epoch=k, test_acc=0.1 * k, train_loss=1.0, test_loss=1.0)
        rec.log(train_acc=0.5, **m)
        pictures.log_epoch(m)

    epoch(1)
    now[0] = 29.9
    epoch(2)
    assert not curves.exists()  # under 30 s since the start
    now[0] = 30.0
    epoch(3)
    drawn = curves.read_bytes()  # epochs 1-3
    now[0] = 45.0
    epoch(4)
    assert curves.read_bytes() == drawn  # 15 s after the last drawing: not yet
    pictures.flush()
    assert curves.read_bytes() != drawn  # the end of the run: epoch 4 is in
    drawn = curves.read_bytes()
    pictures.flush()  # nothing left to draw: nothing drawn
    assert curves.read_bytes() == drawn

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot, "curves_png", full)
    epoch(5)
    pictures.close()  # the run is ending with its own message: this one goes
    epoch(6)
    with pytest.raises(OSError):
        pictures.flush()


def test_a_disk_full_after_the_best_checkpoint_says_the_rerun_resumes(tmp_path, monkeypatch):
    """The first save of a run writes `best`, then fills the disk writing `last`: the line says
    the rerun resumes (it does, from `best`), not that nothing was written."""

    def best_then_full(self, meta, best):
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.ckpt_dir / "best.json").write_text(json.dumps({"meta": meta, "w": self.w}))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FakeBackend, "save", best_then_full)
    monkeypatch.setattr(
        FakeBackend, "resume_candidates", lambda self: [str(p) for p in self.ckpt_dir.glob("*")]
    )
    out = run_two(tmp_path / "w")
    assert all(isinstance(r, UserError) for r in out), out
    assert "No space left on device" in str(out[0])
    assert "rerun the same command to resume" in str(out[0]), out[0]


def test_tolerated_non_finite_steps_are_left_out_and_a_longer_streak_stops(tmp_path):
    ok = run_two(tmp_path / "skips", nan_steps={5, 6}, allowed=2)
    assert all(isinstance(r, dict) for r in ok), ok
    stopped = run_two(tmp_path / "diverged", nan_steps={5, 6, 7}, allowed=2)
    assert all(isinstance(r, driver.NonFiniteLoss) for r in stopped)
    assert "NaN or inf at global step 7 (epoch 2)" in str(stopped[0])
    # the advice is one a resume would not refuse: a lower lr is a new run, elsewhere
    assert "lower lr" in str(stopped[0]) and "in another --workdir" in str(stopped[0])


def test_corrupt_data_keeps_the_last_completed_step(tmp_path):
    """One process: a checkpoint of the last completed step. Several: the process that read
    the file cannot know whether the others did, and a save's collectives would wait on them
    forever, so it stops without one and the run resumes from its last checkpoint (the end of
    epoch 1 here)."""
    out = run_two(tmp_path / "run", corrupt_at=(1, 2))
    assert all(isinstance(r, CorruptData) for r in out), out
    assert "stops without a new checkpoint" in str(out[0])
    assert "the last checkpoint, of global step 4, is kept" in str(out[0])
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (1, 0, 4)
    recipe = get_config("fashion_mnist", "smoke").replace(epochs=4, log_every_steps=3)

    def make(ckpt_dir, train):
        return FakeBackend(ckpt_dir, 0, Exchange(1), corrupt_at=(1, 2))

    with pytest.raises(CorruptData, match="a checkpoint of global step 6 was written"):
        driver.train_and_evaluate(make, recipe, tmp_path / "one", "fake")
    meta = json.loads((tmp_path / "one" / "checkpoints" / "last.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (1, 2, 6)


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
    run_two(tmp_path / "run", stop_after_step=9)
    last = tmp_path / "run" / "checkpoints" / "last.json"
    saved = json.loads(last.read_text())
    saved["meta"]["format"] = "fake/0"
    last.write_text(json.dumps(saved))
    out = run_two(tmp_path / "run")
    assert all(isinstance(r, driver.UserError) for r in out), out
    assert "has format fake/0, this version of fake reads fake/1" in str(out[0])
    assert json.loads(last.read_text()) == saved  # nothing overwritten


def test_a_deleted_record_is_refused_until_told_to_go_on(tmp_path):
    """metrics.jsonl (or tensorboard/) deleted after epoch 2: resuming from the checkpoint of
    global step 10 says what is missing, in one line, and changes nothing; with
    resume_with_gap=true the run goes on and the record holds the epochs after the gap."""
    run_two(tmp_path / "w", stop_after_step=9)
    (tmp_path / "w" / "metrics.jsonl").unlink()
    before = sorted(p.name for p in (tmp_path / "w").rglob("*"))
    out = run_two(tmp_path / "w")
    assert all(isinstance(r, driver.UserError) for r in out), out
    line = str(out[0])
    assert f"{tmp_path / 'w' / 'metrics.jsonl'} lacks epochs 1-2 (deleted or replaced?)" in line
    assert "has trained 2 epoch(s) and 10 steps: the checkpoint holds the weights" in line
    assert "resume_with_gap=true" in line
    assert sorted(p.name for p in (tmp_path / "w").rglob("*")) == before  # nothing written
    done = run_two(tmp_path / "w", recipe_changes={"resume_with_gap": True})
    assert all(isinstance(r, dict) for r in done), done
    assert [m["epoch"] for m in records(tmp_path / "w") if "test_acc" in m] == [3, 4]

    run_two(tmp_path / "tb", stop_after_step=9)
    import shutil

    shutil.rmtree(tmp_path / "tb" / "tensorboard")
    out = run_two(tmp_path / "tb")
    assert f"{tmp_path / 'tb' / 'tensorboard'} holds no event files" in str(out[0])
    # with TensorBoard off now, nothing is missing that this run would write
    assert all(
        isinstance(r, dict) for r in run_two(tmp_path / "tb", recipe_changes={"tensorboard": False})
    )


def test_the_nan_line_names_the_checkpoint_that_is_kept(tmp_path):
    """Before any checkpoint it says none was written; after one, which step it holds."""
    early = run_two(tmp_path / "early", nan_steps={1})
    assert "no checkpoint was written yet" in str(early[0]), early
    late = run_two(tmp_path / "late", nan_steps={6})
    assert (
        f"the last checkpoint, of global step 4, is kept in {tmp_path / 'late' / 'checkpoints'}"
    ) in str(late[0]), late


def test_a_killed_writes_leftovers_are_tidied_by_the_rerun(tmp_path):
    """A SIGKILL inside the config.json write (or any of the record's atomic writes) leaves
    its temporary file; the next run of the workdir removes it."""
    run_two(tmp_path / "w", stop_after_step=5)
    left = [tmp_path / "w" / ".config.json.k1ll3d.tmp", tmp_path / "w" / ".curves.png.x.tmp"]
    for p in left:
        p.write_text("cut short")
    assert all(isinstance(r, dict) for r in run_two(tmp_path / "w"))
    assert not any(p.exists() for p in left)
