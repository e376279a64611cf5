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
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from eval.images import downsize
from eval.protocol import Request, trimmed

WIRES = ("seed", "openai")
MAX_PAYLOAD = int(5.5 * 1024 * 1024)     # real-time endpoints refuse bodies over ~6 MB
# Error codes worth another try: the service or the container is overloaded, not the request wrong.
RETRY_CODES = {"ThrottlingException", "Throttling", "TooManyRequestsException", "ServiceUnavailable",
               "InternalFailure", "InternalServerError", "ServiceUnavailableException"}


class EndpointError(RuntimeError):
    """A remote model failed; the message is for the user (never contains credentials)."""


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


def parse_answer(body: bytes | str) -> str:
    """The answer text from any of the response shapes seen in the wild."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
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


# ---- server-sent events ----
class SSEDecoder:
    """Feed bytes in any chunking; get back the text pieces of complete events. Ends at `data: [DONE]`."""

    def __init__(self):
        self.buffer = b""
        self.done = False

    def feed(self, chunk: bytes) -> list[str]:
        self.buffer += chunk.replace(b"\r\n", b"\n")
        pieces = []
        while not self.done and b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            piece = self._event(event.decode("utf-8", "replace"))
            if piece:
                pieces.append(piece)
        return pieces

    def close(self) -> list[str]:
        """A final event without its blank line (some servers end that way)."""
        rest, self.buffer = self.buffer, b""
        return self.feed(rest + b"\n\n") if rest.strip() and not self.done else []

    def _event(self, event: str) -> str:
        data = "\n".join(line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:"))
        if not data:
            return ""                          # comments, keep-alives, `event:` lines
        if data.strip() == "[DONE]":
            self.done = True
            return ""
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            return data
        return stream_piece(obj)


def stream_piece(obj) -> str:
    if isinstance(obj, dict):
        if obj.get("error"):
            raise EndpointError(f"the model failed while streaming: {obj['error']}")
        if obj.get("choices"):
            choice = obj["choices"][0]
            return (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        token = obj.get("token")
        if isinstance(token, dict):
            return "" if token.get("special") else token.get("text", "")
    return ""


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
                 retries: int = 3, backoff: float = 0.5, max_batch: int = 4, client=None):
        if wire not in WIRES:
            raise ValueError(f"wire={wire!r}: expected one of {', '.join(WIRES)}")
        self.endpoint, self.wire, self.region, self.endpoint_url = endpoint_name, wire, region, endpoint_url
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
        return parse_answer(response["Body"].read())

    def generate(self, requests: list[Request]) -> list[str]:
        return fan_out(self._one, requests, self.max_batch)

    def stream(self, request: Request) -> Iterator[str]:
        return trimmed(self._stream(request))

    def _stream(self, request: Request) -> Iterator[str]:
        from botocore.exceptions import EventStreamError, ReadTimeoutError

        body = json.dumps(build_payload(request, self.wire, stream=True)).encode()
        response = self._call("invoke_endpoint_with_response_stream", Body=body,
                              ContentType="application/json", Accept="text/event-stream")
        decoder = SSEDecoder()
        try:
            for event in response["Body"]:
                part = event.get("PayloadPart")
                if part is not None:
                    yield from decoder.feed(part.get("Bytes", b""))
                elif "ModelStreamError" in event or "InternalStreamFailure" in event:
                    error = event.get("ModelStreamError") or event.get("InternalStreamFailure") or {}
                    raise EndpointError(f"endpoint {self.endpoint}: the model failed mid-stream: "
                                        f"{error.get('Message', error)}")
                if decoder.done:
                    break
            yield from decoder.close()
        except EventStreamError as e:
            raise describe_client_error(e, self.endpoint) from None
        except ReadTimeoutError:
            raise EndpointError(f"endpoint {self.endpoint} stopped sending for {self.timeout:g} s mid-stream") from None
        finally:
            response["Body"].close()


# ---- OpenAI-compatible HTTP servers ----
class OpenAIBackend:
    """An OpenAI-compatible chat-completions server (vLLM `serve`, LMI, TGI /v1), through stdlib urllib."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 70,
                 max_batch: int = 8):
        self.base_url, self.model, self.timeout = base_url.rstrip("/"), model, timeout
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.name = f"openai:{model}"
        self.max_batch = max_batch

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
            return urllib.request.urlopen(req, timeout=self.timeout)
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
            return parse_answer(response.read())

    def generate(self, requests: list[Request]) -> list[str]:
        return fan_out(self._one, requests, self.max_batch)

    def stream(self, request: Request) -> Iterator[str]:
        return trimmed(self._stream(request))

    def _stream(self, request: Request) -> Iterator[str]:
        decoder = SSEDecoder()
        try:
            with self._open(build_payload(request, "openai", stream=True, model=self.model)) as response:
                for line in response:             # the HTTP body arrives line by line
                    yield from decoder.feed(line)
                    if decoder.done:
                        return
                yield from decoder.close()
        except TimeoutError:
            raise EndpointError(f"{self.base_url} stopped sending for {self.timeout:g} s mid-stream") from None
