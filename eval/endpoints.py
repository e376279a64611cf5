"""Remote backends: a SageMaker real-time endpoint (boto3 `sagemaker-runtime`) and an OpenAI-compatible
server (vLLM, LMI, TGI's /v1). Both speak the same Request -> text protocol as the local backend.

    SageMakerBackend("chartqa-llava", wire="openai").generate([Request(img, "Which bar is highest?")])
    OpenAIBackend("http://127.0.0.1:8000/v1", "llava-hf/llava-1.5-7b-hf").stream(request)

Wire formats (see training/serving/inference.py for the handler that answers both):
  seed   {"image": <base64 PNG/JPEG>, "question", "temperature", "max_new_tokens"[, "stream"]}
  openai {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
          {"type": "text", "text": q}]}], "max_tokens", "temperature"[, "stream"]}
Streams are server-sent events; SageMaker cuts them into PayloadPart chunks at arbitrary bytes, so
events are re-assembled here before parsing. boto3 is imported lazily.

Each deployed endpoint's wire format and whether it can stream are recorded in WORKSPACE/endpoints.json;
`endpoint_options(workspace, "sagemaker:NAME")` gives them back as backend options. A backend's `streams`
says whether `stream()` really streams: where it does not, `stream()` yields the whole answer once.
Secrets: OPENAI_API_KEY is sent only to the origin (scheme, host, port) of OPENAI_BASE_URL (default
https://api.openai.com/v1); any other server gets a key only when named for it (`api_key_env=`, e.g. the
ref option `api_key_env`), or none. Only http(s) URLs are opened, and redirects are not followed (they would
carry the key to another host).
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from eval.images import downsize
from eval.protocol import Request, trimmed

WIRES = ("seed", "openai")
STREAM_DEADLINE_S = 300                  # one answer, start to end: an endpoint trickling tokens is cut off here
MAX_RAW = 1024 * 1024                    # bytes kept of a "stream" that sent no events, to read it whole
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
MAX_PAYLOAD = int(5.5 * 1024 * 1024)     # real-time endpoints refuse bodies over ~6 MB
# Error codes worth another try: the service or the container is overloaded, not the request wrong.
RETRY_CODES = {"ThrottlingException", "Throttling", "TooManyRequestsException", "ServiceUnavailable",
               "InternalFailure", "InternalServerError", "ServiceUnavailableException"}


class EndpointError(RuntimeError):
    """A remote model failed; the message is for the user (never contains credentials)."""


# ---- what endpoints.json says about an endpoint ----
def endpoint_records(workspace: str | Path | None) -> list[dict]:
    """WORKSPACE/endpoints.json (written by `python -m training.serving deploy`): a list of records."""
    if workspace is None:
        return []
    try:
        data = json.loads((Path(workspace) / "endpoints.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict) and r.get("name")] if isinstance(data, list) else []


def endpoint_options(workspace: str | Path | None, ref) -> dict:
    """Backend options that open `ref` as it was deployed: {"wire", "streams", "region"} for a
    `sagemaker:NAME` recorded in the workspace, {} for anything else (then pass wire= yourself)."""
    text = str(ref)
    if not text.startswith("sagemaker:"):
        return {}
    name = text.split(":", 1)[1]
    for record in endpoint_records(workspace):
        if record["name"] == name or record.get("ref") == text:
            wire = record.get("wire") if record.get("wire") in WIRES else "seed"
            # Records from before targets were recorded all ran the Hugging Face toolkit image: no streaming.
            streams = record.get("streams", "huggingface-pytorch-inference" not in str(record.get("image", "")))
            options = {"wire": wire, "streams": bool(streams)}
            if record.get("region"):
                options["region"] = record["region"]
            return options
    return {}


# ---- payloads ----
def encode_image(img, limit: int = MAX_PAYLOAD) -> tuple[str, str]:
    """(mime type, base64) of `img`, as PNG (lossless, best for chart text) when it fits in `limit`
    bytes of base64, else JPEG, shrinking the image until it fits."""
    def b64(fmt, image, **kw):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    img = img.convert("RGB")
    data = b64("PNG", img, optimize=True)
    if len(data) <= limit:
        return "image/png", data
    while True:
        data = b64("JPEG", img, quality=90)
        if len(data) <= limit or max(img.size) <= 64:
            return "image/jpeg", data
        img = downsize(img, int(max(img.size) * 0.75))


def build_payload(request: Request, wire: str, stream: bool = False, model: str | None = None,
                  limit: int = MAX_PAYLOAD) -> dict:
    if wire not in WIRES:
        raise ValueError(f"wire={wire!r}: expected one of {', '.join(WIRES)}")
    image = encode_image(request.image, limit - len(request.question.encode()) - 4096) \
        if request.image is not None else None
    if wire == "seed":
        payload = {"question": request.question, "temperature": request.temperature,
                   "max_new_tokens": request.max_new_tokens, "top_p": request.top_p}
        if image:
            payload["image"] = image[1]
    else:
        content = [{"type": "image_url", "image_url": {"url": f"data:{image[0]};base64,{image[1]}"}}] if image else []
        content.append({"type": "text", "text": request.question})
        payload = {"messages": [{"role": "user", "content": content}], "max_tokens": request.max_new_tokens,
                   "temperature": request.temperature, "top_p": request.top_p}
        if model:
            payload["model"] = model
    if stream:
        payload["stream"] = True
    return payload


def parse_answer(body: bytes | str, content_type: str | None = None) -> str:
    """The answer text from any of the response shapes seen in the wild. A body that is not JSON (an HTML
    error page, a proxy's text) is an error, never an answer to score."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        kind = f" ({content_type})" if content_type else ""
        raise EndpointError(f"the server answered with a body that is not JSON{kind}: {_snippet(text)}") from None
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, str):
        return data.strip()
    if isinstance(data, dict):
        if data.get("choices"):
            choice = data["choices"][0]
            content = (choice.get("message") or {}).get("content", choice.get("text"))
            if isinstance(content, list):      # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content is not None:
                return str(content).strip()
        for key in ("generated_text", "answer", "text", "output"):
            if isinstance(data.get(key), str):
                return data[key].strip()
        if "error" in data:
            raise EndpointError(f"the model server answered with an error: {data['error']}")
    raise EndpointError(f"unrecognised response shape: {text[:200]}")


def _snippet(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return repr(text[:limit] + ("..." if len(text) > limit else "")) if text else "(empty)"


# ---- server-sent events ----
class SSEDecoder:
    """Feed bytes in any chunking; get back the text pieces of complete events. Ends at `data: [DONE]`.
    Events that are not JSON, or JSON of no known shape, raise EndpointError. A "stream" that never
    sends an event (the server answered whole) is read as one whole answer at `close()`."""

    def __init__(self):
        self.buffer = b""
        self.done = False
        self.events = 0                        # data events seen
        self.raw = bytearray()                 # the bytes before the first event, to read a whole answer

    def feed(self, chunk: bytes) -> list[str]:
        if not self.events and len(self.raw) < MAX_RAW:
            self.raw += chunk[:MAX_RAW - len(self.raw)]
        self.buffer += chunk.replace(b"\r\n", b"\n")
        return self._drain()

    def _drain(self) -> list[str]:
        pieces = []
        while not self.done and b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            piece = self._event(event.decode("utf-8", "replace"))
            if piece:
                pieces.append(piece)
        return pieces

    def close(self) -> list[str]:
        """A final event without its blank line (some servers end that way); a body with no events at all
        is parsed as a whole answer (or raises what is wrong with it)."""
        pieces = []
        if self.buffer.strip() and not self.done:
            self.buffer += b"\n\n"
            pieces = self._drain()
        self.buffer = b""
        if self.events or self.done:
            return pieces
        raw = bytes(self.raw).strip()
        if not raw:
            raise EndpointError("the stream ended without sending any event")
        try:
            text = parse_answer(raw)
        except EndpointError as e:
            raise EndpointError(f"asked for a stream, got no server-sent events: {e}") from None
        return [text] if text else []

    def _event(self, event: str) -> str:
        data = "\n".join(line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:"))
        if not data:
            return ""                          # comments, keep-alives, `event:` lines
        self.events += 1
        if data.strip() == "[DONE]":
            self.done = True
            return ""
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise EndpointError(f"the stream sent an event that is not JSON: {_snippet(data)}") from None
        return stream_piece(obj)


METADATA_KEYS = {"id", "object", "created", "model", "usage", "system_fingerprint", "details", "generated_text"}


def stream_piece(obj) -> str:
    """The text of one streamed event: OpenAI `choices[0].delta.content` or TGI `token.text`."""
    def malformed(why: str):
        return EndpointError(f"malformed stream event ({why}): {_snippet(json.dumps(obj))}")

    if not isinstance(obj, dict):
        raise malformed("not a JSON object")
    if obj.get("error"):
        error = obj["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise EndpointError(f"the model failed while streaming: {message}")
    if "choices" in obj:
        choices = obj["choices"]
        if not isinstance(choices, list) or (choices and not isinstance(choices[0], dict)):
            raise malformed("choices is not a list of objects")
        if not choices:
            return ""                          # e.g. the final usage-only chunk
        delta = choices[0].get("delta")
        if delta is not None and not isinstance(delta, dict):
            raise malformed("delta is not an object")
        text = (delta or {}).get("content") or choices[0].get("text") or ""
        if not isinstance(text, str):
            raise malformed("content is not text")
        return text
    if "token" in obj:
        token = obj["token"]
        if not isinstance(token, dict) or not isinstance(token.get("text", ""), str):
            raise malformed("token is not an object with text")
        return "" if token.get("special") else token.get("text", "")
    if obj.keys() <= METADATA_KEYS:
        return ""
    raise malformed("neither choices nor token")


def read_stream(chunks, decoder: SSEDecoder, limit_s: float, what: str) -> Iterator[str]:
    """Decode byte chunks until [DONE]. An answer still coming after `limit_s` seconds is cut off with a
    clear error (each read also has the socket timeout, so the worst case is limit_s + one timeout)."""
    deadline = time.monotonic() + limit_s
    for chunk in chunks:
        yield from decoder.feed(chunk)
        if decoder.done:
            return
        if time.monotonic() > deadline:
            raise EndpointError(f"{what} was still sending after {limit_s:g} s (the overall limit); stopped")
    yield from decoder.close()


def fan_out(one, requests: list[Request], width: int) -> list[str]:
    """A remote server batches on its side: send up to `width` requests at once, answers in order."""
    if len(requests) <= 1:
        return [one(r) for r in requests]
    with ThreadPoolExecutor(min(width, len(requests))) as pool:
        return list(pool.map(one, requests))


# ---- SageMaker ----
def describe_client_error(e, endpoint: str) -> EndpointError:
    """One readable line per failure kind: which endpoint, what status, what the container said."""
    from botocore.exceptions import ClientError, EventStreamError

    if isinstance(e, (ClientError, EventStreamError)):
        err = e.response.get("Error", {})
        code, message = err.get("Code", "Error"), err.get("Message", str(e))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        original = e.response.get("OriginalStatusCode") or err.get("OriginalStatusCode")
        if code == "ModelError":
            return EndpointError(f"endpoint {endpoint}: the model container failed (ModelError, original status "
                                 f"{original or '?'}): {message}. See its CloudWatch logs /aws/sagemaker/Endpoints/{endpoint}.")
        if code == "ModelStreamError":
            return EndpointError(f"endpoint {endpoint}: the model failed mid-stream (ModelStreamError): {message}")
        if code == "ValidationError" and "not found" in message.lower():
            return EndpointError(f"endpoint {endpoint} not found (or not InService) in this region: {message}")
        return EndpointError(f"endpoint {endpoint}: {code} (HTTP {status or '?'}): {message}")
    return EndpointError(f"endpoint {endpoint}: {type(e).__name__}: {e}")


class SageMakerBackend:
    """A SageMaker real-time endpoint. `generate` sends up to `max_batch` requests concurrently."""

    def __init__(self, endpoint_name: str, wire: str = "seed", region: str | None = None,
                 endpoint_url: str | None = None, timeout: float = 70, connect_timeout: float = 10,
                 retries: int = 3, backoff: float = 0.5, max_batch: int = 4, client=None,
                 streams: bool = True, stream_limit_s: float = STREAM_DEADLINE_S):
        if wire not in WIRES:
            raise ValueError(f"wire={wire!r}: expected one of {', '.join(WIRES)}")
        self.endpoint, self.wire, self.region, self.endpoint_url = endpoint_name, wire, region, endpoint_url
        self.streams, self.stream_limit_s = bool(streams), stream_limit_s
        self.timeout, self.connect_timeout, self.retries, self.backoff = timeout, connect_timeout, retries, backoff
        self.name = f"sagemaker:{endpoint_name}"
        self.max_batch = max_batch
        self._client = client

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config
            # Retries are done here (_call), not by botocore: a read timeout must not be retried, since
            # the container already spent its 60 s budget, and a 4xx never succeeds on a second try.
            config = Config(read_timeout=self.timeout, connect_timeout=self.connect_timeout,
                            retries={"total_max_attempts": 1})
            self._client = boto3.client("sagemaker-runtime", region_name=self.region,
                                        endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _call(self, method: str, **kwargs):
        from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                         NoCredentialsError, NoRegionError, ReadTimeoutError)
        for attempt in range(self.retries + 1):
            try:
                return getattr(self.client(), method)(EndpointName=self.endpoint, **kwargs)
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                code = e.response.get("Error", {}).get("Code", "")
                retry = code in RETRY_CODES or (status >= 500 and code != "ModelError") or status == 429
                if not retry or attempt == self.retries:
                    raise describe_client_error(e, self.endpoint) from None
            except ReadTimeoutError:
                raise EndpointError(f"endpoint {self.endpoint} did not answer within {self.timeout:g} s "
                                    "(SageMaker stops waiting at 60 s): use fewer max new tokens or a "
                                    "larger instance") from None
            except (EndpointConnectionError, ConnectTimeoutError) as e:
                raise EndpointError(f"cannot reach SageMaker runtime for {self.endpoint}: {e}") from None
            except NoCredentialsError:
                raise EndpointError("no AWS credentials found: set AWS_PROFILE or run `aws configure`") from None
            except NoRegionError:
                raise EndpointError("no AWS region set: pass region= or set AWS_DEFAULT_REGION") from None
            time.sleep(min(8.0, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0))   # backoff with jitter

    def _one(self, request: Request) -> str:
        body = json.dumps(build_payload(request, self.wire)).encode()
        response = self._call("invoke_endpoint", Body=body, ContentType="application/json", Accept="application/json")
        try:
            return parse_answer(response["Body"].read(), response.get("ContentType"))
        except EndpointError as e:
            raise EndpointError(f"endpoint {self.endpoint}: {e}") from None

    def generate(self, requests: list[Request]) -> list[str]:
        return fan_out(self._one, requests, self.max_batch)

    def stream(self, request: Request) -> Iterator[str]:
        if not self.streams:               # e.g. the Hugging Face toolkit container: one whole answer
            return whole_answer(self, request)
        return trimmed(self._stream(request))

    def _stream(self, request: Request) -> Iterator[str]:
        from botocore.exceptions import EventStreamError, ReadTimeoutError

        body = json.dumps(build_payload(request, self.wire, stream=True)).encode()
        response = self._call("invoke_endpoint_with_response_stream", Body=body,
                              ContentType="application/json", Accept="text/event-stream")

        def parts():
            for event in response["Body"]:
                part = event.get("PayloadPart")
                if part is not None:
                    yield part.get("Bytes", b"")
                elif "ModelStreamError" in event or "InternalStreamFailure" in event:
                    error = event.get("ModelStreamError") or event.get("InternalStreamFailure") or {}
                    raise EndpointError(f"endpoint {self.endpoint}: the model failed mid-stream: "
                                        f"{error.get('Message', error)}")

        try:
            yield from read_stream(parts(), SSEDecoder(), self.stream_limit_s, f"endpoint {self.endpoint}")
        except EndpointError as e:
            raise e if str(e).startswith("endpoint ") else EndpointError(f"endpoint {self.endpoint}: {e}") from None
        except EventStreamError as e:
            raise describe_client_error(e, self.endpoint) from None
        except ReadTimeoutError:
            raise EndpointError(f"endpoint {self.endpoint} stopped sending for {self.timeout:g} s mid-stream") from None
        finally:
            response["Body"].close()


def whole_answer(backend, request: Request) -> Iterator[str]:
    """`stream()` of a backend that cannot stream: the whole answer, yielded once (lazily)."""
    text = backend.generate([request])[0]
    if text:
        yield text


# ---- OpenAI-compatible HTTP servers ----
def _origin(url: str) -> tuple[str, str, int]:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def check_http_url(url: str) -> str:
    """Only http(s): file:, ftp: and the rest would let a typed ref read local files."""
    scheme, host, _ = _origin(url)
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"{url!r}: only http:// and https:// server URLs are accepted")
    return url


def api_key_for(base_url: str, api_key: str | None = None, api_key_env: str | None = None,
                env=os.environ) -> str | None:
    """The key this server may see: one given for it (`api_key`, or the variable `api_key_env` names), else
    OPENAI_API_KEY only when the server has OPENAI_BASE_URL's origin (default api.openai.com), else none."""
    if api_key is not None:
        return api_key or None
    if api_key_env:
        return env.get(api_key_env) or None
    key = env.get("OPENAI_API_KEY")
    if key and _origin(base_url) == _origin(env.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE):
        return key
    return None


def _no_redirects():
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            raise EndpointError(f"{req.full_url}: redirected ({code}) to {newurl}; not followed (give the final URL)")
    return urllib.request.build_opener(NoRedirect)


class OpenAIBackend:
    """An OpenAI-compatible chat-completions server (vLLM `serve`, LMI, TGI /v1), through stdlib urllib."""

    streams = True

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 70,
                 max_batch: int = 8, api_key_env: str | None = None,
                 stream_limit_s: float = STREAM_DEADLINE_S):
        self.base_url, self.model, self.timeout = check_http_url(base_url).rstrip("/"), model, timeout
        self._api_key = api_key_for(self.base_url, api_key, api_key_env)
        self.name = f"openai:{model}"
        self.max_batch = max_batch
        self.stream_limit_s = stream_limit_s

    def __repr__(self) -> str:          # never show the key
        return f"OpenAIBackend({self.base_url!r}, {self.model!r})"

    def _open(self, payload: dict):
        import urllib.error
        import urllib.request

        url = self.base_url + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            return _no_redirects().open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            detail = e.read(2000).decode("utf-8", "replace")
            try:
                err = json.loads(detail).get("error", detail)
                detail = err.get("message", err) if isinstance(err, dict) else err
            except (json.JSONDecodeError, AttributeError):
                pass
            raise EndpointError(f"{url}: HTTP {e.code} {e.reason}: {str(detail)[:500]}") from None
        except TimeoutError:
            raise EndpointError(f"{url} did not answer within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise EndpointError(f"{url} did not answer within {self.timeout:g} s") from None
            raise EndpointError(f"cannot reach {url}: {e.reason}") from None

    def _one(self, request: Request) -> str:
        with self._open(build_payload(request, "openai", model=self.model)) as response:
            body = self._read_all(response)
            try:
                return parse_answer(body, response.headers.get("Content-Type"))
            except EndpointError as e:
                raise EndpointError(f"{self.base_url}: {e}") from None

    def _read_all(self, response) -> bytes:
        deadline, body = time.monotonic() + self.stream_limit_s, bytearray()
        try:
            while chunk := response.read1(65536):
                body += chunk
                if time.monotonic() > deadline:
                    raise EndpointError(f"{self.base_url} was still sending after {self.stream_limit_s:g} s "
                                        "(the overall limit); stopped")
        except TimeoutError:
            raise EndpointError(f"{self.base_url} stopped sending for {self.timeout:g} s") from None
        return bytes(body)

    def generate(self, requests: list[Request]) -> list[str]:
        return fan_out(self._one, requests, self.max_batch)

    def stream(self, request: Request) -> Iterator[str]:
        return trimmed(self._stream(request))

    def _stream(self, request: Request) -> Iterator[str]:
        try:
            with self._open(build_payload(request, "openai", stream=True, model=self.model)) as response:
                chunks = iter(lambda: response.read1(65536), b"")      # whatever has arrived, not whole lines
                try:
                    yield from read_stream(chunks, SSEDecoder(), self.stream_limit_s, self.base_url)
                except EndpointError as e:
                    raise e if self.base_url in str(e) else EndpointError(f"{self.base_url}: {e}") from None
        except TimeoutError:
            raise EndpointError(f"{self.base_url} stopped sending for {self.timeout:g} s mid-stream") from None
