"""The demo studio on a CPU: cold start and Compare answer times, the issue-13 targets (<= 10 s from
`python app.py` in a fresh workspace to the first Compare answer; a 16-token answer in <= 1 s).

    python benchmarks/cpu_demo.py --out /tmp/cpu-demo                        # this checkout
    python benchmarks/cpu_demo.py --before /tmp/old-checkout --out /tmp/cpu-demo   # and another, interleaved

Cold start: `python app.py` in a fresh workspace on a free loopback port (what tests/conftest.py's
start_studio runs), timed until it serves and until gradio_client's `/run_compare` returns the first
two-sided answer (the pie example's question, base vs base + demo adapter, 16 new tokens at most). Each
start also records whether the demo dataset was finished when that answer came, and when it was.
Answers: in a child process of each checkout (its own code, and its app.py's process settings: tune_cpu,
where it has one), models opened once through
eval.pool.ModelPool, then `backend.generate` for one model and `eval.compare.compare_stream` (the Compare
tab's path) for both sides, 16 tokens forced, on the shipped example charts. "new chart" rounds use an
image no request has seen (the example with a corner square recoloured: the same work); "same chart" rounds ask
a second question about the chart of the round before (what an image-feature cache serves).
Checkouts alternate round by round, so a neighbour's burst of CPU use hits both alike; the table gives
the min and median of each, and the ratio of the medians. Load averages are recorded before each part.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("Generate the underlying data table of the chart.", "What is the title of the chart?",
             "Which category has the highest value?", "List every label and its value.")
NEW_TOKENS = 16


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- cold start
def cold_start(root: Path, workdir: Path, timeout: float = 240) -> dict:
    """One `python app.py` in a fresh workspace: seconds to serving and to the first Compare answer."""
    from gradio_client import Client, handle_file

    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=workdir))
    port, url = free_port(), None
    row = {"load": load()}
    log = open(ws / "studio.log", "w")
    start, wall = time.perf_counter(), time.time()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--workspace", str(ws)], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT, env=env())
    try:
        while url is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                url = f"http://127.0.0.1:{port}/"
            except OSError:
                if proc.poll() is not None or time.perf_counter() - start > timeout:
                    raise RuntimeError("studio did not start:\n" + (ws / "studio.log").read_text()[-3000:])
                time.sleep(0.05)
        row["serving_s"] = time.perf_counter() - start
        base = ws / "models" / "demo-llava"
        adapter = ws / "runs" / "demo-adapter" / "adapter"
        out = Client(url, verbose=False).predict(
            handle_file(str(root / "assets" / "examples" / "pie.png")), "Which mode of transport has the highest share?",
            f"local:{base}", f"local:{base}+{adapter}", "local", "local", NEW_TOKENS, 0.0, api_name="/run_compare")
        row["first_answer_s"] = time.perf_counter() - start
        row["answers"] = [out[0], out[3]]
        dataset = ws / "datasets" / "demo" / "dataset.json"
        row["dataset_done_at_answer"] = dataset.exists()
        while not dataset.exists() and time.perf_counter() - start < timeout:
            time.sleep(0.1)
        row["dataset_s"] = dataset.stat().st_mtime - wall if dataset.exists() else None    # when it was written
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return row


# ---------------------------------------------------------------- answers (child process, in `root`)
def answers(repeats: int) -> dict:
    """Timings of one checkout's code; run as `--child` with that checkout first on sys.path."""
    from PIL import Image

    from eval.compare import compare_stream
    from eval.demo import SHIPPED_ADAPTER, SHIPPED_MODEL
    from eval.pool import ModelPool
    from eval.protocol import Request

    pool = ModelPool()
    refs = [f"local:{SHIPPED_MODEL}", f"local:{SHIPPED_MODEL}+{SHIPPED_ADAPTER}"]
    base, tuned = (pool.backend(r) for r in refs)
    charts = [Image.open(ROOT / "assets" / "examples" / f"{k}.png").convert("RGB") for k in ("pie", "bar", "line")]
    counter = [0]

    def fresh_chart():
        """An example chart with a 24 px corner square recoloured: pixels no earlier request has seen (a
        single changed pixel can vanish in the processor's resize)."""
        counter[0] += 1
        image = charts[counter[0] % len(charts)].copy()
        image.paste((counter[0] * 37 % 256, counter[0] * 91 % 256, 7), (0, 0, 24, 24))
        return image

    def request(image, k=0):
        return Request(image, QUESTIONS[k % len(QUESTIONS)], max_new_tokens=NEW_TOKENS)

    extra = {"min_new_tokens": NEW_TOKENS}
    for b in (base, tuned):
        b.generate_kwargs = dict(extra)        # 16 tokens every time: an early end would flatter a side

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def compare(req) -> float:
        sides = []
        start = time.perf_counter()
        for sides in compare_stream(refs, req, pool, {"local": {"generate_kwargs": extra}}, []):
            pass
        assert all(s.done and not s.error and s.tokens == NEW_TOKENS for s in sides), sides
        return time.perf_counter() - start

    out = {k: [] for k in ("one model, new chart", "one model, same chart", "compare, new chart",
                           "compare, same chart")}
    timed(lambda: base.generate([request(fresh_chart())]))          # first-call costs, outside the timers
    for i in range(repeats):
        image = fresh_chart()
        out["one model, new chart"].append(timed(lambda: base.generate([request(image)])))
        out["one model, same chart"].append(timed(lambda: base.generate([request(image, i + 1)])))
        image = fresh_chart()
        out["compare, new chart"].append(compare(request(image)))
        out["compare, same chart"].append(compare(request(image, i + 1)))
    pool.unload(wait=5)
    return out


def run_child(root: Path, repeats: int) -> dict:
    # the studio's own process settings, where that checkout's app.py has them (before torch is imported)
    code = (f"import sys, json; sys.path.insert(0, {str(root)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); "
            f"import app; getattr(app, 'tune_cpu', lambda: None)(); "
            f"import cpu_demo; print('RESULT ' + json.dumps(cpu_demo.answers({repeats})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env(),
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"answer timings failed in {root}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------- report
def stats(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.2f} / {statistics.median(values):.2f}" if values else "-"


def table(results: dict, labels: list[str]) -> str:
    head = "| what | " + " | ".join(f"{k} s (min / median)" for k in labels) + \
           (" | ratio (median before / after) |" if len(labels) == 2 else " |")
    lines = [head, "|---|" + "---:|" * (len(labels) + (len(labels) == 2))]
    for what, by_label in results.items():
        cells = [stats(by_label.get(k, [])) for k in labels]
        ratio = ""
        if len(labels) == 2 and all(by_label.get(k) for k in labels):
            before, after = (statistics.median([v for v in by_label[k] if v is not None]) for k in labels)
            ratio = f" {before / after:.2f}x |"
        lines.append(f"| {what} | " + " | ".join(cells) + " |" + ratio)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="another checkout (e.g. `git archive COMMIT | tar -x -C DIR`) to time alike")
    p.add_argument("--starts", type=int, default=3, help="cold starts per checkout")
    p.add_argument("--repeats", type=int, default=5, help="answer rounds per checkout")
    p.add_argument("--out", required=True, help="folder for cpu_demo.json")
    args = p.parse_args()

    trees = {"after": ROOT} if not args.before else {"before": Path(args.before).resolve(), "after": ROOT}
    labels = list(trees)
    workdir = Path(tempfile.mkdtemp(prefix="cpu_demo-"))
    results: dict[str, dict[str, list]] = {}
    starts: dict[str, list] = {k: [] for k in labels}
    loads = []
    for i in range(args.starts):
        for label, root in trees.items():
            row = cold_start(root, workdir)
            starts[label].append(row)
            loads.append(row["load"])
            print(f"cold start {i + 1} {label}: serving {row['serving_s']:.2f} s, first answer "
                  f"{row['first_answer_s']:.2f} s (dataset done then: {row['dataset_done_at_answer']}), "
                  f"load {row['load']}", flush=True)
    for what, key in (("cold start to serving", "serving_s"), ("cold start to the first Compare answer",
                                                                 "first_answer_s"),
                      ("cold start to the demo dataset drawn", "dataset_s")):
        results[what] = {k: [r.get(key) for r in rows] for k, rows in starts.items()}
    answer_runs: dict[str, dict] = {}
    for label, root in trees.items():
        loads.append(load())
        answer_runs[label] = run_child(root, args.repeats)
        print(f"answers {label} done, load {load()}", flush=True)
    for what in next(iter(answer_runs.values())):
        results[f"16 tokens: {what}"] = {k: answer_runs[k][what] for k in labels}

    sys.path.insert(0, str(ROOT))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import torch
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, nproc {os.cpu_count()}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), commit {commit}, load averages {', '.join(loads)}\n")
    print(table(results, labels))
    print("\nfirst answers: " + " | ".join(f"{k}: {rows[0]['answers']}" for k, rows in starts.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from charts.io import atomic_write_text
    atomic_write_text(out / "cpu_demo.json", json.dumps(
        {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": os.cpu_count(), "commit": commit,
         "trees": {k: str(v) for k, v in trees.items()}, "loads": loads, "cold_starts": starts,
         "results": results}, indent=1))
    print(f"\nwrote {out / 'cpu_demo.json'}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
