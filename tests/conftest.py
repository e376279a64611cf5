"""Shared fixtures. Nothing here touches the network: the model is the shipped demo model (assets/demo-llava)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_model():
    """Path of the shipped demo model (assets/demo-llava), the one the studio starts on. Read-only: a test
    that writes next to the model copies it first; the session fails if any of its files changed."""
    from eval.demo import SHIPPED_MODEL, shipped_demo_model

    path = shipped_demo_model()
    assert path is not None, f"{SHIPPED_MODEL} is incomplete"

    def files():
        return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir())}

    before = files()
    yield path
    assert files() == before, f"a test wrote into the shipped model {path}"


# ---- a running studio and a real browser (Debian's chromium driven by Playwright) -------------------
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(workspace: Path, *args: str, log_path: Path | None = None, timeout: float = 240):
    """`python app.py` as a user starts it, on a free loopback port; returns (process, url) once it serves."""
    port = free_port()
    Path(workspace).mkdir(parents=True, exist_ok=True)
    log = open(log_path or Path(workspace) / "studio.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--workspace", str(workspace), *args],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("studio did not start:\n" + Path(log.name).read_text()[-4000:])
            time.sleep(0.5)


def wait_until(predicate, timeout: float, every: float = 0.3):
    """The first truthy value of predicate(), polled every `every` s; AssertionError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def wait_for_file(path: Path, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while not Path(path).exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:.0f} s")
        time.sleep(0.2)
    return Path(path)


def stop_studio(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.log.close()


@pytest.fixture(scope="session")
def studio_server(tmp_path_factory):
    """`python app.py` on the demo model, as a user starts it, in a fresh workspace. Yields (url, workspace)."""
    workspace = tmp_path_factory.mktemp("studio-workspace")
    proc, url = start_studio(workspace)
    wait_for_file(workspace / "datasets" / "demo" / "dataset.json")    # drawn in the background (app.py)
    yield url, workspace
    stop_studio(proc)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def studio_page(studio_server, browser):
    """A fresh browser page on the running studio; yields (page, workspace)."""
    url, workspace = studio_server
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("tab", name="Compare").wait_for()
    yield page, workspace
    context.close()


def wait_for_cell_text(page, text: str, timeout: int = 60_000) -> None:
    """A Dataframe cell holding `text`, in any row: its hidden <table> keeps the first rows of the value the
    page was built with, while the cells on screen are divs updated by events (page load included)."""
    page.wait_for_function("t => [...document.querySelectorAll('.cell-wrap')].some(x => x.textContent.includes(t))",
                           arg=text, timeout=timeout)


def wait_for_table_text(page, text: str, timeout: int = 60_000) -> None:
    """Gradio's Dataframe keeps cells in hidden wrappers: look at the tables' text, not visibility."""
    page.wait_for_function("t => [...document.querySelectorAll('table')].some(x => x.textContent.includes(t))",
                           arg=text, timeout=timeout)


# ---- AWS: fake credentials only, peers on loopback ------------------------------------------------
@pytest.fixture
def fake_aws(monkeypatch, tmp_path):
    """Fake credentials and no config files, so nothing can reach a real account."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="module")
def moto_url():
    """moto in server mode on 127.0.0.1 (S3, SageMaker control plane, CloudWatch Logs)."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
