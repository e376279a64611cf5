"""The endpoint handler, the local server's container contract, and model.tar.gz packaging."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

from eval.endpoints import build_payload
from eval.backends import open_backend
from eval.protocol import Request
from test_local_backend import make_adapter
from training.serving import inference
from training.serving.package import package, unpack
from training.serving.server import EndpointServer, event_message


@pytest.fixture(scope="module")
def adapter(demo_model, tmp_path_factory):
    return make_adapter(demo_model, tmp_path_factory.mktemp("serving") / "adapter")


@pytest.fixture(scope="module")
def model_dir(adapter, demo_model, tmp_path_factory):
    return unpack(package(adapter, str(demo_model), tmp_path_factory.mktemp("pkg") / "model.tar.gz"),
                  tmp_path_factory.mktemp("unpacked"))


@pytest.fixture(scope="module")
def request_():
    return Request(Image.new("RGB", (80, 50), (200, 30, 30)), "what is the value of the highest bar", max_new_tokens=12)


def post(url, payload):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_package_holds_adapter_serving_json_and_a_self_contained_handler(model_dir, demo_model):
    names = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "serving.json", "code/inference.py",
            "code/requirements.txt", "code/eval/local.py", "code/eval/images.py", "code/eval/protocol.py"} <= names
    assert json.loads((model_dir / "serving.json").read_text())["base"] == str(demo_model)


def test_packaged_handler_imports_and_answers_without_the_repo(model_dir, adapter, demo_model, request_):
    expected = open_backend(f"local:{demo_model}+{adapter}").generate([request_])[0]
    payload = json.dumps(build_payload(request_, "seed"))
    script = (
        "import json, sys, inference, eval.local\n"
        "assert inference.__file__.startswith(sys.argv[1]) and eval.local.__file__.startswith(sys.argv[1])\n"
        "assert 'training' not in sys.modules\n"
        "model = inference.model_fn(sys.argv[2])\n"
        "data = inference.input_fn(sys.stdin.read(), 'application/json')\n"
        "print(inference.output_fn(inference.predict_fn(data, model), 'application/json'))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = model_dir / "code"
    done = subprocess.run([sys.executable, "-c", script, str(code), str(model_dir)], input=payload, cwd=code,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["answer"] == expected


def test_one_endpoint_answers_with_adapter_or_base(model_dir, adapter, demo_model, request_):
    model = inference.model_fn(model_dir)
    tuned = open_backend(f"local:{demo_model}+{adapter}").generate([request_])[0]
    base = open_backend(f"local:{demo_model}").generate([request_])[0]
    assert tuned != base
    for payload, expected in ((build_payload(request_, "seed"), tuned),
                              ({**build_payload(request_, "seed"), "adapter": False}, base),
                              ({**build_payload(request_, "openai"), "model": "base"}, base)):
        out = json.loads(inference.output_fn(inference.predict_fn(inference.input_fn(json.dumps(payload)), model)))
        text = out.get("answer") or out["choices"][0]["message"]["content"]
        assert text == expected


@pytest.mark.parametrize("body, message", [
    ("{not json", "not valid JSON"),
    ('{"question": ""}', "no question"),
    ('{"question": "q", "image": "@@@notbase64"}', "image"),
    ('{"question": "q", "max_new_tokens": 100000}', "max_new_tokens must be between"),
    (json.dumps({"question": "x" * 20000}), "limit is 4000"),
])
def test_bad_requests_are_refused_with_a_reason(body, message):
    with pytest.raises(inference.BadRequest, match=message):
        inference.input_fn(body, "application/json")


def test_container_contract_ping_invocations_and_sse_stream(model_dir, adapter, demo_model, request_):
    server = EndpointServer(inference.model_fn(model_dir), inference, port=0).start()
    try:
        with urllib.request.urlopen(server.url + "/ping", timeout=5) as r:
            assert r.status == 200
        expected = open_backend(f"local:{demo_model}+{adapter}").generate([request_])[0]
        status, body = post(server.url + "/invocations", build_payload(request_, "openai"))
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == expected
        status, body = post(server.url + "/invocations", build_payload(request_, "seed", stream=True))
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert "".join(json.loads(e[6:])["token"]["text"] for e in events[:-1]) == expected
        status, body = post(server.url + "/invocations", {"question": ""})
        assert status == 400 and b"no question" in body
    finally:
        server.shutdown()


def test_event_stream_framing_decodes_with_botocore():
    from botocore.eventstream import EventStreamBuffer
    buffer = EventStreamBuffer()
    message = event_message({":event-type": "PayloadPart", ":message-type": "event"}, b"data: hi\n\n")
    buffer.add_data(message[:7])
    buffer.add_data(message[7:])
    decoded = next(iter(buffer))
    assert decoded.headers[":event-type"] == "PayloadPart" and decoded.payload == b"data: hi\n\n"


# ---- the byoc target: the image's `serve` entrypoint, run as SageMaker runs it ----
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def byoc(model_dir, tmp_path_factory):
    """`serve` (training/serving/serve, the file the Dockerfile copies to /usr/local/bin) started the way
    SageMaker starts the container, with /opt/ml/model replaced by the unpacked model.tar.gz."""
    from conftest import free_port
    port, log = free_port(), tmp_path_factory.mktemp("byoc") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SM_MODEL_DIR=str(model_dir), SAGEMAKER_BIND_TO_PORT=str(port), SERVE_HOST="127.0.0.1",
               STUDIO_CODE_DIR=str(ROOT))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "training/serving/serve"), "serve"], env=env,
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                assert r.status == 200
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("serve did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _runtime(url):
    import boto3
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_byoc_entrypoint_answers_boto3_invoke_endpoint(byoc, adapter, demo_model, request_):
    expected = open_backend(f"local:{demo_model}+{adapter}").generate([request_])[0]
    response = _runtime(byoc).invoke_endpoint(EndpointName="chartqa-r1", Body=json.dumps(build_payload(request_, "seed")),
                                              ContentType="application/json", Accept="application/json")
    assert json.loads(response["Body"].read())["answer"] == expected
    assert response["ContentType"] == "application/json" and response["InvokedProductionVariant"] == "AllTraffic"


def test_byoc_entrypoint_streams_through_invoke_endpoint_with_response_stream(byoc, adapter, demo_model, request_):
    from eval.endpoints import SSEDecoder
    expected = open_backend(f"local:{demo_model}+{adapter}").generate([request_])[0]
    response = _runtime(byoc).invoke_endpoint_with_response_stream(
        EndpointName="chartqa-r1", Body=json.dumps(build_payload(request_, "openai", stream=True)),
        ContentType="application/json", Accept="text/event-stream")
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["ContentType"] == "text/event-stream"
    decoder, parts, pieces = SSEDecoder(), 0, []
    for event in response["Body"]:                  # botocore's EventStream of PayloadPart events
        parts += 1
        pieces += decoder.feed(event["PayloadPart"]["Bytes"])
    assert decoder.done and "".join(pieces).strip() == expected
    assert parts == decoder.events, "one PayloadPart per event: sent as generated, not at the end"


def test_byoc_container_invocations_stream_chunked_as_sagemaker_reads_them(byoc, request_):
    import http.client
    host, port = byoc.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/invocations", json.dumps(build_payload(request_, "seed", stream=True)),
                 {"Content-Type": "application/json", "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Type") == "text/event-stream"
    assert response.read().decode().rstrip().endswith("data: [DONE]")
    conn.close()


def test_image_url_that_fails_is_a_400_not_a_dropped_connection(byoc, request_):
    status, body = post(byoc + "/invocations", {"question": "q", "image": byoc + "/no-such-image.png"})
    assert status == 400 and b"HTTP 404" in body


def test_output_follows_accept_and_never_hands_mms_a_generator(monkeypatch):
    def prediction(stream):
        base = {"wire": "seed", "model": "m", "created": 0}
        return {**base, "stream": iter(["4", "2"])} if stream else {**base, "text": "42"}
    assert json.loads(inference.output_fn(prediction(False), "application/json"))["answer"] == "42"
    assert inference.output_fn(prediction(False), "text/plain") == "42"
    assert inference.output_fn(prediction(True), "application/json") == json.dumps({"answer": "42", "generated_text": "42"})
    assert not isinstance(inference.output_fn(prediction(True), "text/event-stream"), (bytes, str))   # streams here
    monkeypatch.setenv("STUDIO_STREAMING", "0")                       # the hf-toolkit target
    whole = inference.output_fn(prediction(True), "text/event-stream")
    assert isinstance(whole, bytes) and whole.endswith(b"data: [DONE]\n\n") and b'"text": "42"' in whole
    with pytest.raises(inference.BadRequest, match="Accept 'image/png' is not supported"):
        inference.output_fn(prediction(False), "image/png")
