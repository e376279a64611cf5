"""`python app.py`: loopback by default, a login whenever it listens elsewhere, models resolved up front."""
import subprocess
import sys
from pathlib import Path

import pytest

import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.5", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                            ("studio.example", False)])
def test_only_loopback_addresses_count_as_private(host, loopback):
    assert app.is_loopback(host) is loopback


def test_defaults_bind_loopback_on_the_demo_model():
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.base == app.DEMO and args.port == 7860


def test_the_compile_flag_reaches_the_engine_the_tabs_share(demo_model, tmp_path):
    from studio.context import Studio
    studio = Studio(tmp_path, str(demo_model), compile=app.COMPILE[app.parse_args(["--compile", "off"]).compile])
    backend = studio.pool.backend(f"local:{demo_model}", **studio.local_options())
    assert backend.engine.compile is False and not backend.engine.generator.use_compile
    assert studio.pool.backend(f"local:{demo_model}", **studio.backend_options()["local"]).engine is backend.engine


def test_auth_must_be_user_colon_password():
    assert app.parse_auth("alice:s3cret:with:colons") == ("alice", "s3cret:with:colons")
    assert app.parse_auth(None) is None
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(SystemExit):
            app.parse_auth(bad)


def test_listening_on_all_interfaces_without_a_login_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--workspace", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode != 0 and "without a login" in out.stderr
    assert not (tmp_path / "models").exists()          # refused before building anything


def test_a_real_base_is_used_as_given_without_building_the_demo(tmp_path):
    assert app.prepare_models(tmp_path, "llava-hf/llava-1.5-7b-hf", None) == ("llava-hf/llava-1.5-7b-hf", None)
    assert not (tmp_path / "models").exists()


def test_a_password_on_the_command_line_is_refused_saying_what_to_use(tmp_path):
    out = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--auth", "alice:s3cret",
                          "--workspace", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode != 0 and "--auth-file" in out.stderr and "STUDIO_AUTH" in out.stderr
    assert "s3cret" not in out.stderr + out.stdout
    assert not (tmp_path / "models").exists()


def test_the_login_is_read_from_a_file_or_the_environment(tmp_path):
    login = tmp_path / "login"
    login.write_text("alice:s3cret:x\n")
    assert app.read_auth(app.parse_args(["--auth-file", str(login)]), env={}) == ("alice", "s3cret:x")
    assert app.read_auth(app.parse_args([]), env={"STUDIO_AUTH": "bob:pw"}) == ("bob", "pw")
    assert app.read_auth(app.parse_args([]), env={}) is None
    with pytest.raises(SystemExit, match="cannot read"):
        app.read_auth(app.parse_args(["--auth-file", str(tmp_path / "missing")]), env={})


def test_a_studio_started_with_an_auth_file_asks_for_that_login(demo_model, tmp_path):
    from gradio_client import Client

    from conftest import start_studio, stop_studio

    login = tmp_path / "login"
    login.write_text("alice:long-password\n")
    proc, url = start_studio(tmp_path / "ws", "--base", str(demo_model), "--auth-file", str(login), timeout=120)
    try:
        assert "long-password" not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        with pytest.raises(Exception):
            Client(url, verbose=False)
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong"), verbose=False)
        assert Client(url, auth=("alice", "long-password"), verbose=False).view_api(print_info=False, return_format="dict")
    finally:
        stop_studio(proc)


def test_the_demo_starts_on_the_shipped_model_and_adapter_without_training(tmp_path, demo_model):
    from eval.demo import SHIPPED_ADAPTER
    base, adapter = app.prepare_models(tmp_path, app.DEMO, None)
    assert Path(base) == tmp_path / "models" / "demo-llava" and Path(base).resolve() == demo_model.resolve()
    assert Path(adapter) == tmp_path / "runs" / "demo-adapter" / "adapter"
    assert (Path(adapter) / "adapter_model.safetensors").read_bytes() == \
        (SHIPPED_ADAPTER / "adapter_model.safetensors").read_bytes()
    assert not (Path(adapter).parent / "checkpoints").exists()          # copied, not trained
    assert not (tmp_path / "datasets" / "demo" / "dataset.json").exists()     # drawn in the background (test_startup)
    assert app.prepare_models(tmp_path, app.DEMO, "/my/adapter") == (base, "/my/adapter")
