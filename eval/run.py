"""Benchmark runs: a question set x model backends -> per-sample JSONL + summary JSON, resumable.

    python -m eval run --data workspace/datasets/demo --split test --model local:workspace/models/demo-llava \
        --model local:workspace/models/demo-llava+workspace/runs/r1/adapter --out workspace/evals/demo

Layout: OUT/eval.json (the models in the order given; the first is the baseline of reports), and per
model OUT/<slug>/{run.json, samples.jsonl, summary.json}. Samples are appended one line each as they
finish, so a killed run resumes where it stopped; when a model completes, samples.jsonl is rewritten
in dataset order, so two runs of the same settings give identical files (up to `latency_s`).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from charts.dataset import SHORT_ANSWER_INSTRUCTION
from charts.io import append_jsonl, atomic_write_json, read_jsonl, write_jsonl
from eval.images import ImageError, load_image
from eval.metrics import DEFAULT_METRICS, DESCRIPTIONS, score_sample
from eval.protocol import ModelRef, Request

# VLMEvalKit's ChartQA prompt; lmms-eval's is "Answer the question with a single word." Either moves
# scores by points, which is why the template is recorded in every summary. The same string that
# charts.generate puts on a share of train/val questions (instruct_share).
DEFAULT_SUFFIX = SHORT_ANSWER_INSTRUCTION
DEFAULT_MAX_NEW_TOKENS = 16
GROUPS = {"by_split": "split", "by_chart_type": "chart_type", "by_family": "family"}

Progress = Callable[[int, int, dict], None]


class DatasetError(ValueError):
    """The question file or folder cannot be used; the message says which and why."""


class RunMismatch(ValueError):
    """The output folder holds a run made with other settings: resuming would mix two runs."""


# ---------------------------------------------------------------- question sets
def _read_records(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            rows = list(read_jsonl(path))
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON/JSON Lines ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected a list of objects (records), got {type(rows).__name__}")
    return rows


def _chartqa_split(path: Path) -> str:
    """ChartQA names files test_human.json / test_augmented.json: report those two splits separately."""
    for name in ("human", "augmented"):
        if name in path.stem.lower():
            return name
    return path.stem


def load_chartqa(path: str | Path, images: str | Path | None = None) -> list[dict]:
    """A ChartQA-style file `[{"imgname", "query", "label"}]` as question dicts. Images are looked up
    in `images`, else in ChartQA's own layout (`png/` beside the file), else beside the file."""
    path = Path(path)
    rows = _read_records(path)
    if images is None:
        images = path.parent / "png" if (path.parent / "png").is_dir() else path.parent
    images, split = Path(images), _chartqa_split(path)
    questions = []
    for n, row in enumerate(rows):
        missing = [k for k in ("imgname", "query", "label") if k not in row]
        if missing:
            raise DatasetError(f"{path}: record {n} lacks {missing}; a ChartQA-style record has "
                               "imgname, query and label")
        label = row["label"]
        golds = [str(x) for x in label] if isinstance(label, list) else [str(label)]
        questions.append({"id": f"{split}/{row['imgname']}/{n}", "image": str((images / row["imgname"]).resolve()),
                          "question": str(row["query"]), "answers": golds, "split": split,
                          "chart_type": row.get("chart_type", "unknown"), "family": row.get("family", "unknown"),
                          "answer_type": row.get("answer_type", "")})
    return questions


def _is_chartqa_file(path: Path) -> bool:
    rows = _read_records(path)
    return bool(rows) and {"imgname", "query"} <= set(rows[0])


def load_questions(data: str | Path, split: str | None = None, images: str | Path | None = None) -> list[dict]:
    """Questions of a dataset folder (our layout, or ChartQA's test folder with *_human/*_augmented
    files), a ChartQA-style file, or a LLaVA-format file -- in a fixed order."""
    path = Path(data)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        chartqa = sorted(path.glob("*_human.json")) + sorted(path.glob("*_augmented.json"))
        if chartqa and not any((path / f"{s}.jsonl").exists() for s in ("train", "val", "test")):
            questions = [q for f in chartqa for q in load_chartqa(f, images)]
        else:
            questions = _load_llava(path, split)
            split = None   # charts.load_qa already selected it
    elif _is_chartqa_file(path):
        questions = load_chartqa(path, images)
    else:
        questions = _load_llava(path, split)
        split = None
    if split:
        questions = [q for q in questions if q.get("split") == split]
    if not questions:
        raise DatasetError(f"{path}: no questions" + (f" in split {split!r}" if split else "") +
                           "; expected a dataset folder, ChartQA-style records (imgname, query, label) "
                           "or LLaVA records (id, image, conversations)")
    seen = set()
    for q in questions:
        if q["id"] in seen:
            raise DatasetError(f"{path}: question id {q['id']!r} appears twice; ids must be unique to resume")
        seen.add(q["id"])
    return questions


def _load_llava(path: Path, split: str | None) -> list[dict]:
    import charts
    try:
        return charts.load_qa(path, split=split)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: not a dataset folder, ChartQA-style file or LLaVA-format file ({e})") from None


def question_set_hash(questions: list[dict]) -> str:
    """Same hash <=> same questions, same golds, same order (image paths excluded: folders move)."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q["id"], q["question"], q["answers"]], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- per-model output
def model_slug(ref: str | ModelRef) -> str:
    """A readable folder name for a model: demo-llava, demo-llava+r1-adapter, my-endpoint."""
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    target = ref.target.split("#", 1)[1] if ref.kind == "openai" and "#" in ref.target else ref.target
    parts = [Path(target.rstrip("/")).name or target]
    if ref.adapter:
        adapter = Path(ref.adapter.rstrip("/"))
        parts.append(f"{adapter.parent.name}-{adapter.name}" if adapter.name == "adapter" else adapter.name)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "+".join(parts)).strip("-") or ref.kind


def load_done(path: Path) -> dict[str, dict]:
    """Samples already written, by id. A torn last line (killed writer) is dropped from the file,
    so the next append starts on a fresh line; a repeated id keeps its first row."""
    if not path.exists():
        return {}
    rows = list(read_jsonl(path))
    done: dict[str, dict] = {}
    for row in rows:
        done.setdefault(row["id"], row)
    raw = path.read_bytes()
    if (raw and not raw.endswith(b"\n")) or len(done) != len(rows):
        write_jsonl(path, done.values())
    return done


def summarize(rows: list[dict], metrics=DEFAULT_METRICS) -> dict:
    """Mean scores x100 overall and per split / chart kind / family, with counts."""
    def block(sub):
        out = {"n": len(sub)}
        for m in metrics:
            out[m] = round(100 * sum(r[m] for r in sub) / len(sub), 2) if sub else None
        return out

    summary = {"n": len(rows), "n_errors": sum(1 for r in rows if r.get("error")), "overall": block(rows)}
    for key, field in GROUPS.items():
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(str(r.get(field) or "unknown"), []).append(r)
        summary[key] = {k: block(v) for k, v in sorted(groups.items())}
    if "relaxed_ref" in metrics and "relaxed_norm" in metrics:
        summary["normalization"] = {
            "right_only_after": sum(1 for r in rows if r["relaxed_norm"] > r["relaxed_ref"]),
            "right_only_before": sum(1 for r in rows if r["relaxed_norm"] < r["relaxed_ref"]),
        }
    return summary


def _score_batch(backends: dict[str, object], batch: list[dict], settings: dict, metrics) -> dict[str, list[dict]]:
    """Generate for one batch with every backend and score it. Each image is read once for all of them;
    local backends on one base answer in one shared forward. A sample whose image cannot be read is
    recorded with an `error`, scored wrong, and the rest of the batch goes on."""
    from eval.local import generate_together

    images, errors = {}, {}
    for q in batch:
        try:
            images[q["id"]] = load_image(q["image"])
        except ImageError as e:
            errors[q["id"]] = f"image: {e}"
    good = [q for q in batch if q["id"] in images]
    requests = [Request(images[q["id"]], q["question"] + settings["prompt_suffix"], settings["max_new_tokens"],
                        settings["temperature"], settings["top_p"]) for q in good]
    start = time.perf_counter()
    predictions = generate_together(backends, requests) if requests else {label: [] for label in backends}
    elapsed = time.perf_counter() - start
    out = {}
    for label, backend in backends.items():
        if isinstance(predictions[label], Exception):
            raise predictions[label]
        if len(predictions[label]) != len(requests):
            raise RuntimeError(f"backend {backend.name} returned {len(predictions[label])} answers for "
                               f"{len(requests)} requests")
        answers = dict(zip((q["id"] for q in good), predictions[label]))
        rows = []
        for q in batch:
            prediction = answers.get(q["id"], "")
            row = {"id": q["id"], "split": q.get("split"), "chart_type": q.get("chart_type"), "family": q.get("family"),
                   "answer_type": q.get("answer_type"), "image": q["image"], "question": q["question"],
                   "golds": q["answers"], "prediction": prediction}
            row.update(score_sample(prediction, q["answers"], metrics))
            if q["id"] in errors:
                row.update({m: 0.0 for m in metrics}, error=errors[q["id"]])
            # the sample's share of its batch's generate time: comparable across batch sizes
            row["latency_s"] = round(elapsed / max(1, len(requests) * len(backends)), 5) if q["id"] in answers else 0.0
            rows.append(row)
        out[label] = rows
    return out


def _resume_key(meta: dict) -> dict:
    """What must not change between a run and its resumption. Batching and --limit may; so may the
    dataset's location (the hash covers the questions, not where the folder lives)."""
    key = {k: meta.get(k) for k in ("model", "prompt", "generation", "metrics")}
    key["dataset"] = {k: (meta.get("dataset") or {}).get(k) for k in ("split", "source_sha256")}
    return key


def run_models(questions: list[dict], members: list[tuple], *, batch_size: int, concurrency: int,
               metrics=DEFAULT_METRICS, on_progress: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Evaluate several backends on the same `questions`, each into its own folder: members are
    (backend, run_dir, meta). Every batch goes to all of them at once (so each image is read once and local
    models on one base share a forward); ids already in a folder are skipped. Returns the summaries."""
    states = []
    for backend, run_dir, meta in members:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta_path = run_dir / "run.json"
        if meta_path.exists():
            old = _resume_key(json.loads(meta_path.read_text()))
            changed = [k for k, v in _resume_key(meta).items() if old.get(k) != v]
            if changed:
                raise RunMismatch(f"{run_dir} holds a run with other {', '.join(changed)}; "
                                  "use another --out or delete that folder")
        atomic_write_json(meta_path, meta)
        states.append({"backend": backend, "dir": run_dir, "meta": meta, "done": load_done(run_dir / "samples.jsonl"),
                       "new": 0})
    wanted = {q["id"] for q in questions}
    # Sorted by length so a batch's prompts pad to about the same size; written back in dataset order.
    todo = sorted((q for q in questions if any(q["id"] not in st["done"] for st in states)),
                  key=lambda q: len(q["question"]))
    settings = {**members[0][2]["prompt"], **members[0][2]["generation"]}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    start, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    lock = threading.Lock()

    def work(batch):
        need = {str(i): st["backend"] for i, st in enumerate(states) if any(q["id"] not in st["done"] for q in batch)}
        return _score_batch(need, batch, settings, metrics)

    def finish(results):
        with lock:     # one writer: lines never interleave, progress counts stay exact
            count = 0
            for label, rows in results.items():
                st = states[int(label)]
                for row in rows:
                    if row["id"] not in st["done"]:
                        append_jsonl(st["dir"] / "samples.jsonl", row)
                        st["done"][row["id"]] = row
                        st["new"] += 1
                        count += 1
            if on_progress:
                on_progress(count, {"new": sum(st["new"] for st in states), "elapsed_s": time.perf_counter() - start})

    if on_progress:
        on_progress(sum(1 for st in states for i in st["done"] if i in wanted),
                    {"new": 0, "elapsed_s": 0.0, "resumed": True})
    if concurrency <= 1:
        for batch in batches:
            finish(work(batch))
    else:
        pool = ThreadPoolExecutor(max_workers=concurrency)
        try:
            futures = [pool.submit(work, b) for b in batches]
            for future in as_completed(futures):
                finish(future.result())
        finally:   # on an error or Ctrl-C, drop queued requests instead of sending them all first
            pool.shutdown(wait=True, cancel_futures=True)
    wall = time.perf_counter() - start

    summaries = []
    for st in states:
        rows = [st["done"][q["id"]] for q in questions]
        write_jsonl(st["dir"] / "samples.jsonl", rows)   # dataset order: re-runs give identical files
        new = st["new"]
        summary = {**st["meta"], **summarize(rows, metrics),
                   "metric_descriptions": {m: DESCRIPTIONS[m] for m in metrics},
                   "timing": {"started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "wall_s": round(wall, 3), "new_samples": new, "resumed_samples": len(rows) - new,
                              "samples_per_s": round(new / wall, 3) if new and wall > 0 else None,
                              "mean_latency_s": round(sum(r["latency_s"] for r in rows) / len(rows), 5)}}
        atomic_write_json(st["dir"] / "summary.json", summary)
        summaries.append(summary)
    return summaries


def run_eval(data: str | Path, models: list[str], out: str | Path, *, split: str | None = None,
             images: str | Path | None = None, limit: int | None = None, prompt_suffix: str = DEFAULT_SUFFIX,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int | None = None,
             concurrency: int | None = None, metrics=DEFAULT_METRICS, on_progress: Progress | None = None,
             open_backend: Callable | None = None, backend_options: dict | None = None, pool=None) -> list[dict]:
    """Evaluate every model on the same questions; returns one summary per model, in order.

    All models answer each batch together: local models on one base share one forward (the base and
    every adapter, each image encoded once). Batches hold `batch_size` questions (default: what fits the
    GPU's free memory, divided among the local models; 4 on CPU); endpoints get `concurrency` requests
    in flight (default 4). Models are opened through `pool` (an eval.pool.ModelPool; a new one if None)
    unless `open_backend(ref, **options)` is given."""
    if not models:
        raise ValueError("give at least one model")
    questions = load_questions(data, split=split, images=images)
    source_hash = question_set_hash(questions)
    questions = questions[:limit] if limit else questions
    out = Path(out)
    slugs: list[str] = []
    for ref in models:
        slug = model_slug(ref)
        slugs.append(slug if slug not in slugs else f"{slug}-{len(slugs) + 1}")
    atomic_write_json(out / "eval.json", {"data": str(Path(data).resolve()), "split": split, "limit": limit,
                                          "models": [{"ref": str(m), "slug": s} for m, s in zip(models, slugs)]})
    total, done_all, started = len(questions) * len(models), 0, time.perf_counter()
    if open_backend is None:
        from eval.pool import ModelPool
        pool = pool or ModelPool()
        open_backend = pool.backend
    parsed = [ModelRef.parse(ref) if isinstance(ref, str) else ref for ref in models]
    backends = [open_backend(str(p), **(backend_options or {})) for p in parsed]
    local = any(p.kind == "local" for p in parsed)
    on_gpu = any(str(getattr(getattr(b, "engine", None), "device", "")).startswith("cuda") for b in backends)
    shared = sum(1 for p in parsed if p.kind == "local")
    batch = batch_size or (min(b.max_batch for b, p in zip(backends, parsed) if p.kind == "local") // max(1, shared)
                           if local else 1)
    batch = max(1, batch)
    # Two batches in flight on a GPU: one is read and tokenised while the other runs.
    workers = (2 if on_gpu else 1) if local else (concurrency or 4)
    members = []
    for index, (ref, slug, backend) in enumerate(zip(parsed, slugs, backends)):
        meta = {"model": str(ref), "slug": slug, "model_index": index,
                "dataset": {"path": str(Path(data).resolve()), "split": split, "limit": limit,
                            "n_questions": len(questions), "questions_sha256": question_set_hash(questions),
                            "source_sha256": source_hash},
                "prompt": {"template": "{question}" + prompt_suffix, "prompt_suffix": prompt_suffix},
                "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0},
                "execution": {"batch_size": batch, "concurrency": workers},
                "metrics": list(metrics)}
        members.append((backend, out / slug, meta))

    def progress(count, info):
        nonlocal done_all
        done_all += count
        if not on_progress:
            return
        rate = info["new"] / info["elapsed_s"] if info["new"] and info["elapsed_s"] > 0 else None
        remaining = total - done_all
        on_progress(done_all, total, {"model": " + ".join(slugs) if len(slugs) < 4 else f"{len(slugs)} models",
                                      "n_models": len(models), "samples_per_s": rate,
                                      "eta_s": remaining / rate if rate else None,
                                      "elapsed_s": time.perf_counter() - started})

    return run_models(questions, members, batch_size=batch, concurrency=workers, metrics=metrics, on_progress=progress)


def read_runs(eval_dir: str | Path) -> list[tuple[Path, dict]]:
    """(model folder, summary) of every finished model run under an eval folder, baseline first."""
    eval_dir = Path(eval_dir)
    found = []
    for summary_path in sorted(eval_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        found.append((summary_path.parent, summary))
    found.sort(key=lambda pair: (pair[1].get("model_index", 99), pair[0].name))
    return found
