"""Benchmark runs: a question set x model backends -> per-sample JSONL + summary JSON, resumable.

    python -m eval run --data workspace/datasets/demo --split test --model local:workspace/models/demo-llava \
        --model local:workspace/models/demo-llava+workspace/runs/r1/adapter --out workspace/evals/demo

Layout: OUT/eval.json (the models in the order given; the first is the baseline of reports), and per
model OUT/<slug>/{run.json, samples.jsonl, summary.json}, or OUT/<slug>/failed.json for a model that
could not be opened. Samples are appended one line each as they finish, so a killed run resumes where
it stopped; when a model completes, samples.jsonl is rewritten in dataset order, so two runs of the
same settings give identical files (up to `latency_s`).

A sample that fails (unreadable image, backend error, question over MAX_QUESTION_CHARS) is a row with
`error`, scored wrong and counted in `n_errors`; a rerun asks it again. A later run into the same OUT
must give the recorded models in the same order, and may add models after them (see recorded_models).
"""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from charts.dataset import SHORT_ANSWER_INSTRUCTION
from charts.io import append_jsonl, atomic_write_json, inside, read_jsonl, write_jsonl
from eval.images import ImageError, load_image
from eval.metrics import DEFAULT_METRICS, DESCRIPTIONS, METRICS, score_sample
from eval.protocol import ModelRef, Request
from eval.questions import DatasetError, load_chartqa, load_questions, question_set_hash  # noqa: F401 (the API)

# VLMEvalKit's ChartQA prompt; lmms-eval's is "Answer the question with a single word." Either moves
# scores by points, which is why the template is recorded in every summary. The same string that
# charts.generate puts on a share of train/val questions (instruct_share).
DEFAULT_SUFFIX = SHORT_ANSWER_INSTRUCTION
DEFAULT_MAX_NEW_TOKENS = 16
# A chart question is ~100 characters. A far longer one is a broken file, and tokenising 50 MB takes
# minutes: it becomes an error row without reaching the model.
MAX_QUESTION_CHARS = 10_000
# A name typed for an eval folder: one plain folder name under workspace/evals (no separators, no '..').
EVAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
GROUPS = {"by_split": "split", "by_chart_type": "chart_type", "by_family": "family"}

Progress = Callable[[int, int, dict], None]


class RunMismatch(ValueError):
    """The output folder holds a run made with other settings: resuming would mix two runs."""


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
    so the next append starts on a fresh line. A repeated id keeps its first scored row; a row with an
    `error` gives way to a later attempt (errored samples are asked again when a run resumes)."""
    if not path.exists():
        return {}
    rows = list(read_jsonl(path))
    done: dict[str, dict] = {}
    for row in rows:
        if row["id"] not in done or done[row["id"]].get("error"):
            done[row["id"]] = row
    raw = path.read_bytes()
    if (raw and not raw.endswith(b"\n")) or len(done) != len(rows):
        write_jsonl(path, done.values())
    return done


def summarize(rows: list[dict], metrics=DEFAULT_METRICS) -> dict:
    """Mean scores x100 overall and per split / chart kind / family, with counts."""
    def block(sub):
        out = {"n": len(sub), "n_errors": sum(1 for r in sub if r.get("error"))}
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


def _question_error(q: dict) -> str | None:
    """Why a question cannot be asked at all (then it is an error row and never reaches the model)."""
    if q.get("image_error"):
        return f"image: {q['image_error']}"
    if len(q["question"]) > MAX_QUESTION_CHARS:
        return f"question too long: {len(q['question'])} characters (the limit is {MAX_QUESTION_CHARS}); not sent"
    return None


def _describe(error: BaseException) -> str:
    """One line for a samples.jsonl row or a terminal: the type and the first line of the message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _generate_each(backend, requests: list[Request]) -> list[tuple[str, str | None]]:
    """(answer, error) per request. A batch whose call fails is retried one request at a time, so one
    bad sample (an endpoint's 500 for it, say) costs only its own row. Ctrl-C still ends the run."""
    try:
        answers = backend.generate(requests) if requests else []
        if len(answers) != len(requests):
            raise RuntimeError(f"backend {backend.name} returned {len(answers)} answers for {len(requests)} requests")
        return [(a, None) for a in answers]
    except Exception as e:
        if len(requests) == 1:
            return [("", f"backend: {_describe(e)}")]
    return [_generate_each(backend, [r])[0] for r in requests]


def _generate_all(backends: dict, requests: list[Request]) -> dict[str, list[tuple[str, str | None]]]:
    """(answer, error) per request for each backend. All answer together (local models on one base in
    one forward); a backend whose batch fails is retried on its own, one request at a time."""
    from eval.local import generate_together
    out = {}
    for label, answers in (generate_together(backends, requests) if requests else {k: [] for k in backends}).items():
        if not isinstance(answers, Exception) and len(answers) != len(requests):
            answers = RuntimeError(f"backend {backends[label].name} returned {len(answers)} answers for "
                                   f"{len(requests)} requests")
        if not isinstance(answers, Exception):
            out[label] = [(a, None) for a in answers]
        elif len(requests) == 1:
            out[label] = [("", f"backend: {_describe(answers)}")]
        else:                               # one bad sample should cost only its own row
            out[label] = [_generate_each(backends[label], [r])[0] for r in requests]
    return out


def _score_batch(backends: dict, batch: list[dict], settings: dict, metrics) -> dict[str, list[dict]]:
    """Generate for one batch with every backend and score it; each image is read once for all of them.
    A sample that cannot be asked (unreadable image, question too long) or whose generation fails is
    recorded with an `error`, scored wrong, and the rest goes on."""
    images, errors = {}, {}
    asked = []
    for q in batch:
        errors[q["id"]] = _question_error(q)
        if not errors[q["id"]]:
            asked.append(q)

    def read(path):
        try:
            return load_image(path), None
        except ImageError as e:
            return None, f"image: {e}"
    from eval.local import cpu_pool
    # Each file read once: its questions share the image object, which a local engine encodes once
    paths = list(dict.fromkeys(q["image"] for q in asked))
    loaded = dict(zip(paths, cpu_pool().map(read, paths) if len(paths) > 8 else map(read, paths)))
    for q in asked:
        image, error = loaded[q["image"]]
        if error:
            errors[q["id"]] = error
        else:
            images[q["id"]] = image
    good = [q for q in batch if q["id"] in images]
    requests = [Request(images[q["id"]], q["question"] + settings["prompt_suffix"], settings["max_new_tokens"],
                        settings["temperature"], settings["top_p"]) for q in good]
    start = time.perf_counter()
    results = _generate_all(backends, requests)
    elapsed = time.perf_counter() - start
    out = {}
    for label, result in results.items():
        answers, failed = {}, dict(errors)
        for q, (answer, error) in zip(good, result):
            answers[q["id"]] = answer
            failed[q["id"]] = error
        rows = []
        for q in batch:
            prediction = answers.get(q["id"], "")
            question = q["question"] if len(q["question"]) <= MAX_QUESTION_CHARS else q["question"][:200] + " [...]"
            row = {"id": q["id"], "split": q.get("split"), "chart_type": q.get("chart_type"), "family": q.get("family"),
                   "answer_type": q.get("answer_type"), "image": q["image"], "question": question,
                   "golds": q["answers"], "prediction": prediction}
            row.update(score_sample(prediction, q["answers"], metrics))
            if failed[q["id"]]:
                row.update({m: 0.0 for m in metrics}, error=failed[q["id"]])
            # the sample's share of its batch's generate time: comparable across batch sizes
            row["latency_s"] = round(elapsed / max(1, len(requests) * len(results)), 5) if q["id"] in answers else 0.0
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
    """Evaluate several backends on the same `questions`, each into its own folder; members are
    (backend, run_dir, meta). Each batch goes to all of them at once, so each image is read once and local
    models on one base share a forward. Ids already scored in a folder are skipped there; failed samples
    are asked again (an endpoint that was down, an image since put in place). Returns the summaries."""
    states = []
    for backend, run_dir, meta in members:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_resumable(run_dir, meta)
        atomic_write_json(run_dir / "run.json", meta)
        states.append({"backend": backend, "dir": run_dir, "meta": meta, "new": 0,
                       "done": load_done(run_dir / "samples.jsonl")})
    wanted = {q["id"] for q in questions}

    def pending(st, q):
        return q["id"] not in st["done"] or bool(st["done"][q["id"]].get("error"))
    # A chart's questions together (a local engine prefills the chart once for all of them), by length
    # within it so their prompts pad to about the same size; written back in dataset order.
    todo = sorted((q for q in questions if any(pending(st, q) for st in states)),
                  key=lambda q: (str(q["image"]), len(q["question"])))
    settings = {**members[0][2]["prompt"], **members[0][2]["generation"]}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    start, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    lock = threading.Lock()

    def work(batch):
        need = {str(i): st["backend"] for i, st in enumerate(states) if any(pending(st, q) for q in batch)}
        return _score_batch(need, batch, settings, metrics)

    def finish(results):
        with lock:     # one writer: lines never interleave, progress counts stay exact
            count = 0
            for label, rows in results.items():
                st = states[int(label)]
                for row in rows:
                    if pending(st, row):
                        append_jsonl(st["dir"] / "samples.jsonl", row)
                        st["done"][row["id"]] = row
                        st["new"] += 1
                        count += 1
            if on_progress:
                on_progress(count, {"new": sum(st["new"] for st in states), "elapsed_s": time.perf_counter() - start})

    if on_progress:
        on_progress(sum(1 for st in states for i, r in st["done"].items() if i in wanted and not r.get("error")),
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


# ---------------------------------------------------------------- checks made before any model loads
def check_settings(models: list, *, limit=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, batch_size=None,
                   concurrency=None, metrics=DEFAULT_METRICS) -> list[ModelRef]:
    """The parsed model refs, or ValueError with one line naming the bad setting. Run first, so a typo
    costs nothing (a negative limit once sliced the question list from the end)."""
    if not models:
        raise ValueError("give at least one model")
    refs = [ModelRef.parse(m) if isinstance(m, str) else m for m in models]
    from eval.backends import BACKENDS     # light: each backend imports torch / boto3 only when opened
    for ref in refs:
        if ref.kind not in BACKENDS:
            raise ValueError(f"model {str(ref)!r}: unknown kind {ref.kind!r}; expected one of {', '.join(BACKENDS)}")
        if ref.kind == "openai" and not ref.target.partition("#")[2]:
            raise ValueError(f"model {str(ref)!r}: an OpenAI-compatible server is written openai:URL#MODEL")
    for name, value, optional in (("limit", limit, True), ("max_new_tokens", max_new_tokens, False),
                                  ("batch_size", batch_size, True), ("concurrency", concurrency, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}"
                             + (" (leave it out for all questions)" if name == "limit" else ""))
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(METRICS)}")
    return refs


def recorded_models(out: Path, models: list[str]) -> list[str]:
    """The model list OUT/eval.json keeps after this run. A folder holds one set of models with one
    baseline (the first): a run may repeat the recorded list, resume its first models, or add models
    after them. Any other list would mix two benchmarks in one folder and change the baseline of reports."""
    path = out / "eval.json"
    if not path.exists():
        return list(models)
    old = [m["ref"] for m in json.loads(path.read_text(encoding="utf-8")).get("models", [])]
    shorter, longer = sorted((old, list(models)), key=len)
    if longer[:len(shorter)] != shorter:
        raise RunMismatch(f"{out} holds a benchmark of {', '.join(old)}; this run gives {', '.join(models)}. "
                          "Give the same models in the same order (new ones may follow them), or another --out")
    return longer


def _slugs(models: list[str]) -> list[str]:
    slugs: list[str] = []
    for ref in models:
        slug = model_slug(ref)
        slugs.append(slug if slug not in slugs else f"{slug}-{len(slugs) + 1}")
    return slugs


def _check_resumable(run_dir: Path, meta: dict) -> None:
    """RunMismatch if run_dir holds a run made with settings this one must share (see _resume_key)."""
    meta_path = run_dir / "run.json"
    if meta_path.exists():
        old = _resume_key(json.loads(meta_path.read_text()))
        changed = [k for k, v in _resume_key(meta).items() if old.get(k) != v]
        if changed:
            raise RunMismatch(f"{run_dir} holds a run with other {', '.join(changed)}; "
                              "use another --out or delete that folder")


def _model_failed(run_dir: Path, ref: ModelRef, slug: str, index: int, n: int, metrics, error: Exception) -> dict:
    """Record a model that could not be opened (OUT/<slug>/failed.json) and return its summary stand-in:
    every question counts as an error, no score. The other models still run."""
    message = _describe(error)
    atomic_write_json(run_dir / "failed.json", {"model": str(ref), "slug": slug, "error": message,
                                                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return {"model": str(ref), "slug": slug, "model_index": index, "failed": f"could not be opened: {message}",
            "n": n, "n_errors": n, "overall": {m: None for m in metrics}, "timing": {"samples_per_s": None}}


def new_eval_dir(evals_root: str | Path, stem: str) -> Path:
    """A new, empty folder evals_root/stem (or stem-2, stem-3, ...). mkdir either creates or fails, so two
    benchmarks started in the same second never share a folder."""
    root = Path(evals_root)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"{root}: no free folder name for {stem}")


def named_eval_dir(evals_root: str | Path, name: str) -> Path:
    """evals_root/NAME for a name a user typed: one plain folder name, never a path that leads elsewhere."""
    name = (name or "").strip()
    if not EVAL_NAME.fullmatch(name):
        raise ValueError(f"eval name {name!r}: use letters, digits, '-', '_', '+' and '.' (a folder name, "
                         "not a path)")
    return inside(evals_root, name)


def run_eval(data: str | Path, models: list[str], out: str | Path, *, split: str | None = None,
             images: str | Path | None = None, limit: int | None = None, prompt_suffix: str = DEFAULT_SUFFIX,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int | None = None,
             concurrency: int | None = None, metrics=DEFAULT_METRICS, on_progress: Progress | None = None,
             open_backend: Callable | None = None, backend_options: dict | None = None, pool=None) -> list[dict]:
    """Evaluate every model on the same questions; returns one summary per model, in order. A model
    that cannot be opened gets a stand-in with `failed` (and `n_errors` = n) and the others still run.

    All models answer each batch together: local models on one base share one forward (the base and
    every adapter, each image encoded once). A batch holds `batch_size` questions (default: what fits the
    GPU's free memory, shared among the local models; 4 on CPU); endpoints get `concurrency` requests in
    flight (default 4). Models open through `pool` (an eval.pool.ModelPool; a new one if None) unless
    `open_backend(ref, **options)` is given."""
    refs = check_settings(models, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          concurrency=concurrency, metrics=metrics)
    models = [str(r) for r in refs]
    questions = load_questions(data, split=split, images=images)
    source_hash = question_set_hash(questions)
    questions = questions[:limit] if limit else questions
    out = Path(out)
    recorded = recorded_models(out, models)
    all_slugs = _slugs(recorded)
    slugs = all_slugs[:len(models)]
    metas = [_run_meta(ref, slug, index, data, split, limit, questions, source_hash, prompt_suffix, max_new_tokens,
                       metrics) for index, (ref, slug) in enumerate(zip(refs, slugs))]
    for slug, meta in zip(slugs, metas):
        _check_resumable(out / slug, meta)
    atomic_write_json(out / "eval.json", {"data": str(Path(data).resolve()), "split": split, "limit": limit,
                                          "models": [{"ref": m, "slug": s} for m, s in zip(recorded, all_slugs)]})
    total, done_all, started = len(questions) * len(models), 0, time.perf_counter()
    if open_backend is None:
        from eval.pool import ModelPool
        # every local base of the run stays loaded until it ends: a smaller pool would close one in use
        bases = {ModelPool._engine_key(r.target, r.options) for r in refs if r.kind == "local"}
        open_backend = (pool or ModelPool(max_engines=max(2, len(bases)))).backend
    summaries: list[dict | None] = [None] * len(refs)
    members, opened = [], []
    for index, (parsed, slug, meta) in enumerate(zip(refs, slugs, metas)):
        try:
            backend = open_backend(str(parsed), **(backend_options or {}))
        except Exception as e:       # a hub id out of reach, corrupt weights, a bad endpoint name ...
            done_all += len(questions)
            summaries[index] = _model_failed(out / slug, parsed, slug, index, len(questions), metrics, e)
            continue
        (out / slug / "failed.json").unlink(missing_ok=True)
        members.append((backend, out / slug, meta))
        opened.append((index, parsed, backend))
    if members:
        local = [b for _, p, b in opened if p.kind == "local"]
        on_gpu = any(str(getattr(getattr(b, "engine", None), "device", "")).startswith("cuda") for b in local)
        # Local models answer each batch together: the batch is what fits, shared among them.
        batch = batch_size or (max(1, min(b.max_batch for b in local) // len(local)) if local else 1)
        # Two batches in flight on a GPU: one is read and tokenised while the other runs.
        workers = (2 if on_gpu else 1) if local else (concurrency or 4)
        for _, _, meta in members:
            meta["execution"] = {"batch_size": batch, "concurrency": workers}
        names = [m[2]["slug"] for m in members]

        def progress(count, info):
            nonlocal done_all
            done_all += count
            if not on_progress:
                return
            rate = info["new"] / info["elapsed_s"] if info["new"] and info["elapsed_s"] > 0 else None
            remaining = total - done_all
            on_progress(done_all, total, {"model": " + ".join(names) if len(names) < 4 else f"{len(names)} models",
                                          "n_models": len(models), "samples_per_s": rate,
                                          "eta_s": remaining / rate if rate else None,
                                          "elapsed_s": time.perf_counter() - started})

        results = run_models(questions, members, batch_size=batch, concurrency=workers, metrics=metrics,
                             on_progress=progress)
        for (index, _, _), summary in zip(opened, results):
            summaries[index] = summary
    return summaries


def _run_meta(ref: ModelRef, slug: str, index: int, data, split, limit, questions: list[dict], source_hash: str,
              prompt_suffix: str, max_new_tokens: int, metrics) -> dict:
    """What run.json records for one model (execution settings are added once the backend is open)."""
    return {"model": str(ref), "slug": slug, "model_index": index,
            "dataset": {"path": str(Path(data).resolve()), "split": split, "limit": limit,
                        "n_questions": len(questions), "questions_sha256": question_set_hash(questions),
                        "source_sha256": source_hash},
            "prompt": {"template": "{question}" + prompt_suffix, "prompt_suffix": prompt_suffix},
            "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0},
            "metrics": list(metrics)}


def read_runs(eval_dir: str | Path) -> list[tuple[Path, dict]]:
    """(model folder, summary) of every finished model run under an eval folder, baseline first."""
    eval_dir = Path(eval_dir)
    found = []
    for summary_path in sorted(eval_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        found.append((summary_path.parent, summary))
    found.sort(key=lambda pair: (pair[1].get("model_index", 99), pair[0].name))
    return found
