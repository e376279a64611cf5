"""A local SageMaker-compatible server around the endpoint handler (stdlib only).

    python -m training.serving serve --model-dir DIR --port 8080

It answers the container contract (`GET /ping`, `POST /invocations`) and the runtime paths boto3 calls
(`POST /endpoints/NAME/invocations`, `.../invocations-response-stream`), plus the OpenAI path
`POST /v1/chat/completions` (as vLLM serves it), so the studio and tests talk to
it exactly as to a real endpoint:
    boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8080").invoke_endpoint(...)
Errors follow the service: the handler's failures come back as ModelError (424, OriginalStatusCode =
what the container answered), requests SageMaker itself refuses (empty, > 6 MB, unknown endpoint) as
ValidationError (400), failures after a stream started as a ModelStreamError event.
"""
from __future__ import annotations

import json
import re
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

MAX_BODY = 6 * 1024 * 1024
STREAM_PATH = re.compile(r"^/endpoints/([^/]+)/invocations-response-stream$")
INVOKE_PATH = re.compile(r"^/endpoints/([^/]+)/invocations$")
VARIANT = {"x-Amzn-Invoked-Production-Variant": "AllTraffic"}    # the service names the variant that answered


def _wants_stream(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and bool(data.get("stream"))


def event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message (application/vnd.amazon.eventstream): prelude (total length,
    headers length) + prelude CRC32, headers (string type 7), payload, CRC32 of all before it."""
    encoded = b""
    for name, value in headers.items():
        name_b, value_b = name.encode(), value.encode()
        encoded += struct.pack(">B", len(name_b)) + name_b + struct.pack(">BH", 7, len(value_b)) + value_b
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    return event_message({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                          ":message-type": "event"}, data)


def stream_error(message: str) -> bytes:
    body = json.dumps({"Message": message, "ErrorCode": "ModelStreamError"}).encode()
    return event_message({":exception-type": "ModelStreamError", ":content-type": "application/json",
                          ":message-type": "exception"}, body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"        # chunked streams, as SageMaker reads a container's; one request per
                                         # connection (Connection: close) keeps the threads simple
    server: "EndpointServer"

    def log_message(self, fmt, *args):   # quiet by default; `serve --verbose` turns it on
        if self.server.verbose:
            super().log_message(fmt, *args)

    def do_GET(self):
        if self.path.rstrip("/") == "/ping":
            self._send(200, b"{}", "application/json")
        else:
            self._send(404, b'{"error": "not found"}', "application/json")

    def do_POST(self):
        path = self.path.split("?")[0]
        stream_match, invoke_match = STREAM_PATH.match(path), INVOKE_PATH.match(path)
        length = int(self.headers.get("Content-Length") or 0)
        self.server.hits += 1
        if path == "/invocations":                               # the container contract
            return self._container(self.rfile.read(length), self.headers.get("Accept"))
        if path == "/v1/chat/completions":                       # OpenAI clients: the body's "stream" decides
            body = self.rfile.read(length)
            return self._container(body, "text/event-stream" if _wants_stream(body) else "application/json")
        if not (stream_match or invoke_match):
            return self._send(404, b'{"error": "not found"}', "application/json")
        name = (stream_match or invoke_match).group(1)
        if length > MAX_BODY:
            return self._aws_error(413, "ValidationError", f"Request body is {length} bytes; the limit is {MAX_BODY}")
        body = self.rfile.read(length)
        if self.server.names and name not in self.server.names:
            return self._aws_error(400, "ValidationError", f"Endpoint {name} of this server not found.")
        if not body:
            return self._aws_error(400, "ValidationError", "Request body is empty")
        if stream_match:
            return self._runtime_stream(body)
        status, content, content_type = self.server.invoke(body, self.headers.get("Content-Type"),
                                                           self.headers.get("Accept"))
        if status != 200:
            return self._model_error(status, content)
        self._send(200, content, content_type, VARIANT)

    # ---- the container contract ----
    def _container(self, body: bytes, accept):
        status, content, content_type = self.server.invoke(body, self.headers.get("Content-Type"), accept,
                                                           stream_ok=True)
        if not isinstance(content, (bytes, str)):          # an SSE iterator: HTTP/1.1 chunked, as it comes
            self._start(200, "text/event-stream", {"Transfer-Encoding": "chunked"})
            try:
                for chunk in content:
                    self._chunk(chunk)
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:                            # noqa: BLE001 - reported in-band
                self._chunk(f"data: {json.dumps({'error': str(e)})}\n\n".encode())
                self._chunk(b"")
            finally:
                content.close()
            return
        self._send(status, content, content_type)

    def _chunk(self, data: bytes):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # ---- the runtime API ----
    def _runtime_stream(self, body: bytes):
        status, content, content_type = self.server.invoke(body, self.headers.get("Content-Type"),
                                                           self.headers.get("X-Amzn-SageMaker-Accept"), stream_ok=True)
        if status != 200:
            return self._model_error(status, content)
        if isinstance(content, (bytes, str)):                 # not a stream request: one part
            content = [content if isinstance(content, bytes) else content.encode()]
        chunks = iter(content)
        try:
            try:
                first = next(chunks, None)                    # failures before any output are ModelErrors
            except Exception as e:                            # noqa: BLE001
                status = 400 if isinstance(e, ValueError) else 500
                return self._model_error(status, json.dumps({"error": str(e)}).encode())
            self._start(200, "application/vnd.amazon.eventstream",
                        {"X-Amzn-SageMaker-Content-Type": content_type, **VARIANT})
            try:
                for chunk in ([first] if first is not None else []):
                    self._write_parts(chunk)
                for chunk in chunks:
                    self._write_parts(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return                                        # the client went away
            except Exception as e:                            # noqa: BLE001 - becomes an in-stream error
                self.wfile.write(stream_error(f"Received server error from model: {e}"))
            self.wfile.flush()
        finally:
            if hasattr(chunks, "close"):
                chunks.close()

    def _write_parts(self, chunk: bytes):
        # Real endpoints cut the byte stream anywhere; `split` makes that visible in tests.
        size = self.server.split or len(chunk) or 1
        for i in range(0, len(chunk), size):
            self.wfile.write(payload_part(chunk[i:i + size]))
            self.wfile.flush()

    def _model_error(self, status: int, content):
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        try:
            text = json.loads(text).get("error", text)
        except (json.JSONDecodeError, AttributeError):
            pass
        message = f"Received client error ({status}) from primary with message \"{text}\"" if status < 500 else \
            f"Received server error ({status}) from primary with message \"{text}\""
        self._aws_error(424, "ModelError", message, {"OriginalStatusCode": status, "OriginalMessage": text,
                                                     "LogStreamArn": "local"})

    def _aws_error(self, status: int, code: str, message: str, extra: dict | None = None):
        body = json.dumps({"message": message, **(extra or {})}).encode()
        self._send(status, body, "application/json", {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/"})

    def _start(self, status: int, content_type: str, headers: dict | None = None):
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body, content_type: str, headers: dict | None = None):
        body = body.encode() if isinstance(body, str) else body
        self._start(status, content_type, {"Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)


class EndpointServer(ThreadingHTTPServer):
    """Runs `handler.input_fn -> predict_fn -> output_fn` on `model` for every request."""
    daemon_threads = True

    def __init__(self, model, handler=None, host: str = "127.0.0.1", port: int = 8080,
                 names: tuple[str, ...] = (), split: int = 0, verbose: bool = False):
        if handler is None:
            from training.serving import inference as handler
        self.model, self.handler, self.names, self.split, self.verbose = model, handler, tuple(names), split, verbose
        self.hits = 0                              # POST requests seen (tests check that 4xx is not retried)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def invoke(self, body: bytes, content_type, accept, stream_ok: bool = False):
        """(status, bytes or an SSE iterator, content type), the way the container would answer."""
        h = self.handler
        try:
            data = h.input_fn(body, content_type or "application/json")
        except ValueError as e:                     # BadRequest and friends
            return 400, json.dumps({"error": str(e)}).encode(), "application/json"
        except Exception as e:                      # noqa: BLE001 - never drop the connection
            return 500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), "application/json"
        if isinstance(data, dict) and data.get("stream") and not stream_ok:
            data = {**data, "stream": False}       # plain invoke of a stream request: answer whole
        try:
            prediction = h.predict_fn(data, self.model)
            media = getattr(h, "response_type", lambda p, a: "application/json")(prediction, accept)
            output = h.output_fn(prediction, accept)
        except ValueError as e:                     # e.g. prompt longer than the model's context, bad Accept
            return 400, json.dumps({"error": str(e)}).encode(), "application/json"
        except Exception as e:                      # noqa: BLE001 - the handler failed
            return 500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), "application/json"
        if isinstance(output, (bytes, str)):
            return 200, output if isinstance(output, bytes) else output.encode(), media
        return 200, output, "text/event-stream"

    def start(self) -> "EndpointServer":
        """Serve in a background thread (tests, the studio); `shutdown()` stops it."""
        threading.Thread(target=self.serve_forever, name="endpoint-server", daemon=True).start()
        return self


def load_server(model_dir, host: str = "127.0.0.1", port: int = 8080, **kwargs) -> EndpointServer:
    from training.serving import inference
    return EndpointServer(inference.model_fn(model_dir), inference, host, port, **kwargs)


def handler_with(**overrides):
    """The real handler with some functions replaced (tests: a slow or failing predict_fn)."""
    from training.serving import inference
    functions = {name: getattr(inference, name) for name in ("input_fn", "predict_fn", "output_fn", "response_type")}
    return SimpleNamespace(**{**functions, **overrides})
