"""Attacks on a running studio, through its own API (gradio_client), as anyone who can reach the port could
try them: no file outside the workspace is read or written, no image bomb reaches a decoder, no server temp
path shows in a message, no secret reaches a training job."""
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from charts.io import inside

ROOT = Path(__file__).resolve().parents[2]
SECRET = ROOT / "requirements.txt"         # inside the server's working directory, which gradio may serve


# ---------------------------------------------------------------- the path rule itself
def test_inside_takes_relative_paths_from_the_root_and_keeps_absolute_ones_under_it(tmp_path):
    assert inside(tmp_path, "configs/run.yaml") == tmp_path.resolve() / "configs" / "run.yaml"
    assert inside(tmp_path, str(tmp_path / "x.yaml")) == tmp_path.resolve() / "x.yaml"


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.yaml", "configs/../../x.yaml", "configs/../run.yaml", "",
                                 "  ", "a\x00b"])
def test_inside_refuses_every_way_out_with_one_line(tmp_path, bad):
    with pytest.raises(ValueError) as e:
        inside(tmp_path / "ws", bad)
    assert "\n" not in str(e.value)


def test_inside_follows_symlinks_before_deciding(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "link").symlink_to(ROOT)
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "ws", "link/requirements.txt")


# ---------------------------------------------------------------- a running studio
def _records(image: str, n: int = 1) -> str:
    conv = [{"from": "human", "value": "<image>\nWhat is the value?"}, {"from": "gpt", "value": "3"}]
    return "".join(json.dumps({"id": f"q{i}", "image": image, "conversations": conv, "chart_type": "bar"}) + "\n"
                   for i in range(n))


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "white" if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def studio(demo_model, tmp_path_factory):
    """`python app.py` on the demo model with a workspace holding an honest dataset and two whose records
    point at files outside their folder; a dataset and a YAML file outside the workspace. Yields a dict."""
    from conftest import start_studio, stop_studio

    top = tmp_path_factory.mktemp("security")
    ws, outside = top / "workspace", top / "outside"
    honest = ws / "datasets" / "honest"
    (honest / "images").mkdir(parents=True)
    (honest / "images" / "c.png").write_bytes(_png((64, 48)))
    (honest / "test.jsonl").write_text(_records("images/c.png"))
    for name, image in (("absolute", str(SECRET)), ("dotdot", os.path.relpath(SECRET, ws / "datasets" / "dotdot"))):
        (ws / "datasets" / name).mkdir(parents=True)
        (ws / "datasets" / name / "test.jsonl").write_text(_records(image))
    (outside / "images").mkdir(parents=True)
    (outside / "images" / "c.png").write_bytes(_png((64, 48)))
    (outside / "test.jsonl").write_text(_records("images/c.png"))
    (outside / "evil.yaml").write_text("model: from-outside-the-workspace\n")
    proc, url = start_studio(ws, "--base", str(demo_model), log_path=top / "studio.log", timeout=180)
    from gradio_client import Client
    yield {"client": Client(url, verbose=False), "ws": ws, "outside": outside, "pid": proc.pid, "top": top,
           "base": f"local:{demo_model}"}
    stop_studio(proc)


def _call(client, *args, api_name):
    """The endpoint's outputs as one string, or the error the browser would show."""
    from gradio_client.exceptions import AppError
    try:
        out = client.predict(*args, api_name=api_name)
    except AppError as e:
        return None, str(e)
    return out, " ".join(map(str, out if isinstance(out, (list, tuple)) else [out]))


def _sent_file(out) -> Path | None:
    """The file an endpoint's first output sent to the browser (None for 'no change' or nothing)."""
    first = out[0] if out else None
    return Path(first) if isinstance(first, str) and Path(first).is_file() else None


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---------------------------------------------------------------- Fine-tune: Save / Load YAML
def test_save_yaml_writes_nowhere_outside_the_workspace(studio):
    client, ws, outside = studio["client"], studio["ws"], studio["outside"]
    targets = [outside / "written.yaml", "../outside/written2.yaml", "configs/../../outside/written3.yaml",
               ws / "jobs.jsonl"]
    for target in targets:
        _, text = _call(client, str(target), api_name="/save_yaml")
        assert "not saved" in text, target
    assert not list(outside.glob("written*")) and not (ws / "jobs.jsonl").exists()
    _, text = _call(client, "configs/mine.yaml", api_name="/save_yaml")
    assert "saved" in text and "model:" in (ws / "configs" / "mine.yaml").read_text()


def test_load_yaml_reads_no_file_outside_the_workspace(studio):
    client, outside = studio["client"], studio["outside"]
    for source in (outside / "evil.yaml", "../outside/evil.yaml"):
        out, text = _call(client, str(source), api_name="/load_yaml")
        assert out is None and "not loaded" in text, source
        assert "from-outside-the-workspace" not in text
    assert _call(client, "configs/mine.yaml", api_name="/load_yaml")[0] is not None


# ---------------------------------------------------------------- Compare / Charts: random example
@pytest.mark.parametrize("name", ["absolute", "dotdot"])
def test_a_random_example_never_sends_a_file_from_outside_its_dataset(studio, name):
    for api in ("/random_example", "/on_random"):
        out, text = _call(studio["client"], name, api_name=api)
        sent = _sent_file(out)
        assert not (sent and sent.read_bytes() == SECRET.read_bytes()), api
        assert "image inside" in text, (api, text)


def test_a_random_example_comes_only_from_a_workspace_dataset_by_name(studio):
    client, outside = studio["client"], studio["outside"]
    for name in (str(outside), "../../outside", str(ROOT)):
        out, text = _call(client, name, api_name="/random_example")
        assert "cannot draw an example" in text and _sent_file(out) is None, name
    out, _ = _call(client, "honest", api_name="/random_example")
    assert Image.open(_sent_file(out)).size == (64, 48)


# ---------------------------------------------------------------- Compare: uploads and image bombs
def _compare(studio, image_path: Path):
    from gradio_client import handle_file
    ref = "local:" + str(studio["ws"].parent / "none")     # never reached: the image is refused first
    return _call(studio["client"], handle_file(str(image_path)), "What is the value?", ref, ref, "local", "local",
                 4, 0.0, api_name="/run_compare")


def test_an_honest_upload_still_reaches_both_models(studio):
    from gradio_client import handle_file
    chart = studio["top"] / "honest.png"
    Image.new("RGB", (320, 200), (40, 90, 200)).save(chart)
    out, text = _call(studio["client"], handle_file(str(chart)), "What is the value?", studio["base"], studio["base"],
                      "local", "local", 3, 0.0, api_name="/run_compare")
    assert out is not None and out[0] and out[3] and "**" not in out[2], text


def test_an_upload_sent_as_base64_reaches_the_loader_as_the_same_bytes():
    import base64

    from gradio.data_classes import ImageData

    from studio.uploads import ChartImage
    data = _png((30, 20), "L")
    path = ChartImage().preprocess(ImageData(url="data:image/png;base64," + base64.b64encode(data).decode()))
    assert Path(path).read_bytes() == data


def test_a_long_thin_png_bomb_is_refused_before_it_is_padded_square(studio):
    bomb = studio["top"] / "thin.png"
    bomb.write_bytes(_png((20_000, 10), "L"))
    assert bomb.stat().st_size < 2_000
    before = _peak_rss_mb(studio["pid"])
    _, text = _compare(studio, bomb)
    assert "each side may be at most" in text
    assert _peak_rss_mb(studio["pid"]) - before < 300


def test_a_non_rgb_bomb_under_pils_limit_is_never_decoded_by_the_upload(studio):
    bomb = studio["top"] / "bomb.png"
    bomb.write_bytes(_png((12_000, 12_000), "1"))        # 144 MP: under PIL's own 179 MP refusal
    before = _peak_rss_mb(studio["pid"])
    t0 = time.time()
    _, text = _compare(studio, bomb)
    assert "each side may be at most" in text
    assert _peak_rss_mb(studio["pid"]) - before < 300 and time.time() - t0 < 20


def test_a_file_that_is_not_an_image_is_refused_without_showing_server_paths(studio):
    fake = studio["top"] / "chart.png"
    fake.write_text("not a png at all")
    _, text = _compare(studio, fake)
    assert "not an image" in text
    assert tempfile.gettempdir() + "/" not in text and "gradio" not in text.lower()


# ---------------------------------------------------------------- Charts: validate; Benchmark: dataset path
def test_validate_reads_no_path_outside_the_workspace(studio):
    for path in (str(SECRET), str(studio["outside"]), "../outside"):
        out, text = _call(studio["client"], path, "honest", api_name="/on_validate")
        assert out is None and ("outside" in text or "'..'" in text), path
    out, text = _call(studio["client"], "datasets/honest", "honest", api_name="/on_validate")
    assert out is not None


def test_a_benchmark_on_a_dataset_outside_the_workspace_is_refused(studio):
    out, text = _call(studio["client"], str(studio["outside"]), "test", 1, "", [studio["base"]], "", 4,
                      api_name="/benchmark_run")
    assert out is None and "outside" in text
    assert not (studio["ws"] / "evals").exists()


def test_the_benchmark_browser_opens_only_the_workspaces_eval_runs(studio):
    outside = str(studio["outside"])
    for api, args in (("/_select_eval", (outside,)), ("/_browse", (outside, None, "all")),
                      ("/benchmark_export", (outside,))):
        out, text = _call(studio["client"], *args, api_name=api)
        assert out is None and "not in the list of choices" in text, api


# ---------------------------------------------------------------- secrets: a training job's environment
def test_a_local_training_job_inherits_no_login_and_no_cloud_secrets(tmp_path, monkeypatch, fake_aws):
    from training import launchers
    from training.config import preset

    monkeypatch.setenv("STUDIO_AUTH", "alice:s3cret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    seen = {}

    class FakePopen:
        pid = 2 ** 22 + 1

        def __init__(self, cmd, **kwargs):
            seen.update(kwargs)

        def poll(self):
            return None

    monkeypatch.setattr(launchers.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launchers, "_CHILDREN", {})
    launchers.LocalLauncher(tmp_path).start(preset("demo-cpu", model=str(tmp_path / "m"), data=str(tmp_path / "d")))
    env = seen["env"]
    for secret in ("STUDIO_AUTH", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert secret not in env, secret
    assert env["PATH"] == os.environ["PATH"] and str(launchers.REPO) in env["PYTHONPATH"]
