"""Both command lines (torch_ref.train, flax_impl.train): user mistakes are one line on stderr,
exit code 2, no traceback, no files; runs resume and evaluate."""

import json
import os
import subprocess
import sys

import pytest
import testkit


REPO = str(testkit.REPO)


STACKS = testkit.STACKS


def run_cli(args, cwd, env=None, stack="torch_ref"):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # the CLI runs as users run it: one CPU device
    return subprocess.run(
        [sys.executable, "-m", f"{stack}.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# no network for the CIFAR case, whatever the machine: every download goes to a closed port
OFFLINE = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--recipe", "cifar11"], "unknown recipe 'cifar11'"),
        ([], "--recipe is required"),
        (["--recipe", "fashion_mnist", "epoch=3"], "unknown override key 'epoch'"),
        (["--recipe", "fashion_mnist", "lr=fast"], "override lr='fast': expected a number"),
        (["--recipe", "fashion_mnist", "batch_size=0"], "batch_size must be at least 1"),
        (
            ["--recipe", "fashion_mnist", "mixup_alpha=-0.2"],
            "mixup_alpha must be 0 (off) or positive",
        ),
        (["--recipe", "fashion_mnist", "--data-dir", "no/such/folder"], "Fashion-MNIST not found"),
        (["--recipe", "imagenet"], "ImageNet has no default location"),
        (["--recipe", "imagenet", "--data-dir", "no/such/folder"], "no train/ folder"),
        (["--recipe", "cifar10"], "could not be downloaded"),
        (["--recipe", "fashion_mnist", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--recipe", "fashion_mnist", "epochs=1", "epochs=2"], "override epochs is given twice"),
        (["--recipe", "fashion_mnist", "--workdir", ""], "--workdir is empty"),
        (["--recipe", "fashion_mnist", "--weights", "ema"], "--weights is for --eval-only"),
        (["--recipe", "fashion_mnist", "ema_decay=1"], "ema_decay must be in [0, 1)"),
        (["--recipe", "fashion_mnist", "warmup_epochs=30"], "warmup_epochs=30 leaves no epoch"),
        (["--recipe", "fashion_mnist", "train_crop=24"], "train_crop and eval_crop are for"),
    ],
)
def test_user_mistakes(tmp_path, args, needle, stack, monkeypatch, capsys, in_process):
    """In this process: the stack's own command (`COMMAND`, what `python -m STACK.train` hands
    the driver's `main`), without a trainer process each; test_cifar10_message_says_how_to_fix
    and test_list_keys_and_help run the real commands."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    code = in_process(stack)(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written: no workdir, no empty data folder


@pytest.mark.parametrize("stack", STACKS)
def test_cifar10_message_says_how_to_fix(tmp_path, stack):
    line = run_cli(["--recipe", "cifar10"], tmp_path, OFFLINE, stack).stderr
    assert "cifar-10-python.tar.gz" in line and "--data-dir" in line


@pytest.mark.parametrize("stack", STACKS)
def test_list_keys_and_help(tmp_path, stack):
    proc = run_cli(["--list-keys"], tmp_path, stack=stack)
    assert proc.returncode == 0 and "batch_size: int" in proc.stdout
    assert (
        "  train_subset: int (default 0): use the first N training images; 0 = all\n" in proc.stdout
    )
    proc = run_cli(["--help"], tmp_path, stack=stack)
    assert proc.returncode == 0 and "--recipe" in proc.stdout


def assert_run_pictures(w, stack):
    """What a finished one-epoch run leaves besides checkpoints: the PNGs, the best epoch's
    confusion numbers (consistent with its accuracy) and TensorBoard's scalars."""
    import json

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("curves.png", "confusion.png"):
        with Image.open(w / name) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200, name
    epoch = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()][-1]
    conf = json.loads((w / "confusion.json").read_text())
    m = np.array(conf["confusion"])
    assert m.shape == (10, 10) and m.sum() == epoch["test_count"] == 40
    assert np.trace(m) == round(epoch["test_acc"] * 40)
    assert conf["class_names"][0] == "T-shirt/top" and conf["epoch"] == 1
    acc = np.array(epoch["per_class_test_acc"], float)
    rows = m.sum(1)
    assert np.allclose(acc[rows > 0], (np.diag(m) / np.maximum(rows, 1))[rows > 0])
    ea = EventAccumulator(str(w / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"Loss/train", "Accuracy/train", "Loss/val", "Accuracy/val", "LR"} <= tags
    (val,) = ea.Scalars("Accuracy/val")
    assert val.step == epoch["step"] and np.isclose(val.value, 100 * epoch["test_acc"])


@pytest.mark.parametrize("stack", STACKS)
def test_smoke_run_then_resume_then_eval_only(
    tmp_path, fashion_dir, stack, capsys, in_process, monkeypatch
):
    """The trainer's command end to end (a subprocess), then the same command again, with other
    settings, evaluating, with the other stack (in this process: what `python -m STACK.train`
    runs, without a trainer's start-up each)."""
    monkeypatch.chdir(tmp_path)

    def here(args, stack=stack):
        capsys.readouterr()
        code = in_process(stack)(args)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    common = [
        "--recipe",
        "fashion_mnist",
        "--size",
        "smoke",
        "--data-dir",
        str(fashion_dir),
        "--workdir",
        str(tmp_path / "w"),
        "ema_decay=0.999",  # a model EMA (decay 0.968 adjusted), updated after every step
        "ema_every_steps=1",
        "epochs=1",
    ]
    first = run_cli(common, tmp_path, stack=stack)
    assert first.returncode == 0, first.stderr
    assert "first batch loss" in first.stdout and "epoch   1/1" in first.stdout
    assert "% (ema " in first.stdout
    assert_run_pictures(tmp_path / "w", stack)
    again = here(common)
    assert again.returncode == 0 and "already finished" in again.stdout
    other = here(common[:-1] + ["epochs=2", "lr=0.2"])
    assert (
        other.returncode == 2 and "other settings (epochs: 1 -> 2; lr: 0.1 -> 0.2)" in other.stderr
    )
    ev = here(common + ["--eval-only"])
    assert ev.returncode == 0 and "test loss" in ev.stdout and "on 40 images" in ev.stdout
    ema = here(common + ["--eval-only", "--weights", "ema"])
    assert ema.returncode == 0 and "(its EMA): test loss" in ema.stdout, ema.stderr
    record = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    want = next(m for m in record if "test_acc_ema" in m)
    assert f"acc {100 * want['test_acc_ema']:.2f}%" in ema.stdout  # the EMA the run evaluated
    # predict with the EMA in both stacks (the other one converts this stack's checkpoint)
    import numpy as np
    from PIL import Image

    from flax_impl import predict as flax_predict
    from torch_ref import predict as torch_predict

    png = tmp_path / "zeros.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    logits = []
    for tool in (torch_predict, flax_predict):
        args = ["--workdir", str(tmp_path / "w"), "--weights", "ema", "--json", str(png)]
        assert tool.main(args + ["--device", "cpu"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert "(its EMA)" in out["checkpoint"]
        logits.append(out["logits"])
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4)  # float32 apart
    other_stack = "flax_impl" if stack == "torch_ref" else "torch_ref"
    foreign = here(common, other_stack)
    assert foreign.returncode == 2 and f"holds a {stack} run" in foreign.stderr


def test_workdir_of_another_recipe_is_refused(tmp_path, fashion_dir, cifar_dir):
    """(The refusal is framework-free code; one stack shows it.)"""
    w = str(tmp_path / "w")
    assert (
        run_cli(
            [
                "--recipe",
                "fashion_mnist",
                "--size",
                "smoke",
                "--data-dir",
                str(fashion_dir),
                "--workdir",
                w,
                "epochs=1",
            ],
            tmp_path,
        ).returncode
        == 0
    )
    before = sorted(p.name for p in (tmp_path / "w").rglob("*"))
    proc = run_cli(
        ["--recipe", "cifar10", "--size", "smoke", "--data-dir", str(cifar_dir), "--workdir", w],
        tmp_path,
    )
    assert proc.returncode == 2 and "holds a run of recipe 'fashion_mnist'" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "w").rglob("*")) == before


def test_overrides_may_sit_between_and_after_flags():
    import configs
    from core import cli

    args, recipe = cli.parse(
        [
            "epochs=3",
            "--recipe",
            "fashion_mnist",
            "lr=0.05",
            "--size",
            "smoke",
            "batch_size=8",
            "--workdir",
            "w",
        ],
        "prog",
        "torch_ref",
        configs,
    )
    assert (recipe.epochs, recipe.lr, recipe.batch_size, args.workdir) == (3, 0.05, 8, "w")
