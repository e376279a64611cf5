"""The Compare tab's logic, free of any UI: model choices, both sides streamed at once, verdicts against
the gold answers, votes, a self-contained HTML export and a batch comparison over dataset examples.

Both sides run in their own threads and report through one queue, so a slow or failing side never holds
up the other (two local sides on the same base share one model copy and take turns on its lock).
"""
from __future__ import annotations

import base64
import html
import io
import json
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from charts.io import append_jsonl
from eval.protocol import ModelRef, Request

MAX_QUESTION_CHARS = 4000
VOTES = ("A better", "B better", "tie", "both bad")
KINDS = ("local", "sagemaker", "openai")


# ---- model choices ----
def endpoint_refs(workspace: str | Path) -> list[str]:
    """`sagemaker:NAME` (or a record's own `ref`) for each endpoint recorded in endpoints.json."""
    try:
        data = json.loads((Path(workspace) / "endpoints.json").read_text())
    except (OSError, ValueError):
        return []
    records = data if isinstance(data, list) else []
    return [r.get("ref") or f"sagemaker:{r['name']}" for r in records if isinstance(r, dict) and r.get("name")]


def model_choices(workspace: str | Path, base: str, adapter: str | None = None) -> list[str]:
    """The base, base + each adapter (the studio's and every run's), then recorded endpoints."""
    from eval.local import list_adapters

    adapters = ([str(adapter)] if adapter else []) + [str(p) for p in list_adapters(workspace)]
    refs = [f"local:{base}"] + [f"local:{base}+{a}" for a in adapters] + endpoint_refs(workspace)
    return list(dict.fromkeys(refs))


def to_ref(text: str, kind: str = "local", base: str | None = None) -> str:
    """What a user typed -> a model ref. `local:...`, `sagemaker:...`, `openai:...` pass through; a bare
    adapter folder becomes base + adapter; anything else gets the side's backend kind as prefix."""
    text = (text or "").strip()
    if not text:
        raise ValueError("pick a model")
    if text.split(":", 1)[0] in KINDS and ":" in text and not text.startswith(("http:", "https:")):
        return text
    if kind == "local" and base and (Path(text) / "adapter_config.json").is_file():
        return f"local:{base}+{text}"
    return f"{kind}:{text}"


_BACKENDS: dict[str, object] = {}
_BACKENDS_LOCK = threading.Lock()


def backend_for(ref: str, **options):
    """Open once per ref (a local base is loaded once anyway; this also keeps boto3 clients)."""
    from eval.backends import open_backend
    with _BACKENDS_LOCK:
        if ref not in _BACKENDS:
            _BACKENDS[ref] = open_backend(ModelRef.parse(ref), **options)
        return _BACKENDS[ref]


def check_question(question: str) -> str:
    question = (question or "").strip()
    if not question:
        raise ValueError("type a question")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,} "
                         "(chart questions are a sentence or two)")
    return question


# ---- one side ----
@dataclass
class Side:
    ref: str = ""
    name: str = ""
    text: str = ""
    error: str = ""
    done: bool = False
    first_token_s: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    exact_tokens: bool = False

    def stats(self) -> str:
        if self.error:
            return f"**error** · {self.seconds:.1f} s"
        if not self.done and not self.text:
            return "waiting…"
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        approx = "" if self.exact_tokens else "≈"
        first = f"first token {self.first_token_s:.2f} s · " if self.first_token_s is not None else ""
        return (f"{first}{self.seconds:.2f} s · {approx}{self.tokens} tokens · {approx}{rate:.1f} tok/s"
                + ("" if self.done else " · streaming"))


def _count_tokens(backend, text: str, pieces: int) -> tuple[int, bool]:
    tokenizer = getattr(getattr(backend, "engine", None), "tokenizer", None)
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]), True
    return pieces, False      # servers send about one token per event


def _run_side(index: int, ref: str, request: Request, out: queue.Queue, options: dict) -> None:
    side, start, pieces = Side(ref=ref), time.perf_counter(), 0
    try:
        if not ref:
            raise ValueError("pick a model")
        backend = backend_for(ref, **options.get(ref.split(":", 1)[0], {}))
        side.name = backend.name
        for piece in backend.stream(request):
            pieces += 1
            if side.first_token_s is None:
                side.first_token_s = time.perf_counter() - start
            side.text += piece
            side.seconds = time.perf_counter() - start
            side.tokens, side.exact_tokens = pieces, False
            out.put((index, Side(**asdict(side))))
        side.tokens, side.exact_tokens = _count_tokens(backend, side.text, pieces)
    except Exception as e:               # noqa: BLE001 - shown in this side's panel only
        side.error = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, RuntimeError, OSError)) else str(e)
    side.seconds, side.done = time.perf_counter() - start, True
    out.put((index, side))


def compare_stream(refs: list[str], request: Request, options: dict | None = None) -> Iterator[list[Side]]:
    """Stream every ref at the same time; yields the list of sides each time any of them changes.
    `options` maps a backend kind to its options, e.g. {"sagemaker": {"wire": "openai"}}."""
    sides = [Side(ref=r) for r in refs]
    updates: queue.Queue = queue.Queue()
    for i, ref in enumerate(refs):
        threading.Thread(target=_run_side, args=(i, ref, request, updates, options or {}), daemon=True,
                         name=f"compare-{i}").start()
    while not all(s.done for s in sides):
        index, side = updates.get()
        sides[index] = side
        while not updates.empty():        # coalesce bursts of tokens into one UI update
            index, side = updates.get_nowait()
            if not sides[index].done:
                sides[index] = side
        yield list(sides)


# ---- verdicts ----
def verdict(answer: str, golds: list[str]) -> str:
    """Relaxed accuracy (ChartQA rule, and the normalized variant) as one short line."""
    if not golds or not answer:
        return ""
    from eval.metrics import relaxed_normalized, relaxed_reference
    ref = relaxed_reference(answer, golds)
    norm, changes = relaxed_normalized(answer, golds)
    mark = "✅ correct" if ref else ("☑️ correct after normalization" if norm else "❌ wrong")
    why = f" ({'; '.join(changes)})" if norm and not ref and changes else ""
    return f"{mark} (relaxed accuracy){why}"


# ---- votes and export ----
def record_vote(workspace: str | Path, vote: str, note: str, result: dict) -> dict:
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}")
    if not result or not result.get("sides"):
        raise ValueError("compare something first")
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "vote": vote, "note": note.strip(),
           **{k: result.get(k) for k in ("question", "image", "example_id", "gold", "settings")},
           "sides": [{k: s.get(k) for k in ("ref", "name", "text", "error")} for s in result["sides"]]}
    append_jsonl(Path(workspace) / "votes.jsonl", row)
    return row


def _image_data_url(image) -> str:
    from eval.images import downsize
    buf = io.BytesIO()
    downsize(image.convert("RGB"), 1600).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def export_html(result: dict, image=None) -> str:
    """One self-contained page: the image (embedded), question, gold, both answers, models, settings."""
    esc = html.escape
    cells = []
    for label, side in zip("AB", result.get("sides", [])):
        body = (f"<p class='err'>{esc(side.get('error', ''))}</p>" if side.get("error")
                else f"<pre>{esc(side.get('text', ''))}</pre>")
        cells.append(f"<td><h3>{label}: {esc(side.get('name') or side.get('ref', ''))}</h3><p class='ref'>"
                     f"{esc(side.get('ref', ''))}</p>{body}<p>{esc(side.get('verdict', ''))}</p>"
                     f"<p class='stats'>{esc(side.get('stats', ''))}</p></td>")
    gold = result.get("gold") or []
    img = f"<img src='{_image_data_url(image)}' alt='chart'>" if image is not None else "<p>(no image)</p>"
    settings = esc(json.dumps(result.get("settings", {})))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Compare: {esc(result.get('question', '')[:60])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2rem auto}}img{{max-width:100%;
border:1px solid #ddd}}table{{width:100%;border-collapse:collapse}}td{{vertical-align:top;width:50%;
padding:0 1rem;border-left:3px solid #eee}}pre{{white-space:pre-wrap;font-size:1.05rem}}.err{{color:#b00}}
.ref,.stats{{color:#666;font-size:.85rem}}</style></head><body>
<h1>Base vs fine-tuned</h1>{img}
<h2>{esc(result.get('question', ''))}</h2>
{f"<p><b>Gold:</b> {esc(' | '.join(map(str, gold)))}</p>" if gold else ""}
<table><tr>{''.join(cells)}</tr></table>
<p class="stats">settings: {settings} · exported {esc(datetime.now(timezone.utc).isoformat(timespec="seconds"))}</p>
</body></html>
"""


# ---- batch ----
def sample_examples(dataset_dir: str | Path, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct random questions of a dataset (its test split when it has one)."""
    from charts import load_qa
    items = load_qa(dataset_dir, split="test") or load_qa(dataset_dir)
    if not items:
        raise ValueError(f"no questions found in {dataset_dir}")
    return random.Random(seed).sample(items, min(n, len(items)))


def batch_compare(refs: list[str], examples: list[dict], question: str | None, max_new_tokens: int = 16,
                  options: dict | None = None, on_progress=None) -> list[dict]:
    """Every example through every ref (batched by each backend's max_batch). `question` replaces the
    examples' own questions when given (its gold answers then do not apply)."""
    from eval.images import load_image

    requests = [Request(load_image(e["image"]), question or e["question"], max_new_tokens=max_new_tokens)
                for e in examples]
    rows = [{"id": e.get("id"), "chart_type": e.get("chart_type"), "question": r.question,
             "gold": "" if question else " | ".join(map(str, e.get("answers", [])))}
            for e, r in zip(examples, requests)]
    for label, ref in zip("AB", refs):
        try:
            backend = backend_for(ref, **(options or {}).get(ref.split(":", 1)[0], {}))
            answers = []
            for start in range(0, len(requests), backend.max_batch):
                answers += backend.generate(requests[start:start + backend.max_batch])
                if on_progress:
                    on_progress(label, len(answers), len(requests))
        except Exception as e:           # noqa: BLE001 - the other side still runs
            answers = [f"error: {e}"] * len(requests)
        for row, example, answer in zip(rows, examples, answers):
            row[label] = answer
            row[f"{label} verdict"] = "" if question else verdict(answer, list(map(str, example.get("answers", []))))
    return rows
