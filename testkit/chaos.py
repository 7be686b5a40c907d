"""Kill a training run anywhere, again and again, and check nothing is lost.

    python -m testkit.chaos [--stack torch_ref|flax_impl|both] [--kills 20] [--seed 0]
                            [--no-group-stops] [--set KEY=VALUE ...]

For each stack: an uninterrupted reference run of a short recipe (generated Fashion-MNIST-shaped
IDX files, 3 epochs, a checkpoint every 2 steps, so there are many writes to land in), then the
same command run again and again in a second workdir, each time SIGKILLed after a random delay,
until it finishes on its own (a cycle); cycles repeat in a fresh workdir until `--kills` kills have
landed. Every other kill is aimed: after its random moment it waits for the next atomic write
(checkpoint or record) to be in progress and kills the run inside it; unaimed kills at uniform
moments almost never land in a write, which takes milliseconds. Every run leaves a state digest
(SHA-256 of parameters, statistics and optimizer state) in its metrics; the killed-and-resumed run
must end with the same digests, epoch by epoch, and the same metrics as the reference, bit for bit
(CPU, deterministic). Each stack's line says where its kills landed (`where_killed`): before the
first checkpoint, outside a write, or inside a write.

Then the group stops: a scheduler's SIGTERM (or a terminal's SIGINT) reaches every process of the
job at once, the trainer and its data-loading workers. On an ImageNet-layout folder of real JPEGs
with num_workers=2 (torch_ref: DataLoader worker processes; flax_impl: decoding threads), the run
is paused at each of the trainer's pause points (core.preemption: start-up, a step,
inside a checkpoint write, between evaluation batches), its whole process group is signalled
there, and it must exit 75 with one line and resume to the uninterrupted run's records. Exit code
0 when every stack passes everything, 1 otherwise. `--set KEY=VALUE` adds a recipe override to
every run, to check a feature's state the same way (e.g. `--set warmup_epochs=1`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testkit import samples
import testkit

OVERRIDES = [
    "train_subset=0",
    "eval_subset=0",
    "epochs=3",
    "batch_size=32",
    "eval_batch_size=64",
    "checkpoint_every_steps=2",
    "log_every_steps=1",
    "num_workers=0",
]
REPO = testkit.REPO


def smoke_args(data_dir: Path, workdir: Path) -> list[str]:
    """The trainer's arguments for the smoke-sized fashion_mnist recipe on CPU (no overrides)."""
    return [
        "--recipe",
        "fashion_mnist",
        "--size",
        "smoke",
        "--data-dir",
        str(data_dir),
        "--workdir",
        str(workdir),
        "--device",
        "cpu",
    ]


def command(stack: str, data_dir: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", f"{stack}.train", *smoke_args(data_dir, workdir), *OVERRIDES]


def trainer_env() -> dict:
    """The environment a trainer subprocess of the tests runs in: this checkout first on
    PYTHONPATH, and no XLA_FLAGS (one CPU device per process, as a user runs it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    return env


def epoch_records(workdir: Path) -> list[dict]:
    """The per-epoch lines of a run's metrics, without the wall-clock fields."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "state_digest" in m:
            out.append(
                {k: v for k, v in m.items() if k not in ("epoch_time", "train_images_per_s")}
            )
    return out


def _temporary(name: str) -> bool:
    """A name of an atomic write in progress (ours: ``.NAME.XXXX.tmp``; Orbax's tmp folders)."""
    return name.endswith(".tmp") or "orbax-checkpoint-tmp" in name


def temporaries(workdir: Path) -> set[str]:
    """The atomic writes in progress (or cut short) in `workdir`: their temporary paths."""
    found = set()
    for top, dirs, files in os.walk(workdir):
        found.update(os.path.join(top, n) for n in dirs + files if _temporary(n))
    return found


def run_once(
    cmd: list[str], kill_after: float | None, aim_at_write: Path | None = None
) -> tuple[int, bool]:
    """Run the command; SIGKILL it after `kill_after` seconds if it is still running, or, with
    `aim_at_write` (the run's workdir), at the first moment after that when this run has a write
    in progress there (leftovers of an earlier kill do not count). Returns (exit code, whether it
    was killed)."""
    stale = temporaries(aim_at_write) if aim_at_write is not None else set()
    proc = subprocess.Popen(
        cmd, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO
    )
    start, killed = time.monotonic(), False
    while kill_after is not None and proc.poll() is None:
        due = time.monotonic() - start >= kill_after
        if due and (aim_at_write is None or temporaries(aim_at_write) - stale):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.0002 if due else 0.01)  # poll fast once due, to catch a write in flight
    proc.wait()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {proc.returncode}: {stderr[-2000:]}")
    return proc.returncode, killed


class References:
    """Uninterrupted runs, each made once per stack and reused (a test session holds one, in
    conftest.py's `references` fixture): the records every stopped-and-resumed run must end
    with, and finished runs that tests copy and then damage. Three kinds, each its own data:

    - "small": `command` on 64 / 32 generated Fashion-MNIST images (6 steps): finished runs
      to resume, evaluate, corrupt or move;
    - "chaos": `command` on 192 / 64 images (18 steps, 9 checkpoint writes): long enough to be
      killed or signalled anywhere;
    - "images": `image_command` on an ImageNet-layout folder of JPEGs (num_workers=2).
    """

    SIZES = {"small": (64, 32), "chaos": (192, 64)}

    def __init__(self, root: Path, overrides: tuple[str, ...] = ()):
        """`overrides`: more ``key=value`` for every command (the chaos tool's --set)."""
        self.root = Path(root)
        self.overrides = list(overrides)
        self._data: dict[str, Path] = {}
        self._runs: dict[tuple[str, str], tuple[Path, float]] = {}

    def data(self, kind: str) -> Path:
        if kind not in self._data:
            folder = self.root / f"data-{kind}"
            if kind == "images":
                samples.write_image_folder(folder, classes=3, per_class=(8, 4))
            else:
                n_train, n_test = self.SIZES[kind]
                samples.write_fashion_mnist(folder, n_train=n_train, n_test=n_test)
            self._data[kind] = folder
        return self._data[kind]

    def command(self, stack: str, kind: str, workdir: Path) -> list[str]:
        """The trainer command of `kind` for `stack`, on this kind's data, into `workdir`."""
        make = image_command if kind == "images" else command
        return make(stack, self.data(kind), Path(workdir)) + self.overrides

    def _run(self, stack: str, kind: str) -> tuple[Path, float]:
        if (stack, kind) not in self._runs:
            workdir = self.root / f"{stack}-{kind}-reference"
            t0 = time.perf_counter()
            run_once(self.command(stack, kind, workdir), None)
            self._runs[stack, kind] = workdir, time.perf_counter() - t0
        return self._runs[stack, kind]

    def records(self, stack: str, kind: str) -> list[dict]:
        """The uninterrupted run's per-epoch records (epoch_records)."""
        return epoch_records(self._run(stack, kind)[0])

    def seconds(self, stack: str, kind: str) -> float:
        """How long the uninterrupted run took (start-up included)."""
        return self._run(stack, kind)[1]

    def copy(self, stack: str, kind: str, workdir: Path) -> list[str]:
        """A copy of the finished run in `workdir` (its lock file left out), and the command
        that resumes it there."""
        shutil.copytree(self._run(stack, kind)[0], workdir, symlinks=True)
        (Path(workdir) / ".lock").unlink(missing_ok=True)
        return self.command(stack, kind, workdir)


def where_killed(workdir: Path, stale: set[str]) -> str:
    """Where a SIGKILL landed, read off what it left: "inside a write" when the killed run left
    a temporary file or folder of an atomic write (a checkpoint, the record) that was not there
    before it started (`stale`), "before the first checkpoint" when none had been written yet,
    else "outside a write" (start-up included)."""
    if temporaries(workdir) - stale:
        return "inside a write"
    ckpts = workdir / "checkpoints"
    if not ckpts.exists() or not any(p for p in ckpts.rglob("*") if p.is_file()):
        return "before the first checkpoint"
    return "outside a write"


def check_stack(
    stack: str,
    kills: int,
    root: Path,
    rng: random.Random,
    log=print,
    min_inside: int = 0,
    references: References | None = None,
) -> dict:
    """`kills` SIGKILLs, every other one aimed into a write; then, while fewer than `min_inside`
    kills have landed inside a write, more aimed kills (at most `kills` more). An aimed kill can
    still miss: the write may finish between the moment it is seen and the signal's delivery.
    The uninterrupted run comes from `references` (made in `root` when none is given)."""
    refs = references or References(root)
    run_dir = root / f"{stack}-killed"
    duration = refs.seconds(stack, "chaos")
    reference = refs.records(stack, "chaos")
    killed, attempts, cycles, identical = 0, 0, 0, True
    landed = {"before the first checkpoint": 0, "outside a write": 0, "inside a write": 0}

    def wanted() -> bool:
        return killed < kills or (landed["inside a write"] < min_inside and killed < 2 * kills)

    while wanted():
        # one cycle: a fresh workdir, killed at random moments within one run's length
        # (start-up included) and rerun until a run finishes on its own
        cycles += 1
        shutil.rmtree(run_dir, ignore_errors=True)
        done = False
        while not done:
            attempts += 1
            delay = rng.uniform(0.2, duration) if wanted() else None
            # every other kill waits for the next write after its moment: a write takes a few
            # milliseconds, so kills at uniformly random moments would almost never land in one
            aim = run_dir if killed % 2 or killed >= kills else None
            stale = temporaries(run_dir)
            _, was_killed = run_once(refs.command(stack, "chaos", run_dir), delay, aim)
            killed += was_killed
            if was_killed:
                landed[where_killed(run_dir, stale)] += 1
            done = not was_killed
            if attempts > 20 * kills + 10:
                raise RuntimeError("the run never finished")
        identical &= epoch_records(run_dir) == reference
    got = epoch_records(run_dir)
    result = {
        "stack": stack,
        "kills": killed,
        "kills_landed": landed,
        "runs": attempts,
        "cycles": cycles,
        "identical": identical,
        "final_digest": got[-1]["state_digest"] if got else None,
        "reference_digest": reference[-1]["state_digest"],
    }
    log(json.dumps(result))
    return result


# --- group stops at the trainer's pause points ----------------------------------------------

IMAGE_OVERRIDES = [
    "model=resnet18",
    "num_classes=3",
    "image_size=32",
    "eval_resize=36",
    "batch_size=4",
    "eval_batch_size=4",
    "epochs=2",
    "train_subset=0",
    "eval_subset=0",
    "num_workers=2",
    "log_every_steps=1",
    "checkpoint_every_steps=2",
]
# (pause point, signal): write:3 is the first checkpoint's write (config.json and
# environment.json are the first two atomic writes of a run)
STOPS = [
    ("start", signal.SIGTERM),
    ("step:3", signal.SIGTERM),
    ("write:3", signal.SIGTERM),
    ("eval:2", signal.SIGINT),
]


def image_command(stack: str, data_dir: Path, workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"{stack}.train",
        "--recipe",
        "imagenet",
        "--size",
        "smoke",
        "--data-dir",
        str(data_dir),
        "--workdir",
        str(workdir),
        "--device",
        "cpu",
        *IMAGE_OVERRIDES,
    ]


def children(pid: int) -> list[int]:
    """The processes `pid` started (its data-loading workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def paused(cmd: list[str], point: str, flag: Path, timeout: float = 300) -> subprocess.Popen:
    """Start `cmd` in a process group of its own, and return once the trainer waits at its pause
    `point` (core.preemption.pause)."""
    env = dict(trainer_env(), TRAINER_PAUSE_AT=point, TRAINER_PAUSE_FILE=str(flag))
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"the run never reached {point}: {err[-2000:]}")
        time.sleep(0.02)
    return proc


def group_stop(
    cmd: list[str], point: str, sig: int, flag: Path, workers_first: bool = False
) -> tuple[int, str]:
    """Pause the run at `point`, signal its whole process group (with `workers_first`, each
    worker alone first, then the group); (exit code, stderr)."""
    proc = paused(cmd, point, flag)
    if workers_first:
        for pid in children(proc.pid):
            os.kill(pid, sig)
        time.sleep(0.5)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def check_group_stops(
    stack: str, root: Path, stops=STOPS, log=print, references: References | None = None
) -> dict:
    """Each stop in `stops` on a fresh run: exit 75 with one line, then the rerun's records equal
    the uninterrupted run's (from `references`, made in `root` when none is given)."""
    refs = references or References(root)
    reference = refs.records(stack, "images")
    results = {}
    for point, sig in stops:
        workdir = root / f"{stack}-stop-{point.replace(':', '-')}"
        cmd = refs.command(stack, "images", workdir)
        code, err = group_stop(cmd, point, sig, root / "paused")
        one_line = len(err.strip().splitlines()) == 1 and "Traceback" not in err
        run_once(cmd, None)
        results[point] = code == 75 and one_line and epoch_records(workdir) == reference
    result = {"stack": stack, "group_stops": results, "identical": all(results.values())}
    log(json.dumps(result))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stack", choices=("torch_ref", "flax_impl", "both"), default="both")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-group-stops",
        action="store_true",
        help="only the SIGKILLs, not the group SIGTERM/SIGINT at pause points",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run (repeatable), e.g. --set warmup_epochs=1",
    )
    args = parser.parse_args(argv)
    stacks = ["torch_ref", "flax_impl"] if args.stack == "both" else [args.stack]
    rng = random.Random(args.seed)
    ok = True
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        refs = References(Path(tmp), tuple(args.set))
        for stack in stacks:
            ok &= check_stack(stack, args.kills, Path(tmp), rng, references=refs)["identical"]
            if not args.no_group_stops:
                ok &= check_group_stops(stack, Path(tmp), references=refs)["identical"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
