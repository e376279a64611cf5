"""Remote models that answer badly, and secrets that must stay with their host: misbehaving servers on
loopback (stdlib), the project's SageMaker-compatible server with a replaced handler, fake AWS only."""
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from eval.backends import open_backend
from eval.endpoints import EndpointError, OpenAIBackend, SageMakerBackend, SSEDecoder
from eval.protocol import Request
from training.serving import inference
from training.serving.server import EndpointServer, handler_with

REQUEST = Request(Image.new("RGB", (32, 32), "white"), "what is the highest value", max_new_tokens=8)


class Scripted(BaseHTTPRequestHandler):
    """Answers every POST with the server's `reply` (status, content type, list of body chunks, pause
    between chunks) and records the request headers."""
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.do_POST()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        status, content_type, chunks, pause, headers = self.server.reply(self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def scripted():
    """A server whose answer the test sets: `srv.reply = lambda path: (status, type, chunks, pause, headers)`."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.daemon_threads = True
    srv.seen = []
    srv.reply = lambda path: (200, "application/json", [b"{}"], 0, {})
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def answer(srv, status, content_type, *chunks, pause=0.0, headers=None):
    srv.reply = lambda path: (status, content_type, [c.encode() if isinstance(c, str) else c for c in chunks],
                              pause, headers or {})


# ---- bodies that are not answers ----
def test_an_html_200_page_is_an_error_not_an_answer(scripted):
    answer(scripted, 200, "text/html", "<html><body>Gateway says hi</body></html>")
    with pytest.raises(EndpointError, match=r"not JSON \(text/html\).*Gateway says hi"):
        OpenAIBackend(scripted.url + "/v1", "m").generate([REQUEST])


def test_a_plain_text_200_body_from_sagemaker_is_an_error(fake_aws):
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    client = boto3.client("sagemaker-runtime", region_name="us-east-1")
    body = b"Service temporarily unavailable"
    with Stubber(client) as stub:
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body)),
                                              "ContentType": "text/plain"})
        with pytest.raises(EndpointError, match=r"endpoint ep: .*not JSON \(text/plain\)"):
            SageMakerBackend("ep", client=client).generate([REQUEST])


def test_non_json_sse_lines_are_refused_not_appended(scripted):
    answer(scripted, 200, "text/event-stream", 'data: {"choices": [{"delta": {"content": "4"}}]}\n\n',
           "data: <b>proxy banner</b>\n\n", "data: [DONE]\n\n")
    with pytest.raises(EndpointError, match="not JSON.*proxy banner"):
        "".join(OpenAIBackend(scripted.url + "/v1", "m").stream(REQUEST))


@pytest.mark.parametrize("event", ['{"choices": ["x"]}', '{"choices": [{"delta": "x"}]}', '{"token": "x"}',
                                   '[1, 2]', '{"choices": [{"delta": {"content": 5}}]}', '{"foo": 1}'])
def test_malformed_sse_gives_a_clear_message_not_an_attribute_error(event):
    with pytest.raises(EndpointError, match="malformed stream event"):
        SSEDecoder().feed(f"data: {event}\n\n".encode())


def test_a_stream_answered_without_sse_is_read_whole_or_refused(scripted):
    backend = OpenAIBackend(scripted.url + "/v1", "m")
    answer(scripted, 200, "application/json", '{"choices": [{"message": {"content": " 42 "}}]}')
    assert list(backend.stream(REQUEST)) == ["42"]          # the server ignored "stream": the whole answer
    answer(scripted, 200, "text/event-stream", "")
    with pytest.raises(EndpointError, match="without sending any event"):
        list(backend.stream(REQUEST))
    answer(scripted, 200, "text/html", "<html>login</html>")
    with pytest.raises(EndpointError, match="no server-sent events.*login"):
        list(backend.stream(REQUEST))


def test_a_sagemaker_stream_answered_whole_is_not_an_empty_answer(fake_aws):
    def predict_fn(data, model):
        return {"wire": "seed", "text": "7", "model": "m", "created": 0}
    srv = EndpointServer(None, handler_with(predict_fn=predict_fn, output_fn=lambda p, a: '{"generated_text": "7"}'),
                         port=0).start()
    try:
        assert list(SageMakerBackend("any", endpoint_url=srv.url).stream(REQUEST)) == ["7"]
    finally:
        srv.shutdown()


def test_an_endpoint_trickling_tokens_is_cut_off_at_the_overall_deadline(scripted):
    event = 'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    answer(scripted, 200, "text/event-stream", *[event] * 200, pause=0.05)
    backend = OpenAIBackend(scripted.url + "/v1", "m", timeout=5, stream_limit_s=0.5)
    start, got = time.monotonic(), []
    with pytest.raises(EndpointError, match="still sending after 0.5 s"):
        for piece in backend.stream(REQUEST):
            got.append(piece)
    assert time.monotonic() - start < 3 and got                  # what came before the cut was shown
    answer(scripted, 200, "application/json", '{"choices": [{"message": ', *['{"content": "x"}'[i:i + 1]
                                                                        for i in range(16)], "}]}", pause=0.1)
    with pytest.raises(EndpointError, match="still sending after 0.5 s"):
        backend.generate([REQUEST])


# ---- secrets and schemes ----
def test_openai_key_goes_only_to_the_origin_it_was_configured_for(scripted, monkeypatch):
    from eval.endpoints import api_key_for
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-secret")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    answer(scripted, 200, "application/json", '{"choices": [{"message": {"content": "1"}}]}')
    OpenAIBackend(scripted.url + "/v1", "m").generate([REQUEST])           # typed URL, not api.openai.com
    monkeypatch.setenv("OPENAI_BASE_URL", scripted.url + "/v1")
    OpenAIBackend(scripted.url + "/v1", "m").generate([REQUEST])           # the configured server
    monkeypatch.setenv("OTHER_KEY", "sk-other")
    open_backend(f"openai:{scripted.url.replace('127.0.0.1', 'localhost')}/v1#m",
                 api_key_env="OTHER_KEY").generate([REQUEST])              # a key named for this ref
    assert [s["authorization"] for s in scripted.seen] == [None, "Bearer sk-real-secret", "Bearer sk-other"]
    assert api_key_for("https://api.openai.com/v1", env={"OPENAI_API_KEY": "k"}) == "k"
    assert api_key_for("http://api.openai.com/v1", env={"OPENAI_API_KEY": "k"}) is None     # not over http
    assert api_key_for("https://api.openai.com.evil.test/v1", env={"OPENAI_API_KEY": "k"}) is None


def test_a_redirect_is_not_followed_so_the_key_cannot_travel(scripted, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-secret")
    monkeypatch.setenv("OPENAI_BASE_URL", scripted.url + "/v1")
    answer(scripted, 302, "text/plain", "", headers={"Location": "http://localhost:9/steal"})
    with pytest.raises(EndpointError, match="redirected \\(302\\).*not followed"):
        OpenAIBackend(scripted.url + "/v1", "m").generate([REQUEST])
    assert len(scripted.seen) == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://h/", "/etc/passwd"])
def test_non_http_openai_base_urls_are_refused(url):
    with pytest.raises(ValueError, match="only http:// and https://"):
        open_backend(f"openai:{url}#m")


@pytest.mark.parametrize("image, message", [
    ("file:///etc/passwd", "scheme 'file' is refused"),
    ("ftp://127.0.0.1/chart.png", "scheme 'ftp' is refused"),
    ("http://169.254.169.254/latest/meta-data/", "is refused"),      # the instance metadata service
    ("http://[::ffff:169.254.169.254]/latest/", "is refused"),
    ("http://[fd00:ec2::254]/latest/", "is refused"),
])
def test_serving_handler_refuses_non_http_and_metadata_image_urls(image, message):
    with pytest.raises(inference.BadRequest, match=message):
        inference.input_fn(json.dumps({"question": "q", "image": image}))


@pytest.mark.parametrize("status", [404, 500])
def test_serving_handler_answers_a_failing_image_url_with_a_4xx(scripted, status):
    answer(scripted, status, "text/html", "<html>nope</html>")
    srv = EndpointServer(None, handler_with(), port=0).start()
    try:
        import urllib.error
        import urllib.request
        body = json.dumps({"question": "q", "image": scripted.url + "/chart.png"}).encode()
        req = urllib.request.Request(srv.url + "/invocations", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and f"HTTP {status}".encode() in e.value.read()
    finally:
        srv.shutdown()
