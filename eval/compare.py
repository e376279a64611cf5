"""The Compare tab's logic, free of any UI: model choices, both sides streamed at once, verdicts against
the gold answers, votes, a self-contained HTML export and a batch comparison over dataset examples.

Both sides run in their own threads and report through one queue, so a slow or failing side never holds
up the other; two local sides on the same base share one model copy and are decoded in one batch.
Models come from the caller's eval.pool.ModelPool.
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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from charts.io import append_jsonl
from eval.display import short_name, status_line
from eval.protocol import Request

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


def list_adapters(workspace: str | Path) -> list[Path]:
    """Adapter folders of runs in the workspace: runs/NAME/ itself or any folder right under it
    (runs/NAME/adapter for finished runs, runs/NAME/checkpoint-N while training)."""
    runs = Path(workspace) / "runs"
    found = set(runs.glob("*/adapter_config.json")) | set(runs.glob("*/*/adapter_config.json"))
    return sorted((f.parent for f in found), key=lambda p: (p.relative_to(runs).parts[0], p.name != "adapter", str(p)))


def model_choices(workspace: str | Path, base: str, adapter: str | None = None) -> list[str]:
    """The base, base + each adapter (the studio's and every run's), then recorded endpoints."""
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
    note: str = ""                # e.g. "this endpoint does not stream: one whole answer"
    verdict: str = ""             # against the gold answers, once done
    done: bool = False
    first_token_s: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    exact_tokens: bool = False

    def stats(self) -> str:
        if self.error:
            return f"**error** · {self.seconds:.1f} s"
        if not self.done and not self.text:
            return "stopped" if self.done else "waiting…"
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        approx = "" if self.exact_tokens else "≈"
        first = f"first token {self.first_token_s:.2f} s · " if self.first_token_s is not None else ""
        return (f"{first}{self.seconds:.2f} s · {approx}{self.tokens} tokens · {approx}{rate:.1f} tok/s"
                + ("" if self.done else " · streaming") + (f" · {self.note}" if self.note else ""))


@dataclass
class CompareResult:
    """One comparison as the tab shows it, votes record it and the HTML export prints it."""
    question: str
    sides: list[Side]
    image: str | None = None
    example_id: str | None = None
    gold: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"question": self.question, "image": self.image, "example_id": self.example_id, "gold": self.gold,
                "settings": self.settings,
                "sides": [{"ref": s.ref, "name": s.name, "text": s.text, "error": s.error} for s in self.sides]}


def _run_side(index: int, ref: str, request: Request, out: queue.Queue, pool, options: dict,
              stop: threading.Event, golds: list[str]) -> None:
    side, start, pieces, stream = Side(ref=ref), time.perf_counter(), 0, None
    try:
        if not ref:
            raise ValueError("pick a model")
        backend = pool.backend(ref, **options.get(ref.split(":", 1)[0], {}))
        side.name = backend.name
        if not getattr(backend, "streams", True):
            side.note = "this endpoint does not stream: one whole answer"
        stream = backend.stream(request)
        for piece in stream:
            if stop.is_set():
                break
            pieces += 1
            if side.first_token_s is None:
                side.first_token_s = time.perf_counter() - start
            side.text += piece
            side.seconds = time.perf_counter() - start
            side.tokens, side.exact_tokens = getattr(stream, "tokens", pieces), getattr(stream, "exact", False)
            out.put((index, replace(side)))
    except Exception as e:               # noqa: BLE001 - shown in this side's panel only
        side.error = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, RuntimeError, OSError)) else str(e)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()                      # a local stream cancels its row in the engine
    side.tokens = getattr(stream, "tokens", pieces) if stream is not None else pieces
    side.seconds, side.done = time.perf_counter() - start, True
    if stop.is_set() and not side.error:
        side.note = "stopped"
    elif not side.error:
        side.verdict = verdict(side.text, golds)
    out.put((index, side))


def compare_stream(refs: list[str], request: Request, pool, options: dict | None = None,
                   golds: list[str] | None = None, heartbeat_s: float = 0.5) -> Iterator[list[Side]]:
    """Stream every ref at the same time; yields the list of sides each time any of them changes (and
    every `heartbeat_s` while none does, so a closed consumer is noticed). Closing the generator stops
    every side: local generations leave the engine's batch at its next step. Local sides on one base
    are decoded together in one batch. `options` maps a backend kind to its options."""
    sides = [Side(ref=r) for r in refs]
    updates: queue.Queue = queue.Queue()
    stop = threading.Event()
    for i, ref in enumerate(refs):
        threading.Thread(target=_run_side, args=(i, ref, request, updates, pool, options or {}, stop, golds or []),
                         daemon=True, name=f"compare-{i}").start()
    try:
        while not all(s.done for s in sides):
            try:
                index, side = updates.get(timeout=heartbeat_s)
            except queue.Empty:
                yield list(sides)
                continue
            sides[index] = side
            while not updates.empty():        # coalesce bursts of tokens into one UI update
                index, side = updates.get_nowait()
                if not sides[index].done:
                    sides[index] = side
            yield list(sides)
    finally:
        stop.set()


# ---- verdicts ----
def verdict(answer: str, golds: list[str]) -> str:
    """Relaxed accuracy (ChartQA rule, and the normalized variant) as one short line."""
    if not golds or not answer:
        return ""
    from eval.metrics import relaxed_normalized, relaxed_reference
    ref = relaxed_reference(answer, golds)
    norm, changes = relaxed_normalized(answer, golds)
    # plain-text marks: emoji render as empty boxes where no emoji font is installed
    mark = "✓ correct" if ref else ("✓ correct after normalization" if norm else "✗ wrong")
    why = f" ({'; '.join(changes)})" if norm and not ref and changes else ""
    return f"{mark} (relaxed accuracy){why}"


# ---- blind comparisons ----
def blind_order(rng: random.Random, n: int = 2) -> list[int]:
    """A shuffled order for a blind comparison: the side shown as A (index 0) is real side order[0], and so on."""
    order = list(range(n))
    rng.shuffle(order)
    return order


def unblind(vote: str, order: list[int] | None, shown_refs: list[str]) -> dict:
    """A vote cast on the sides as shown, mapped back to the real sides: {"vote": the vote in terms of the
    real A and B, "winner"/"loser": refs or None for a tie / both bad, "models": the real [A, B] refs}."""
    order = list(order or range(len(shown_refs)))
    models = [""] * len(shown_refs)
    for shown, real in enumerate(order):
        models[real] = shown_refs[shown]
    if vote in ("A better", "B better"):
        shown = "AB".index(vote[0])
        return {"vote": f"{'AB'[order[shown]]} better", "winner": shown_refs[shown],
                "loser": shown_refs[1 - shown], "models": models}
    return {"vote": vote, "winner": None, "loser": None, "models": models}


# ---- votes and export ----
def record_vote(workspace: str | Path, vote: str, note: str, result: CompareResult | None) -> dict:
    """Append one vote to votes.jsonl with which model won. A blind comparison (its settings carry the
    shown order) is mapped back to the real sides; `shown_vote` keeps what was clicked."""
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}")
    if result is None or not result.sides:
        raise ValueError("compare something first")
    order = result.settings.get("blind_order")
    real = unblind(vote, order, [s.ref for s in result.sides])
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result.record(), **real,
           "note": note.strip(), "blind": bool(order), **({"shown_vote": vote} if order else {})}
    append_jsonl(Path(workspace) / "votes.jsonl", row)
    return row


def _image_data_url(image) -> str:
    from eval.images import downsize
    buf = io.BytesIO()
    downsize(image.convert("RGB"), 1600).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def export_html(result: CompareResult, image=None) -> str:
    """One self-contained page: the image (embedded), question, gold, both answers, models, settings."""
    esc = html.escape
    cells = []
    for label, side in zip("ABCDEFGH", result.sides):
        body = f"<p class='err'>{esc(side.error)}</p>" if side.error else f"<pre>{esc(side.text)}</pre>"
        cells.append(f"<td><h3>{label}: {esc(short_name(side.ref) or side.name)}</h3><p class='ref'>"
                     f"{esc(side.ref)}</p>{body}<p>{esc(side.verdict)}</p>"
                     f"<p class='stats'>{esc(side.stats())}</p></td>")
    gold = result.gold
    img = f"<img src='{_image_data_url(image)}' alt='chart'>" if image is not None else "<p>(no image)</p>"
    settings = esc(status_line(result.settings))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Compare: {esc(result.question[:60])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2rem auto}}img{{max-width:100%;
border:1px solid #ddd}}table{{width:100%;border-collapse:collapse}}td{{vertical-align:top;width:50%;
padding:0 1rem;border-left:3px solid #eee}}pre{{white-space:pre-wrap;font-size:1.05rem}}.err{{color:#b00}}
.ref,.stats{{color:#666;font-size:.85rem}}</style></head><body>
<h1>Base vs fine-tuned</h1>{img}
<h2>{esc(result.question)}</h2>
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


def batch_compare(refs: list[str], examples: list[dict], question: str | None, pool, max_new_tokens: int = 16,
                  options: dict | None = None, on_progress=None) -> list[dict]:
    """Every example through every ref. Local sides on one base run in the same batches (one pass);
    `question` replaces the examples' own questions when given (its gold answers then do not apply)."""
    from eval.images import load_image
    from eval.local import generate_together

    requests = [Request(load_image(e["image"]), question or e["question"], max_new_tokens=max_new_tokens)
                for e in examples]
    rows = [{"id": e.get("id"), "chart_type": e.get("chart_type"), "question": r.question,
             "gold": "" if question else " | ".join(map(str, e.get("answers", [])))}
            for e, r in zip(examples, requests)]
    labels = "ABCDEFGH"[:len(refs)]
    answers: dict[str, list[str]] = {}
    backends = {}
    for label, ref in zip(labels, refs):
        try:
            backends[label] = pool.backend(ref, **(options or {}).get(ref.split(":", 1)[0], {}))
        except Exception as e:           # noqa: BLE001 - the other side still runs
            answers[label] = [f"error: {e}"] * len(requests)
    for label, texts in generate_together(backends, requests, on_progress).items():
        answers[label] = [f"error: {texts}"] * len(requests) if isinstance(texts, Exception) else texts
    for label in labels:
        for row, example, answer in zip(rows, examples, answers[label]):
            row[label] = answer
            row[f"{label} verdict"] = "" if question else verdict(answer, list(map(str, example.get("answers", []))))
    return rows
