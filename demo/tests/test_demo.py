"""The demo in a real browser (Debian's chromium, headless, driven by selenium) and through
gradio_client: on a short real Fashion-MNIST run, both columns show what `predict --json` says for
the same test image, and the page's parity line holds."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from core import readers
from testkit import samples
import testkit

REPO = str(testkit.REPO)

pytestmark = pytest.mark.skipif(
    not readers.fashion_mnist_present(readers.FASHION_MNIST_SYSTEM_DIR),
    reason="Debian's dataset-fashion-mnist is not installed",
)


def env():
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("XLA_FLAGS", None)  # as users run it
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short real-data run (512 training images, one epoch) and test image 0 as a PNG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch_ref.train",
            "--recipe",
            "fashion_mnist",
            "--workdir",
            str(root / "run"),
            "epochs=1",
            "train_subset=512",
            "eval_subset=500",
            "batch_size=64",
            "log_every_steps=4",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    test = readers.read_fashion_mnist(readers.FASHION_MNIST_SYSTEM_DIR, train=False)
    Image.fromarray(test.images[0, :, :, 0]).save(root / "test0.png")
    # bad uploads, and the same test image as a phone stores a photo taken sideways
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(samples.png_bytes(16000, 12000))
    samples.sideways_jpeg(root / "sideways.jpg", test.images[0, :, :, 0])
    return root


# what predict says of each bad upload, and so what the page and API clients must be told
BAD_UPLOADS = {
    "empty.png": "empty.png is not an image PIL can read (the file is empty (0 bytes))",
    "bomb.png": "bomb.png is refused: it has 16000x12000 = 192,000,000 pixels",
}


@pytest.fixture(scope="module")
def expected(run):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch_ref.predict",
            "--workdir",
            str(run / "run"),
            "--json",
            str(run / "test0.png"),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["top"]


@pytest.fixture(scope="module")
def server(run):
    """The demo on a free port, its temporary files in a folder of its own; stopped with
    SIGTERM (as a service manager stops it), it exits 0 and leaves no example files there."""
    port = free_port()
    log = open(run / "demo.log", "w")
    tmp = run / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo", "--workdir", str(run / "run"), "--port", str(port)],
        env=dict(env(), TMPDIR=str(tmp)),
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (run / "demo.log").read_text()
                time.sleep(0.5)
        else:
            raise AssertionError("the demo did not answer in 120 s")
        yield url, port
    finally:
        proc.terminate()
        code = proc.wait(30)
        log.close()
    assert code == 0, (run / "demo.log").read_text()
    assert not list(tmp.glob("demo-examples-*")), "the example files outlived the demo"
    assert not os.path.exists(os.path.join(REPO, "demo", "app.pyi"))  # Gradio's, unasked for


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver = shutil.which("chromedriver")
    if not (driver and shutil.which("chromium")):
        if os.environ.get("CI"):
            raise AssertionError("chromium and chromium-driver are missing: run scripts/setup.sh")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_shows_predicts_top5_in_both_columns(run, expected, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    d = browser()
    try:
        d.get(url)
        wait = WebDriverWait(d, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        assert "best test accuracy" in d.find_element(By.TAG_NAME, "h2").text
        d.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(run / "test0.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        d.find_element(By.CSS_SELECTOR, "#classify").click()
        wait.until(lambda d: "largest logit" in d.find_element(By.CSS_SELECTOR, "#parity").text)
        d.save_screenshot(str(tmp_path / "demo.png"))
        for column in ("torch_ref", "flax_impl"):
            # the Label's text: its title, the top class, then (name, percentage) pairs
            lines = d.find_element(By.CSS_SELECTOR, f"#{column}").text.splitlines()
            assert lines[0] == column and lines[1] == expected[0]["name"], lines
            assert lines[2::2][:5] == [t["name"] for t in expected], lines
        parity = d.find_element(By.CSS_SELECTOR, "#parity").text
        gap = float(parity.split("flax_impl: ")[1].split(" ")[0])
        assert gap < 1e-4 and "top class: same" in parity  # float32 logits, ~1e-6 apart
        assert (tmp_path / "demo.png").stat().st_size > 10_000
        # a bad upload: the page shows predict's reason
        d.get(url)  # a fresh page
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        d.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(run / "empty.png"))
        d.find_element(By.CSS_SELECTOR, "#classify").click()
        says = BAD_UPLOADS["empty.png"]
        wait.until(lambda d: says in d.find_element(By.TAG_NAME, "body").text)
        d.save_screenshot(str(tmp_path / "bad-upload.png"))
    finally:
        d.quit()


def test_gradio_client_gets_the_same_top5(run, expected, server):
    from gradio_client import Client, handle_file

    url, _ = server
    torch_label, flax_label, parity = Client(url, verbose=False).predict(
        handle_file(str(run / "test0.png")), api_name="/predict"
    )
    for label in (torch_label, flax_label):
        assert [c["label"] for c in label["confidences"]] == [t["name"] for t in expected]
        for c, t in zip(label["confidences"], expected):
            assert abs(c["confidence"] - t["prob"]) < 1e-5  # softmax of float32 logits
    assert "top class: same" in parity


def test_a_bad_upload_is_explained_and_the_demo_keeps_serving(run, expected, server):
    """An empty file and a decompression bomb's header: the client gets predict's one-line
    reason (not Gradio's generic error), and the next request is answered."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(url, verbose=False)
    for name, says in BAD_UPLOADS.items():
        with pytest.raises(AppError) as err:
            client.predict(handle_file(str(run / name)), api_name="/predict")
        assert says in str(err.value), err.value
    torch_label, flax_label, _ = client.predict(
        handle_file(str(run / "test0.png")), api_name="/predict"
    )
    assert [c["label"] for c in torch_label["confidences"]] == [t["name"] for t in expected]


def test_a_sideways_phone_photo_gets_the_upright_images_answer(run, expected, server):
    """EXIF orientation 6: predict (both stacks) and the demo turn it upright, one rule, so
    all three give the upright PNG's top-5 (JPEG at quality 95 moves a pixel by a few levels,
    not the ranking of this image's classes)."""
    from gradio_client import Client, handle_file

    photo = str(run / "sideways.jpg")
    for stack in ("torch_ref", "flax_impl"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                f"{stack}.predict",
                "--workdir",
                str(run / "run"),
                "--json",
                photo,
            ],
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert [t["name"] for t in json.loads(proc.stdout)["top"]] == [t["name"] for t in expected]
    url, _ = server
    torch_label, flax_label, _ = Client(url, verbose=False).predict(
        handle_file(photo), api_name="/predict"
    )
    for label in (torch_label, flax_label):
        assert [c["label"] for c in label["confidences"]] == [t["name"] for t in expected]


def test_a_port_in_use_is_one_line(run, server):
    _, port = server
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--workdir", str(run / "run"), "--port", str(port)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"port {port} on 127.0.0.1 is in use" in proc.stderr
