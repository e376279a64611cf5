"""What every model backend takes and gives: a Request in, text out (whole, or streamed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class Request:
    image: "Image | None"        # RGB, already checked by eval.images.load_image
    question: str                # the user turn's text, without any <image> token
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0 means greedy
    top_p: float = 1.0


@dataclass(frozen=True)
class ModelRef:
    """A model as users write it: `local:BASE`, `local:BASE+ADAPTER`, `sagemaker:ENDPOINT`,
    `openai:URL#MODEL`. `options` carries backend settings such as wire format or 4-bit."""
    kind: str
    target: str
    adapter: str | None = None
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, text: str, **options) -> "ModelRef":
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(f"model {text!r}: expected KIND:TARGET, e.g. local:llava-hf/llava-1.5-7b-hf, "
                             "local:BASE+ADAPTER_DIR, sagemaker:ENDPOINT_NAME or openai:http://host:8000/v1#model")
        adapter = None
        if kind == "local" and "+" in rest:
            rest, adapter = rest.split("+", 1)
        return cls(kind, rest, adapter or None, dict(options))

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" + (f"+{self.adapter}" if self.adapter else "")


class Backend(Protocol):
    """The whole model interface. `max_batch` says how many requests `generate` handles well at
    once (a local GPU batches them; an endpoint sends them concurrently)."""
    name: str
    max_batch: int

    def generate(self, requests: list[Request]) -> list[str]: ...

    def stream(self, request: Request) -> Iterator[str]: ...


def trimmed(pieces: Iterable[str]) -> Iterator[str]:
    """Strip like a whole answer is stripped, so a joined stream equals the generated text."""
    pending, started = "", False
    for piece in pieces:
        text = pending + piece
        text = text if started else text.lstrip()
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            started = True
            yield body
