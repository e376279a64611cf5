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
import json
import os
import time
import uuid
from pathlib import Path

from eval.images import ImageError, load_image
from eval.local import LocalBackend
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
    backend = LocalBackend(base, model_dir if has_adapter else None, quantize=quantize)
    base_backend = LocalBackend(base, quantize=quantize) if has_adapter else backend   # same engine
    return {"tuned": backend, "base": base_backend, "name": settings.get("name") or backend.name}


def _image(value):
    if not value:
        return None
    if not isinstance(value, str):
        raise BadRequest("image must be a base64 string, a data: URL or an http(s) URL")
    if value.startswith(("http://", "https://")):
        import urllib.request
        with urllib.request.urlopen(value, timeout=10) as response:   # noqa: S310 - user-chosen image URL
            data = response.read(50 * 1024 * 1024 + 1)
    else:
        if value.startswith("data:"):
            value = value.split(",", 1)[-1]
        try:
            data = base64.b64decode(value, validate=False)
        except ValueError:
            raise BadRequest("image is not valid base64") from None
    try:
        return load_image(data)
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


def output_fn(prediction: dict, accept="application/json"):
    """JSON for a whole answer; for a stream, an iterator of SSE byte lines ending `data: [DONE]`
    (the local server and response-streaming endpoints send them as they come)."""
    if "stream" in prediction:
        return sse_events(prediction)
    if prediction["wire"] == "openai":
        body = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": prediction["created"], "model": prediction["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": prediction["text"]}}]}
    else:
        body = {"answer": prediction["text"], "generated_text": prediction["text"]}
    return json.dumps(body)


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
