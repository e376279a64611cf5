"""The hf-toolkit deploy target against its real contract: the packaged model.tar.gz driven by the
sagemaker-huggingface-inference-toolkit's handler service inside the real multi-model-server worker code
(MMS's model loader, frame decoding, Service.predict and create_predict_response), in a fresh
interpreter that has nothing of the repo on sys.path. Needs `pip install --no-deps -r requirements-toolkit.txt`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("sagemaker_huggingface_inference_toolkit",
                    reason="pip install --no-deps -r requirements-toolkit.txt")
pytest.importorskip("mms.service", reason="pip install --no-deps -r requirements-toolkit.txt")

from eval.endpoints import build_payload  # noqa: E402
from eval.backends import open_backend  # noqa: E402
from eval.protocol import Request  # noqa: E402
from test_local_backend import make_adapter  # noqa: E402
from training.serving.package import REQUIREMENTS, TARGETS, package, unpack  # noqa: E402

DRIVER = Path(__file__).with_name("toolkit_mms_driver.py")


@pytest.fixture(scope="module")
def served(demo_model, tmp_path_factory):
    """(model_dir, adapter, request, results of the cases below, module facts)."""
    root = tmp_path_factory.mktemp("toolkit")
    adapter = make_adapter(demo_model, root / "adapter")
    model_dir = unpack(package(adapter, str(demo_model), root / "model.tar.gz"), root / "opt-ml-model")
    request = Request(Image.new("RGB", (80, 50), (200, 30, 30)), "what is the value of the highest bar",
                      max_new_tokens=12)
    seed, openai = build_payload(request, "seed"), build_payload(request, "openai")
    cases = [
        {"body": json.dumps(seed), "accept": "application/json"},
        {"body": json.dumps(seed), "accept": "text/plain"},
        {"body": json.dumps(openai)},                                       # no Accept: the toolkit's JSON
        {"body": json.dumps({**seed, "stream": True}), "accept": "text/event-stream"},
        {"body": json.dumps({**seed, "stream": True}), "accept": "text/event-stream", "env": {"STUDIO_STREAMING": "1"}},
        {"body": json.dumps({"question": ""}), "accept": "application/json", "env": {"STUDIO_STREAMING": "0"}},
        {"body": json.dumps(seed), "accept": "image/png"},
        {"body": json.dumps({**seed, "image": "file:///etc/passwd"}), "accept": "application/json"},
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    # The container's environment, as deploy sets it; MMS_DECODE_INPUT_REQUEST=false as the toolkit's
    # MMS config (sagemaker_inference/etc/default-mms.properties: decode_input_request=false) makes it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TARGETS["hf-toolkit"]["environment"], MMS_DECODE_INPUT_REQUEST="false")
    done = subprocess.run([sys.executable, str(DRIVER), str(model_dir), str(root / "cases.json")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return model_dir, adapter, request, out["results"], out["modules"]


def test_toolkit_imports_the_handler_and_its_eval_copy_from_code(served):
    model_dir, _, _, _, modules = served
    assert modules["inference"] == str(model_dir / "code" / "inference.py")
    assert modules["eval.local"] == str(model_dir / "code" / "eval" / "local.py")
    assert not modules["training_imported"]


def test_toolkit_answers_json_and_plain_text_as_accept_asks(served, demo_model):
    _, adapter, request, results, _ = served
    expected = open_backend(f"local:{demo_model}+{adapter}").generate([request])[0]
    as_json, as_text, openai = results[:3]
    assert (as_json["code"], as_json["status"], as_json["content_type"]) == (200, 200, "application/json")
    assert json.loads(as_json["body"])["answer"] == expected
    assert (as_text["status"], as_text["content_type"], as_text["body"]) == (200, "text/plain", expected)
    assert openai["content_type"] == "application/json"
    assert json.loads(openai["body"])["choices"][0]["message"]["content"] == expected


def test_a_stream_request_gets_one_whole_sse_body_not_a_503(served, demo_model):
    _, adapter, request, results, modules = served
    expected = open_backend(f"local:{demo_model}+{adapter}").generate([request])[0]
    whole = results[3]
    assert (whole["code"], whole["content_type"]) == (200, "text/event-stream")
    events = [e for e in whole["body"].split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["token"]["text"] for e in events[:-1]) == expected
    # Why streaming is off there: a generator from output_fn is MMS's 503, in the request and directly.
    assert results[4]["code"] == 503 and "Unsupported model output data type" in results[4]["message"]
    assert modules["generator_reply"]["code"] == 503


def test_bad_requests_are_400s_with_the_handlers_reason(served):
    results = served[3]
    no_question, bad_accept, file_url = results[5:8]
    assert no_question["code"] == 400 and "no question" in no_question["message"]
    assert bad_accept["code"] == 400 and "Accept 'image/png' is not supported" in bad_accept["message"]
    assert file_url["code"] == 400 and "scheme 'file' is refused" in file_url["message"]


def test_pinned_requirements_keep_transformers_below_5():
    pins = dict(line.split("==") for line in REQUIREMENTS.splitlines() if "==" in line)
    assert int(pins["transformers"].split(".")[0]) == 4, "the toolkit imports transformers.file_utils names 5.x dropped"
    assert {"peft", "accelerate", "bitsandbytes"} <= pins.keys()


def test_toolkit_target_environment_raises_the_model_server_timeouts():
    env = TARGETS["hf-toolkit"]["environment"]
    assert int(env["SAGEMAKER_MODEL_SERVER_TIMEOUT"]) >= 600 and int(env["SAGEMAKER_STARTUP_TIMEOUT"]) >= 600
    assert env["SAGEMAKER_PROGRAM"] == "inference.py" and env["STUDIO_STREAMING"] == "0"
