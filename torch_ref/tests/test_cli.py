"""The command line: user mistakes are one line on stderr, exit code 2, no traceback, no files."""

import os
import subprocess
import sys

import pytest

from framework_free import readers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(args, cwd, env=None):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "torch_ref.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# no network for the CIFAR case, whatever the machine: every download goes to a closed port
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.parametrize("args, needle", [
    (["--recipe", "cifar11"], "unknown recipe 'cifar11'"),
    ([], "--recipe is required"),
    (["--recipe", "fashion_mnist", "epoch=3"], "unknown override key 'epoch'"),
    (["--recipe", "fashion_mnist", "lr=fast"], "override lr='fast': expected a number"),
    (["--recipe", "fashion_mnist", "batch_size=0"], "batch_size must be at least 1"),
    (["--recipe", "fashion_mnist", "--data-dir", "no/such/folder"], "Fashion-MNIST not found"),
    (["--recipe", "imagenet"], "ImageNet has no default location"),
    (["--recipe", "imagenet", "--data-dir", "no/such/folder"], "no train/ folder"),
    (["--recipe", "cifar10"], "could not be downloaded"),
    (["--recipe", "fashion_mnist", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_user_mistakes(tmp_path, args, needle):
    proc = run_cli(args, tmp_path, OFFLINE)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: no workdir, no empty data folder


def test_cifar10_message_says_how_to_fix(tmp_path):
    line = run_cli(["--recipe", "cifar10"], tmp_path, OFFLINE).stderr
    assert "cifar-10-python.tar.gz" in line and "--data-dir" in line


def test_list_keys_and_help(tmp_path):
    proc = run_cli(["--list-keys"], tmp_path)
    assert proc.returncode == 0 and "batch_size: int" in proc.stdout
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "--recipe" in proc.stdout


def test_smoke_run_then_resume_then_eval_only(tmp_path, fashion_dir):
    common = ["--recipe", "fashion_mnist", "--size", "smoke", "--data-dir", str(fashion_dir),
              "--workdir", str(tmp_path / "w"), "epochs=1"]
    first = run_cli(common, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "first batch loss" in first.stdout and "epoch   1/1" in first.stdout
    again = run_cli(common, tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout
    other = run_cli(common[:-1] + ["epochs=2", "lr=0.2"], tmp_path)
    assert other.returncode == 2 and "other settings (epochs: 1 -> 2; lr: 0.1 -> 0.2)" in other.stderr
    ev = run_cli(common + ["--eval-only"], tmp_path)
    assert ev.returncode == 0 and "best.pt: test loss" in ev.stdout


def test_workdir_of_another_recipe_is_refused(tmp_path, fashion_dir, cifar_dir):
    w = str(tmp_path / "w")
    assert run_cli(["--recipe", "fashion_mnist", "--size", "smoke", "--data-dir", str(fashion_dir),
                    "--workdir", w, "epochs=1"], tmp_path).returncode == 0
    before = sorted(p.name for p in (tmp_path / "w").rglob("*"))
    proc = run_cli(["--recipe", "cifar10", "--size", "smoke", "--data-dir", str(cifar_dir),
                    "--workdir", w], tmp_path)
    assert proc.returncode == 2 and "holds a run of recipe 'fashion_mnist'" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "w").rglob("*")) == before


@pytest.mark.skipif(not readers.fashion_mnist_present(readers.FASHION_MNIST_SYSTEM_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_learns(tmp_path):
    """Two epochs on 6,000 real training images, evaluated on all 10,000 test images.
    Measured here: 76.1%, 74.7%, 75.6% for seeds 0-2. The floor of 70% sits ~5 points (4-5x
    the seed spread) below that, and far above chance (10%), which is what images paired with
    the wrong labels give."""
    from configs import get_config
    from framework_free.recipe import apply_overrides
    from torch_ref.train import train_and_evaluate

    r = apply_overrides(get_config("fashion_mnist"), ["train_subset=6000", "epochs=2"])
    out = train_and_evaluate(r, tmp_path / "real")
    assert out["test_count"] == 10_000
    assert out["test_acc"] >= 0.70, out
