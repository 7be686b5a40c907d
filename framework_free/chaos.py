"""Kill a training run anywhere, again and again, and check nothing is lost.

    python -m framework_free.chaos [--stack torch_ref|flax_impl|both] [--kills 20] [--seed 0]

For each stack: an uninterrupted reference run of a short recipe (generated Fashion-MNIST-shaped
IDX files, 3 epochs, a checkpoint every 2 steps so that kills often land inside a checkpoint write),
then the same command run again and again in a second workdir, each time SIGKILLed after a random
delay, until it finishes on its own (a cycle); cycles repeat in a fresh workdir until `--kills`
kills have landed. Every run leaves a state digest
(SHA-256 of parameters, statistics and optimizer state) in its metrics; the killed-and-resumed run
must end with the same digests, epoch by epoch, and the same metrics as the reference, bit for bit
(CPU, deterministic). Exit code 0 when every stack passes, 1 otherwise.
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

from framework_free import testing

OVERRIDES = ["train_subset=0", "eval_subset=0", "epochs=3", "batch_size=32", "eval_batch_size=64",
             "checkpoint_every_steps=2", "log_every_steps=1", "num_workers=0"]
REPO = Path(__file__).resolve().parent.parent


def command(stack: str, data_dir: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", f"{stack}.train", "--recipe", "fashion_mnist", "--size", "smoke",
            "--data-dir", str(data_dir), "--workdir", str(workdir), "--device", "cpu", *OVERRIDES]


def _env() -> dict:
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
            out.append({k: v for k, v in m.items() if k not in ("epoch_time",
                                                                 "train_images_per_s")})
    return out


def run_once(cmd: list[str], kill_after: float | None) -> tuple[int, bool]:
    """Run the command; SIGKILL it after `kill_after` seconds if it is still running.
    Returns (exit code, whether it was killed)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=REPO)
    try:
        proc.wait(timeout=kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = True
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {proc.returncode}: {stderr[-2000:]}")
    return proc.returncode, killed


def check_stack(stack: str, kills: int, root: Path, rng: random.Random, log=print) -> dict:
    data_dir = testing.write_fashion_mnist(root / "data", n_train=192, n_test=64)
    ref_dir, run_dir = root / f"{stack}-reference", root / f"{stack}-killed"
    t0 = time.perf_counter()
    run_once(command(stack, data_dir, ref_dir), None)
    duration = time.perf_counter() - t0
    reference = epoch_records(ref_dir)
    killed, attempts, cycles, identical = 0, 0, 0, True
    while killed < kills:
        # one cycle: a fresh workdir, killed at random moments within one run's length
        # (start-up included) and rerun until a run finishes on its own
        cycles += 1
        shutil.rmtree(run_dir, ignore_errors=True)
        done = False
        while not done:
            attempts += 1
            delay = rng.uniform(0.2, duration) if killed < kills else None
            _, was_killed = run_once(command(stack, data_dir, run_dir), delay)
            killed += was_killed
            done = not was_killed
            if attempts > 20 * kills + 10:
                raise RuntimeError("the run never finished")
        identical &= epoch_records(run_dir) == reference
    got = epoch_records(run_dir)
    result = {"stack": stack, "kills": killed, "runs": attempts, "cycles": cycles,
              "identical": identical, "final_digest": got[-1]["state_digest"] if got else None,
              "reference_digest": reference[-1]["state_digest"]}
    log(json.dumps(result))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m framework_free.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=("torch_ref", "flax_impl", "both"), default="both")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stacks = ["torch_ref", "flax_impl"] if args.stack == "both" else [args.stack]
    rng = random.Random(args.seed)
    ok = True
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        for stack in stacks:
            ok &= check_stack(stack, args.kills, Path(tmp), rng)["identical"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
