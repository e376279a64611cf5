"""Build a chart-QA dataset on disk, and read LLaVA-format datasets back.

Layout of `out_dir` (see DESIGN.md "On disk"):
    images/000000.png ...      one PNG per chart, written atomically
    train.jsonl val.jsonl test.jsonl   LLaVA records, written atomically at the end
    dataset.json               manifest: seed, settings, counts per split / kind / family
    .generate.json             the settings a run started with (a resumed run must match)
    .progress.jsonl            journal, one line per finished chart: a killed run resumes from it
    .paraphrase.jsonl          journal of Bedrock rewordings (only with paraphrase=True)

Records are single-turn by default (one question per record, several records per image). With
multi_turn=True each image gets ONE record whose conversation holds all its questions; its
`family`, `answer_type` and `tolerance` fields are then lists aligned with the gpt turns.
Every chart i is drawn from random.Random(f"{seed}:{i}"), so output does not depend on worker
count or completion order, and splits are assigned per image from the seed alone. Likewise, which
train/val records end with SHORT_ANSWER_INSTRUCTION (instruct_share) follows from seed and record id.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

from .io import append_jsonl, atomic_write_bytes, atomic_write_json, inside, write_jsonl
from .questions import FAMILIES, make_questions
from .spec import KINDS, LOOKS, sample_spec

SPLITS = ("train", "val", "test")
IMAGE_TOKEN = "<image>"
FORMAT_VERSION = 1
# The short-answer instruction LLaVA-1.5 trains with and VLMEvalKit's ChartQA prompt appends; the
# benchmark runner (eval.run.DEFAULT_SUFFIX) appends this very string to every question by default.
SHORT_ANSWER_INSTRUCTION = "\nAnswer the question using a single word or phrase."
INSTRUCT_SPLITS = ("train", "val")


# ---------------------------------------------------------------- one chart (runs in workers)
def make_chart(index: int, settings: dict, out_dir: str | None = None) -> dict:
    """Render chart `index` (writing images/NNNNNN.png under out_dir if given) and pick its QAs."""
    from .render import render
    rng = random.Random(f"{settings['seed']}:{index}")
    kinds = settings["kinds"]
    kind = kinds[index % len(kinds)]
    spec = sample_spec(kind, rng, settings.get("look", "default"))
    png = render(spec)
    qas = make_questions(spec, rng, settings["families"])
    rng.shuffle(qas)
    qas = qas[:settings["qa_per_chart"]]
    image = f"images/{index:06d}.png"
    if out_dir is not None:
        atomic_write_bytes(Path(out_dir) / image, png)
    return {"index": index, "image": image, "kind": kind, "qas": [q.to_dict() for q in qas]}


def _make_charts(indices: list[int], settings: dict, out_dir: str) -> list[dict]:
    return [make_chart(i, settings, out_dir) for i in indices]


def _die_with(parent_pid: int) -> None:
    """Worker initializer: exit as soon as the generating process ends, however it ends.

    Workers are children of the forkserver, not of the generating process, and each holds the pipe
    that keeps the forkserver alive; after a SIGKILL of the parent nobody would ever end them. A pidfd
    becomes readable when the parent exits (even as an unreaped zombie) and cannot be fooled by pid
    reuse; where there is none, poll the pid."""
    def watch():
        try:
            fd = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):    # not Linux >= 5.3
            while True:
                time.sleep(0.5)
                try:
                    os.kill(parent_pid, 0)
                except ProcessLookupError:
                    os._exit(1)
        import select
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _pool_context():
    """forkserver where available: workers fork from a clean server that has matplotlib imported,
    so they start fast and never inherit a UI's threads; spawn elsewhere."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["charts.render", "charts.questions", "matplotlib.figure",
                                    "matplotlib.backends.backend_agg"])
        return ctx
    return multiprocessing.get_context("spawn")


# ---------------------------------------------------------------- splits and records
def assign_splits(n: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[int, str]:
    """Chart index -> split, from the seed alone (so a resumed run gets the same split)."""
    total = sum(fractions)
    order = list(range(n))
    random.Random(f"{seed}:split").shuffle(order)
    n_train = round(n * fractions[0] / total)
    n_val = round(n * fractions[1] / total)
    out = {}
    for pos, i in enumerate(order):
        out[i] = "train" if pos < n_train else "val" if pos < n_train + n_val else "test"
    return out


def instructed(record_id: str, seed: int, share: float) -> bool:
    """Whether record `record_id` gets SHORT_ANSWER_INSTRUCTION: a draw from the seed and the id alone,
    so the choice does not depend on worker count or order."""
    return share > 0 and random.Random(f"{seed}:instruct:{record_id}").random() < share


def _records(row: dict, split: str, seed: int, multi_turn: bool, instruct_share: float = 0.0) -> list[dict]:
    qas, kind, image = row["qas"], row["kind"], row["image"]
    if not qas:
        return []
    base = f"s{seed}-{row['index']:06d}"
    share = instruct_share if split in INSTRUCT_SPLITS else 0.0

    def first_question(record_id: str, question: str) -> str:
        return question + SHORT_ANSWER_INSTRUCTION if instructed(record_id, seed, share) else question

    if multi_turn:
        conv = []
        for k, q in enumerate(qas):
            text = first_question(base, q["question"]) if k == 0 else q["question"]
            conv.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + text})
            conv.append({"from": "gpt", "value": q["answer"]})
        rec = {"id": base, "image": image, "conversations": conv, "chart_type": kind,
               "family": [q["family"] for q in qas], "answer_type": [q["answer_type"] for q in qas], "split": split}
        if any(q["tolerance"] is not None for q in qas):
            rec["tolerance"] = [q["tolerance"] for q in qas]
        return [rec]
    out = []
    for k, q in enumerate(qas):
        rec_id = f"{base}-{k}"
        rec = {"id": rec_id, "image": image,
               "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{first_question(rec_id, q['question'])}"},
                                 {"from": "gpt", "value": q["answer"]}],
               "chart_type": kind, "family": q["family"], "answer_type": q["answer_type"], "split": split}
        if q["tolerance"] is not None:
            rec["tolerance"] = q["tolerance"]
        out.append(rec)
    return out


# ---------------------------------------------------------------- generate
def generate(n: int, kinds=None, seed: int = 0, out_dir="workspace/datasets/charts", workers: int = 1,
             on_progress=None, *, families=None, split=(0.8, 0.1, 0.1), multi_turn: bool = False,
             qa_per_chart: int = 3, paraphrase: bool = False, bedrock_model: str | None = None,
             bedrock_region: str | None = None, bedrock_endpoint_url: str | None = None,
             instruct_share: float = 0.5, overwrite: bool = False, look: str = "default") -> dict:
    """Generate `n` charts with their QA into `out_dir`; returns the manifest (also dataset.json).

    Re-running with the same arguments resumes a killed run (finished charts are skipped) or, when
    the dataset is complete, rewrites the same files. Different arguments on an existing folder
    raise ValueError unless overwrite=True. on_progress(done, total) is called as charts finish.

    instruct_share (0..1) of train/val records get SHORT_ANSWER_INSTRUCTION appended to their first
    question, chosen from the seed and record id; test questions stay bare. The benchmark runner appends
    that instruction to every question, so a model trained on bare questions only would be scored on a
    prompt it never saw; the mix teaches it both forms (0 disables, 1 instructs every train/val record).
    """
    # None means every kind / family; an empty choice (nothing ticked) is a mistake, not "all"
    kinds = list(KINDS if kinds is None else kinds)
    families = list(FAMILIES if families is None else families)
    if not kinds or not families:
        raise ValueError(f"choose at least one {'chart kind' if not kinds else 'question family'}")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown chart kind {k!r}; choose from {', '.join(KINDS)}")
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"unknown question family {f!r}; choose from {', '.join(FAMILIES)}")
    split = tuple(float(x) for x in split)
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise ValueError("split must be three non-negative fractions, e.g. 0.8,0.1,0.1")
    if n < 1 or qa_per_chart < 1:
        raise ValueError("n and qa_per_chart must be at least 1")
    instruct_share = float(instruct_share)
    if not 0.0 <= instruct_share <= 1.0:
        raise ValueError("instruct_share must be between 0 and 1")
    out = Path(out_dir)
    settings = {"version": FORMAT_VERSION, "n": n, "seed": seed, "kinds": kinds, "families": families,
                "split": list(split), "multi_turn": multi_turn, "qa_per_chart": qa_per_chart,
                "paraphrase": bool(paraphrase), "bedrock_model": bedrock_model if paraphrase else None,
                "instruct_share": instruct_share}
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}; choose from {', '.join(LOOKS)}")
    if look != "default":       # e.g. "demo", the demo model's charts; absent, a default set's marker is unchanged
        settings["look"] = look
    _prepare(out, settings, overwrite)

    journal = out / ".progress.jsonl"
    done = {r["index"]: r for r in _read_journal(journal) if (out / r["image"]).exists()}
    todo = [i for i in range(n) if i not in done]
    started = time.time()
    if on_progress:
        on_progress(len(done), n)

    def record(rows):
        for row in rows:
            append_jsonl(journal, row)
            done[row["index"]] = row
        if on_progress:
            on_progress(len(done), n)

    chunk = max(1, min(16, len(todo) // max(1, workers * 4)))
    chunks = [todo[k:k + chunk] for k in range(0, len(todo), chunk)]
    if workers <= 1:
        for c in chunks:
            record(_make_charts(c, settings, str(out)))
    elif chunks:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_die_with,
                                   initargs=(os.getpid(),))
        try:
            futures = [pool.submit(_make_charts, c, settings, str(out)) for c in chunks]
            for fut in as_completed(futures):
                record(fut.result())
        finally:
            # on an error or Ctrl-C, drop queued chunks instead of waiting for them
            pool.shutdown(wait=True, cancel_futures=True)

    notes = []
    rows = [done[i] for i in range(n)]
    if paraphrase:
        notes += _paraphrase(out, rows, bedrock_model, bedrock_region, bedrock_endpoint_url)
    splits = assign_splits(n, seed, split)
    by_split = {s: [] for s in SPLITS}
    for row in rows:
        by_split[splits[row["index"]]].extend(_records(row, splits[row["index"]], seed, multi_turn, instruct_share))
    for s in SPLITS:
        write_jsonl(out / f"{s}.jsonl", by_split[s])
    empty = sum(1 for r in rows if not r["qas"])
    if empty:
        notes.append(f"{empty} charts got no question from the chosen families (kind/family mismatch); "
                     "their images are not referenced by any record")
    manifest = _manifest(out, settings, rows, splits, by_split, notes, time.time() - started)
    atomic_write_json(out / "dataset.json", manifest)
    return manifest


def _read_journal(path: Path, fields: tuple = ("index", "image")) -> list[dict]:
    """Rows of a journal (finished charts, or paraphrases). A journal is only a cache (a chart can be
    drawn again from the seed), so a torn or garbled line is dropped rather than fatal; the file is
    rewritten without it, so the next append starts on a fresh line instead of gluing itself to the
    torn one (which would break every later run)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, bad = [], 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and all(k in row for k in fields):
            rows.append(row)
        else:
            bad += 1
    if bad or (raw and not raw.endswith(b"\n")):
        write_jsonl(path, rows)
    return rows


def _prepare(out: Path, settings: dict, overwrite: bool) -> None:
    marker = out / ".generate.json"
    if marker.exists() and not overwrite:
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(f"{out} holds a dataset made with other settings ({', '.join(changed)}); "
                             "choose another output folder or pass overwrite=True (--overwrite)")
    elif overwrite or (out.exists() and any(out.glob("*.jsonl"))):
        if not overwrite and not marker.exists():
            raise ValueError(f"{out} already holds JSONL files not made by this generator; "
                             "choose another output folder or pass overwrite=True (--overwrite)")
        for p in [*out.glob("images/*.png"), *out.glob("*.jsonl"), *out.glob(".*.jsonl"), out / "dataset.json"]:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("images/.*.tmp"):       # half-written images of a killed run
        tmp.unlink(missing_ok=True)
    atomic_write_json(marker, settings)


def _paraphrase(out: Path, rows: list[dict], model: str | None, region, endpoint_url) -> list[str]:
    from . import paraphrase as para
    ok, message = para.bedrock_status()
    if not ok:
        return [message]
    journal = out / ".paraphrase.jsonl"
    cached = {r["key"]: r for r in _read_journal(journal, ("key", "original", "question", "status"))}
    client = para.make_client(region, endpoint_url)
    todo = [(row, k, q) for row in rows for k, q in enumerate(row["qas"]) if f"{row['index']}:{k}" not in cached]
    for start in range(0, len(todo), 32):
        batch = todo[start:start + 32]
        results = para.paraphrase_many([(q["question"], tuple(q.get("keep", ()))) for _, _, q in batch], client,
                                       model or para.DEFAULT_MODEL)
        for (row, k, q), (text, status) in zip(batch, results):
            entry = {"key": f"{row['index']}:{k}", "original": q["question"], "question": text, "status": status}
            append_jsonl(journal, entry)
            cached[entry["key"]] = entry
    statuses = Counter()
    for row in rows:
        for k, q in enumerate(row["qas"]):
            entry = cached[f"{row['index']}:{k}"]
            if entry["original"] == q["question"]:
                q["question"] = entry["question"]
            statuses[entry["status"].split(":")[0]] += 1
    return [f"paraphrase results: {dict(statuses)}"]


def _manifest(out: Path, settings: dict, rows, splits, by_split, notes, seconds) -> dict:
    images = {s: len({r["image"] for r in by_split[s]}) for s in SPLITS}
    questions = {s: sum(sum(1 for t in r["conversations"] if t["from"] == "gpt") for r in by_split[s]) for s in SPLITS}
    return {
        "name": out.name,
        "format": "llava",
        "seed": settings["seed"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kinds": settings["kinds"],
        "families": settings["families"],
        "settings": settings,
        "files": {s: f"{s}.jsonl" for s in SPLITS},
        "counts": {
            "charts": len(rows),
            "images": images,
            "records": {s: len(by_split[s]) for s in SPLITS},
            "questions": questions,
            "kinds": dict(Counter(r["kind"] for r in rows if r["qas"])),
            "families": dict(Counter(q["family"] for r in rows for q in r["qas"])),
            "answer_types": dict(Counter(q["answer_type"] for r in rows for q in r["qas"])),
        },
        "seconds": round(seconds, 2),
        "notes": notes,
    }


# ---------------------------------------------------------------- reading LLaVA data (ours or anyone's)
def read_records(path) -> list[tuple[dict, str | None, Path, int]]:
    """(record, split, base folder for images, line or position) for a dataset folder, a .jsonl
    or a .json array. Lenient about JSON array vs JSON Lines; `validate` reports such mix-ups."""
    path = Path(path)
    if path.is_dir():
        files = [path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").exists()]
        files = files or sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.name != "dataset.json")
    else:
        files = [path]
    out = []
    for f in files:
        split = f.stem if f.stem in SPLITS else None
        for line, rec in parse_records_file(f):
            out.append((rec, rec.get("split", split) if isinstance(rec, dict) else split, f.parent, line))
    return out


def parse_records_file(path: Path) -> list[tuple[int, dict]]:
    """(line or position, record) from a JSON array or JSON Lines file, whatever its extension."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return list(enumerate(json.loads(text), 1))
    return [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def resolve_image(base: Path, image: str) -> Path:
    """The file a record's `image` names, looked up in `base` (the folder of the data file) and then in
    `base/images`. An absolute path, or one with `..` or a symlink that leads out of `base`, raises
    ValueError: a dataset (an upload, say) must never make us read or show any other file."""
    if not str(image).strip():
        raise ValueError("the record names no image")
    if Path(image).is_absolute():
        raise ValueError(f"image {image!r} refused: an absolute path (images are named relative to the dataset "
                         "folder)")
    try:
        first = inside(base, image)
        for candidate in (first, inside(base, Path("images") / image)):
            if candidate.exists():
                return candidate
    except ValueError as e:
        raise ValueError(f"image {image!r} refused: it leads out of the dataset folder ({e})") from None
    return first


def _at(value, k: int):
    return value[k] if isinstance(value, list) else value


def load_qa(path_or_dataset_dir, split: str | None = None) -> list[dict]:
    """One dict per question: {id, image (absolute path), question (no <image> token), answers,
    chart_type, family, answer_type, split[, tolerance][, image_error]}. Ids are the record id, or
    'recordid#turnN' (N from 1) for records with several questions. A record whose image lies outside
    its dataset folder gets image "" and `image_error` (the file is never opened)."""
    items = []
    for rec, rec_split, base, _line in read_records(path_or_dataset_dir):
        if split and rec_split != split:
            continue
        conv = rec.get("conversations", [])
        pairs = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv) - 1, 2)
                 if conv[k].get("from") == "human" and conv[k + 1].get("from") == "gpt"]
        for k, (q, a) in enumerate(pairs):
            try:
                image, image_error = str(resolve_image(base, str(rec.get("image") or ""))), None
            except ValueError as e:     # kept as a question, so a benchmark counts it as an error row
                image, image_error = "", str(e)
            item = {
                "id": str(rec.get("id")) if len(pairs) == 1 else f"{rec.get('id')}#turn{k + 1}",
                "image": image,
                "question": q.replace(IMAGE_TOKEN, "").strip(),
                "answers": [a],
                "chart_type": rec.get("chart_type"),
                "family": _at(rec.get("family"), k),
                "answer_type": _at(rec.get("answer_type"), k),
                "split": rec_split,
            }
            tol = _at(rec.get("tolerance"), k)
            if tol is not None:
                item["tolerance"] = tol
            if image_error:
                item["image_error"] = image_error
            items.append(item)
    return items


def random_example(dataset_dir, rng_or_seed=None) -> dict:
    """One load_qa item, from the test split when there is one, whose image lies inside the dataset's
    folder (an example is shown to the user: a record pointing elsewhere must not read that file)."""
    rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)
    folder = Path(dataset_dir) if Path(dataset_dir).is_dir() else Path(dataset_dir).parent
    usable = lambda items: [i for i in items if "image_error" not in i and _within(folder, i["image"])]  # noqa: E731
    items = usable(load_qa(dataset_dir, split="test")) or usable(load_qa(dataset_dir))
    if not items:
        raise ValueError(f"no questions with an image inside its folder in {dataset_dir}")
    return rng.choice(items)


def _within(folder: Path, image: str) -> bool:
    from .io import inside
    try:
        return bool(inside(folder, image))
    except ValueError:
        return False


def list_datasets(workspace) -> list[str]:
    """Names of the dataset folders under WORKSPACE/datasets/."""
    root = Path(workspace) / "datasets"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and ((p / "dataset.json").exists() or any((p / f"{s}.jsonl").exists() for s in SPLITS)))


def dataset_gallery(dataset_dir, limit: int = 60) -> list[tuple[str, list[dict]]]:
    """(absolute image path, its questions) for the first `limit` images, for previews."""
    by_image: dict[str, list[dict]] = {}
    for item in load_qa(dataset_dir):
        if "image_error" in item:
            continue
        if item["image"] in by_image or len(by_image) < limit:
            by_image.setdefault(item["image"], []).append(item)
    return list(by_image.items())


def progress_bar(stream=None):
    """An on_progress callback that draws a text bar with rate and ETA (stderr by default)."""
    import sys
    stream = stream or sys.stderr
    state = {"t0": None, "n0": 0}

    def show(done: int, total: int):
        now = time.time()
        if state["t0"] is None:
            state["t0"], state["n0"] = now, done
        rate = (done - state["n0"]) / max(now - state["t0"], 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / max(total, 1))
        eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:6.1f}/s ETA {eta_text}")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show

