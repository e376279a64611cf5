"""Remote backends against the project's own SageMaker-compatible server running the real handler on the
tiny model (boto3 over loopback, fake credentials), plus botocore's Stubber for service-side 5xx."""
import json
import time

import pytest
from PIL import Image

from eval.endpoints import (EndpointError, OpenAIBackend, SageMakerBackend, SSEDecoder, build_payload,
                            encode_image, parse_answer)
from eval.backends import open_backend
from eval.protocol import Request
from test_local_backend import make_adapter
from training.serving.server import EndpointServer, handler_with, load_server

pytestmark = pytest.mark.usefixtures("fake_aws")


@pytest.fixture(scope="module")
def model_dir(demo_model, tmp_path_factory):
    folder = make_adapter(demo_model, tmp_path_factory.mktemp("endpoint") / "model")
    (folder / "serving.json").write_text(json.dumps({"base": str(demo_model)}))
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    # split=5: every SSE event arrives cut across several PayloadParts, as on real endpoints
    srv = load_server(model_dir, port=0, names=("chartqa",), split=5).start()
    yield srv
    srv.shutdown()


def served(model, **overrides):
    return EndpointServer(model, handler_with(**overrides), port=0).start()


@pytest.fixture(scope="module")
def request_():
    return Request(Image.new("RGB", (80, 50), (200, 30, 30)), "what is the value of the highest bar", max_new_tokens=12)


def test_both_wire_formats_answer_like_the_local_backend(server, model_dir, demo_model, request_):
    expected = open_backend(f"local:{demo_model}+{model_dir}").generate([request_])
    for wire in ("seed", "openai"):
        backend = SageMakerBackend("chartqa", wire=wire, endpoint_url=server.url)
        assert backend.generate([request_]) == expected
        assert backend.generate([request_] * 3) == expected * 3


def test_stream_reassembles_events_split_across_payload_parts(server, model_dir, demo_model, request_):
    expected = open_backend(f"local:{demo_model}+{model_dir}").generate([request_])[0]
    for wire in ("seed", "openai"):
        pieces = list(SageMakerBackend("chartqa", wire=wire, endpoint_url=server.url).stream(request_))
        assert "".join(pieces) == expected


def test_unknown_endpoint_is_a_4xx_reported_once_without_retry(server, request_):
    backend = SageMakerBackend("nope", endpoint_url=server.url, retries=3)
    before = server.hits
    with pytest.raises(EndpointError, match="nope not found"):
        backend.generate([request_])
    assert server.hits - before == 1


def test_handler_failure_is_a_model_error_with_original_status(demo_model, request_):
    def broken(data, model):
        raise RuntimeError("CUDA out of memory")
    srv = served(None, predict_fn=broken)
    try:
        with pytest.raises(EndpointError, match=r"ModelError, original status 500.*CUDA out of memory"):
            SageMakerBackend("any", endpoint_url=srv.url).generate([request_])
        with pytest.raises(EndpointError, match="ModelError"):
            list(SageMakerBackend("any", endpoint_url=srv.url).stream(request_))
    finally:
        srv.shutdown()


def test_bad_request_comes_back_as_client_error_400(server):
    backend = SageMakerBackend("chartqa", endpoint_url=server.url)
    with pytest.raises(EndpointError, match=r"original status 400.*no question"):
        backend.generate([Request(None, "   ")])


def test_slow_handler_times_out_with_a_clear_message(request_):
    def slow(data, model):
        time.sleep(3)
        return {"wire": "seed", "text": "late", "model": "m", "created": 0}
    srv = served(None, predict_fn=slow)
    try:
        start = time.perf_counter()
        with pytest.raises(EndpointError, match="did not answer within 0.5 s"):
            SageMakerBackend("any", endpoint_url=srv.url, timeout=0.5).generate([request_])
        assert time.perf_counter() - start < 2.5, "a read timeout must not be retried"
    finally:
        srv.shutdown()


def test_error_mid_stream_is_reported_after_the_pieces_already_sent(request_):
    def failing(data, model):
        def pieces():
            yield "forty"
            yield " two"
            raise RuntimeError("device-side assert")
        return {"wire": data["wire"], "stream": pieces(), "model": "m", "created": 0}
    srv = served(None, predict_fn=failing)
    got = []
    try:
        with pytest.raises(EndpointError, match="mid-stream.*device-side assert"):
            for piece in SageMakerBackend("any", endpoint_url=srv.url).stream(request_):
                got.append(piece)
        assert "".join(got) == "forty two"
    finally:
        srv.shutdown()


def test_service_5xx_and_throttling_are_retried_then_succeed(request_):
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber
    import io

    client = boto3.client("sagemaker-runtime", region_name="us-east-1")
    body = json.dumps({"generated_text": " 42 "}).encode()
    with Stubber(client) as stub:
        stub.add_client_error("invoke_endpoint", "ServiceUnavailable", http_status_code=503)
        stub.add_client_error("invoke_endpoint", "ThrottlingException", http_status_code=400)
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body)),
                                              "ContentType": "application/json"})
        backend = SageMakerBackend("ep", client=client, retries=3, backoff=0.01)
        assert backend.generate([request_]) == ["42"]
        stub.assert_no_pending_responses()
    with Stubber(client) as stub:
        for _ in range(3):
            stub.add_client_error("invoke_endpoint", "InternalFailure", http_status_code=500)
        with pytest.raises(EndpointError, match="InternalFailure.*HTTP 500"):
            SageMakerBackend("ep", client=client, retries=2, backoff=0.01).generate([request_])


def test_openai_backend_generates_and_streams_against_v1_chat_completions(server, model_dir, demo_model, request_):
    expected = open_backend(f"local:{demo_model}+{model_dir}").generate([request_])[0]
    backend = OpenAIBackend(server.url + "/v1", "chartqa", api_key="sk-test-secret")
    assert backend.generate([request_]) == [expected]
    assert "".join(backend.stream(request_)) == expected
    assert "sk-test-secret" not in repr(backend)
    with pytest.raises(EndpointError, match="HTTP 400.*no question"):
        backend.generate([Request(None, "")])
    with pytest.raises(EndpointError, match="cannot reach"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout=2).generate([request_])


def test_sse_decoder_handles_any_chunking_and_both_styles():
    stream = ('data: {"choices": [{"delta": {"content": "Fünf"}}]}\r\n\r\n: keep-alive\n\n'
              'data: {"token": {"text": " hundred", "special": false}}\n\n'
              'data: {"token": {"text": "</s>", "special": true}}\n\ndata: [DONE]\n\ndata: {"token": {"text": "x"}}\n\n'
              ).encode()
    for size in (1, 2, 3, 7, len(stream)):
        decoder = SSEDecoder()
        pieces = [p for i in range(0, len(stream), size) for p in decoder.feed(stream[i:i + size])]
        assert "".join(pieces) == "Fünf hundred" and decoder.done


def test_response_shapes_seen_in_the_wild_are_parsed():
    assert parse_answer(b'{"choices": [{"message": {"content": " 12 "}}]}') == "12"
    assert parse_answer(b'[{"generated_text": "Asia"}]') == "Asia"
    assert parse_answer(b'{"generated_text": "yes"}') == "yes"
    assert parse_answer(b'{"answer": "3.5"}') == "3.5"
    with pytest.raises(EndpointError, match="unrecognised"):
        parse_answer(b'{"foo": 1}')


def test_large_images_are_reencoded_under_the_payload_limit():
    noisy = Image.effect_noise((1500, 1500), 90).convert("RGB")
    mime, data = encode_image(noisy, limit=300_000)
    assert mime == "image/jpeg" and len(data) <= 300_000
    small = encode_image(Image.new("RGB", (50, 50)))
    assert small[0] == "image/png"
    payload = build_payload(Request(noisy, "q"), "openai", limit=400_000)
    assert len(json.dumps(payload)) < 400_000
    assert payload["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_compare_streams_the_endpoint_and_the_local_model_side_by_side(server, model_dir, demo_model, request_,
                                                                        monkeypatch):
    """What the Compare tab does with `sagemaker:chartqa` on one side and the local model on the other; boto3
    finds the local server through AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME, as it would find any endpoint override."""
    from eval import compare

    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
    from eval.pool import ModelPool
    pool = ModelPool()
    refs = ["sagemaker:chartqa", f"local:{demo_model}+{model_dir}"]
    updates = list(compare.compare_stream(refs, request_, pool))
    endpoint, local = updates[-1]
    assert not endpoint.error and not local.error
    assert endpoint.text == local.text == pool.backend(refs[1]).generate([request_])[0]
    assert len(updates) > 2                          # token by token, not one final update


def test_an_endpoint_that_cannot_stream_yields_its_whole_answer_once(server, model_dir, demo_model, request_):
    expected = open_backend(f"local:{demo_model}+{model_dir}").generate([request_])[0]
    backend = SageMakerBackend("chartqa", endpoint_url=server.url, streams=False)
    assert backend.streams is False and OpenAIBackend(server.url + "/v1", "m").streams is True
    assert list(backend.stream(request_)) == [expected]


def _wire_recorder(seen):
    from training.serving import inference

    def input_fn(body, content_type="application/json"):
        data = inference.input_fn(body, content_type)
        seen.append(data["wire"])
        return data

    def predict_fn(data, model):
        return {"wire": data["wire"], "text": "42", "model": "m", "created": 0}
    return {"input_fn": input_fn, "predict_fn": predict_fn}


def test_eval_run_uses_the_recorded_wire_or_the_wire_flag(tmp_path, monkeypatch):
    from eval.__main__ import main
    from test_eval_run import make_chartqa

    seen = []
    srv = served(None, **_wire_recorder(seen))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", srv.url)
    data = make_chartqa(tmp_path / "chartqa", n=2)
    try:
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "endpoints.json").write_text(json.dumps([{"name": "vllm-ep", "wire": "openai",
                                                                     "streams": True}]))
        assert main(["run", "--data", str(data), "--model", "sagemaker:vllm-ep", "--out", str(tmp_path / "a"),
                     "--workspace", str(tmp_path / "ws"), "--quiet"]) == 0
        assert seen and set(seen) == {"openai"}
        seen.clear()
        assert main(["run", "--data", str(data), "--model", "sagemaker:elsewhere", "--out", str(tmp_path / "b"),
                     "--workspace", str(tmp_path / "ws"), "--wire", "openai", "--quiet"]) == 0
        assert seen and set(seen) == {"openai"}
    finally:
        srv.shutdown()
