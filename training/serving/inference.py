"""SageMaker endpoint handler (Hugging Face inference toolkit contract), also run by `serve` locally.

The model folder holds a PEFT adapter (adapter_config.json + weights, maybe the trained projector) and
`serving.json` naming the base: {"base": "llava-hf/llava-1.5-7b-hf", "quantize": "auto"}; the env var
BASE_MODEL_ID overrides it. Generation goes through eval.local, so prompts use the model's own chat
template, exactly as in training and in the studio. Requests in either wire format:
  seed   {"image": base64 | data: URL | http(s) URL, "question", "temperature", "max_new_tokens", "stream"}
  openai {"messages": [...image_url + text...], "max_tokens", "temperature", "stream", "model"}
`"adapter": false` (seed) or `"model": "base"` (openai) answers with the base from the same copy.
This file is copied into model.tar.gz as code/inference.py next to a copy of the eval modules it imports,
so it must import nothing from training/.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from eval.images import ImageError, load_image
from eval.local import Engine, LocalBackend
from eval.protocol import Request

MAX_QUESTION_CHARS = 4000
MAX_NEW_TOKENS = 1024


class BadRequest(ValueError):
    """The request body is wrong; the container answers 400 with this message."""


def model_fn(model_dir, context=None) -> dict:
    """Load base + adapter once per worker. Returns the backends for the adapter and the base."""
    model_dir = Path(model_dir)
    settings = {}
    if (model_dir / "serving.json").is_file():
        settings = json.loads((model_dir / "serving.json").read_text())
    base = os.environ.get("BASE_MODEL_ID") or settings.get("base")
    if not base:
        raise RuntimeError(f"no base model: set BASE_MODEL_ID or write serving.json with a 'base' in {model_dir}")
    quantize = os.environ.get("QUANTIZE") or settings.get("quantize", "auto")
    has_adapter = (model_dir / "adapter_config.json").is_file()
    engine = Engine(base, quantize=quantize)          # one copy of the base serves the adapter and the base
    backend = LocalBackend(engine, model_dir if has_adapter else None)
    base_backend = LocalBackend(engine) if has_adapter else backend
    return {"tuned": backend, "base": base_backend, "name": settings.get("name") or backend.name}


MAX_IMAGE_BYTES = 50 * 1024 * 1024
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
METADATA_HOSTS = {ipaddress.ip_address("fd00:ec2::254")}    # IMDS over IPv6 (not link-local)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead to a scheme or host the URL check refused (file:, the metadata service)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise BadRequest(f"image URL {req.full_url} redirects ({code}) to {newurl}: give the final URL")


def _check_image_url(url: str) -> None:
    """Only http(s) to a routable or loopback host: never file:, ftp: or the link-local metadata service,
    which would hand the endpoint's own credentials to whoever chose the URL."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"image URL scheme {parts.scheme!r} is refused: send http(s)://, data: or base64")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        raise BadRequest(f"image URL {url}: cannot resolve {parts.hostname} ({e})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        address = getattr(address, "ipv4_mapped", None) or address
        if address.is_link_local or address.is_multicast or address.is_unspecified or address in METADATA_HOSTS:
            raise BadRequest(f"image URL {url}: host {parts.hostname} ({address}) is refused")


def _fetch(url: str) -> bytes:
    _check_image_url(url)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as response:       # noqa: S310 - scheme and host checked above
            data = response.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise BadRequest(f"image URL {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:             # refused, DNS, timeout, reset
        raise BadRequest(f"image URL {url}: {getattr(e, 'reason', e)}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise BadRequest(f"image URL {url}: more than {MAX_IMAGE_BYTES // 2**20} MB")
    return data


def _image(value):
    if not value:
        return None
    if not isinstance(value, str):
        raise BadRequest("image must be a base64 string, a data: URL or an http(s) URL")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    elif URL_SCHEME.match(value):            # base64 has no ':', so this is a URL (maybe file: or ftp:)
        value = _fetch(value)
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=False)
        except ValueError:
            raise BadRequest("image is not valid base64") from None
    try:
        return load_image(value)
    except ImageError as e:
        raise BadRequest(f"image: {e}") from None


def _number(data: dict, key: str, default, kind, low, high):
    value = data.get(key, default)
    if value is None:
        return default
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key} must be a number, got {value!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, got {value}")
    return value


def input_fn(body, content_type="application/json", context=None) -> dict:
    """Parse either wire format into {"request", "wire", "stream", "use_adapter", "model"}."""
    if content_type and content_type.split(";")[0].strip() not in ("application/json", "text/json", ""):
        raise BadRequest(f"content type {content_type!r} is not supported: send application/json")
    try:
        data = json.loads(body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    if "messages" in data:
        wire, question, image = "openai", [], None
        for message in data["messages"] if isinstance(data["messages"], list) else []:
            if not isinstance(message, dict) or message.get("role") != "user":
                continue
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for part in parts:
                if part.get("type") == "text":
                    question.append(part.get("text", ""))
                elif part.get("type") == "image_url":
                    url = part.get("image_url")
                    image = _image(url.get("url") if isinstance(url, dict) else url)
        question = "\n".join(question)
        max_new = _number(data, "max_tokens", data.get("max_new_tokens", 64), int, 1, MAX_NEW_TOKENS)
        use_adapter = data.get("model") != "base"
    else:
        wire, question, image = "seed", data.get("question") or data.get("inputs"), _image(data.get("image"))
        max_new = _number(data, "max_new_tokens", 64, int, 1, MAX_NEW_TOKENS)
        use_adapter = data.get("adapter", True) is not False
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("no question: send 'question' (seed format) or a user text part (messages format)")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRequest(f"question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    request = Request(image, question.strip(), max_new_tokens=max_new,
                      temperature=_number(data, "temperature", 0.0, float, 0.0, 2.0),
                      top_p=_number(data, "top_p", 1.0, float, 0.0, 1.0))
    return {"request": request, "wire": wire, "stream": bool(data.get("stream")), "use_adapter": use_adapter,
            "model": data.get("model")}


def predict_fn(data: dict, model: dict) -> dict:
    backend = model["tuned"] if data["use_adapter"] else model["base"]
    out = {"wire": data["wire"], "model": data.get("model") or model["name"], "created": int(time.time())}
    if data["stream"]:
        return {**out, "stream": backend.stream(data["request"])}
    return {**out, "text": backend.generate([data["request"]])[0]}


ACCEPTS = ("application/json", "text/plain", "text/event-stream")


def can_stream() -> bool:
    """False in the Hugging Face inference toolkit container (deploy sets STUDIO_STREAMING=0): its model
    server (MMS) sends str/bytes as they are, json.dumps anything else and answers 503 for a generator."""
    return os.environ.get("STUDIO_STREAMING", "1") != "0"


def response_type(prediction: dict, accept: str | None) -> str:
    """The media type output_fn answers with: the request's Accept, or JSON (SSE for a stream) for */*."""
    wanted = [a.split(";")[0].strip().lower() for a in (accept or "").split(",") if a.strip()]
    for media in wanted:
        if media in ACCEPTS:
            return media
        if media in ("*/*", "application/*", "text/*"):
            if "stream" in prediction and media != "application/*":
                return "text/event-stream"
            return "text/plain" if media == "text/*" else "application/json"
    if not wanted:
        return "text/event-stream" if "stream" in prediction else "application/json"
    raise BadRequest(f"Accept {accept!r} is not supported: ask for {', '.join(ACCEPTS)}")


def output_fn(prediction: dict, accept="application/json"):
    """The answer in the media type of `accept`: JSON (the wire's shape), plain text, or server-sent events
    ending `data: [DONE]`. A stream is an iterator of SSE byte lines (the local server and the streaming
    container send them as they come); where streaming is off, or the client asked for a whole answer,
    the pieces are joined into one body."""
    media = response_type(prediction, accept)
    if media == "text/event-stream":
        if "stream" in prediction and can_stream():
            return sse_events(prediction)
        return b"".join(sse_events({**prediction, "stream": [_text(prediction)]}))
    text = _text(prediction)
    if media == "text/plain":
        return text
    if prediction["wire"] == "openai":
        body = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": prediction["created"], "model": prediction["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}
    else:
        body = {"answer": text, "generated_text": text}
    return json.dumps(body)


def _text(prediction: dict) -> str:
    if "stream" not in prediction:
        return prediction["text"]
    pieces = prediction["stream"]
    try:
        return "".join(pieces)
    finally:
        if hasattr(pieces, "close"):
            pieces.close()


def sse_events(prediction: dict):
    ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    pieces = prediction["stream"]
    try:
        for piece in pieces:
            if prediction["wire"] == "openai":
                event = {"id": ident, "object": "chat.completion.chunk", "created": prediction["created"],
                         "model": prediction["model"], "choices": [{"index": 0, "delta": {"content": piece}}]}
            else:
                event = {"token": {"text": piece, "special": False}}
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        if hasattr(pieces, "close"):       # a client that hung up must not keep the model's lock
            pieces.close()
