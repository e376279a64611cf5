"""Compare tab: one image and question to two models side by side, both streaming at once.

Each side is a model ref (local:BASE, local:BASE+ADAPTER, sagemaker:ENDPOINT, openai:URL#MODEL); the
logic lives in eval.compare, the callbacks here only turn its results into component values.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import gradio as gr

from charts import list_datasets
from charts import random_example as charts_random_example
from charts.io import inside
from eval import compare
from eval.display import short_name
from eval.endpoints import WIRES
from eval.images import ImageError, load_image
from eval.protocol import Request
from eval.votes import leaderboard as votes_leaderboard
from eval.votes import read_votes
from studio.context import Studio
from studio.uploads import ChartImage

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "examples"
BACKEND_HELP = {"local": "a hub id or folder, or BASE+ADAPTER_DIR", "sagemaker": "an endpoint name",
                "openai": "URL#MODEL, e.g. http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf"}


def side_choices(studio: Studio, kind: str) -> list[tuple[str, str]]:
    """(short name, ref) pairs: the dropdown shows 'demo-llava + r1', the side gets the full ref."""
    refs = compare.model_choices(studio.workspace, studio.base, studio.adapter) if kind == "local" else \
        compare.endpoint_refs(studio.workspace)
    return [(short_name(c), c) for c in refs if c.startswith(kind + ":")]


def _max_new_tokens(studio: Studio) -> int:
    """What the loaded base's context leaves for an answer after the image and a question (at most 512)."""
    room = [e["answer_room"] for e in studio.pool.loaded() if e.get("answer_room")]
    return max(16, min([512] + room))


def _datasets(studio: Studio) -> list[str]:
    return list_datasets(studio.workspace)


def _examples() -> list[list[str]]:
    """The charts shipped in assets/examples, each with a question its data answers."""
    return [[ex["image"], ex["question"]] for ex in shipped_examples()]


def shipped_examples() -> list[dict]:
    """assets/examples/examples.json as examples like a dataset's (image path, question, gold answers), so a
    shipped chart gets a verdict like a random dataset example."""
    rows = json.loads((ASSETS / "examples.json").read_text())
    return [{"id": f"example:{Path(r['image']).stem}", "image": str(ASSETS.parent.parent / r["image"]),
             "question": r["question"], "answers": [str(r["answer"])], "family": r.get("family", ""),
             "chart_type": Path(r["image"]).stem} for r in rows]


def example_gold(image, question) -> tuple[str, dict]:
    """The gold line and the `example` state for a clicked shipped example (matched by its question)."""
    ex = next((e for e in shipped_examples() if e["question"] == question), None)
    if ex is None:
        return "", {}
    return f"**Gold:** {' | '.join(ex['answers'])} · {ex['chart_type']} · {ex['family']}", ex


def votes_table_rows(studio: Studio):
    """The votes leaderboard as a table: short name first, win rate and its interval, Bradley-Terry strength."""
    import pandas as pd

    board = votes_leaderboard(read_votes(studio.workspace))
    columns = ["model", "win rate (%)", "95% CI (%)", "BT strength", "games", "wins", "losses", "ties", "both bad",
               "model ref"]
    return pd.DataFrame([[short_name(r["model"]), r["win_rate"], f"{r['ci95_low']:.0f}-{r['ci95_high']:.0f}",
                          r["bt_strength"], r["games"], r["wins"], r["losses"], r["ties"], r["both_bad"], r["model"]]
                         for r in board], columns=columns)


def _side_panel(studio: Studio, label: str, default: str):
    with gr.Column():
        kind = gr.Radio(list(compare.KINDS), value=default.split(":", 1)[0], label=f"Side {label} backend")
        model = gr.Dropdown([c for k in compare.KINDS for c in side_choices(studio, k)],
                            value=default,
                            allow_custom_value=True, label=f"Side {label} model",
                            info="pick, or type " + "; ".join(f"{k}: {v}" for k, v in BACKEND_HELP.items()))
        answer = gr.Textbox(label=f"Answer {label}", lines=4, interactive=False, elem_classes="answer")
        verdict = gr.Markdown()
        stats = gr.Markdown()
    return kind, model, answer, verdict, stats


def build(studio: Studio) -> dict:
    default_a = f"local:{studio.base}"
    default_b = f"local:{studio.base}+{studio.adapter}" if studio.adapter else default_a
    datasets = _datasets(studio)
    result = gr.State(None)
    with gr.Row():
        kind_a, side_a, answer_a, verdict_a, stats_a = _side_panel(studio, "A", default_a)
        kind_b, side_b, answer_b, verdict_b, stats_b = _side_panel(studio, "B", default_b)
    with gr.Row():
        image = ChartImage(type="filepath", sources=["upload", "clipboard"], label="Chart", height=320,
                           scale=2)     # the raw upload, checked by load_image
        with gr.Column(scale=3):
            question = gr.Textbox(label="Question", lines=2, max_lines=6,
                                  placeholder="e.g. What is the value of the highest bar?")
            gold = gr.Markdown()
            example = gr.State({})
            with gr.Row():
                dataset = gr.Dropdown(datasets, value=datasets[0] if datasets else None, allow_custom_value=True,
                                      label="Dataset for examples", scale=3)
                random_button = gr.Button("Random example", scale=1)
            with gr.Row():
                max_new_tokens = gr.Slider(1, _max_new_tokens(studio), value=64, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                wire = gr.Dropdown(["recorded", *WIRES], value="recorded", label="Endpoint wire",
                                   info="sagemaker sides: as recorded at deploy, or the format of one deployed elsewhere")
            with gr.Row():
                run = gr.Button("Compare", variant="primary")
                regenerate = gr.Button("Regenerate")
                stop = gr.Button("Stop")
            with gr.Row():
                pool_status = gr.Markdown()
                unload_button = gr.Button("Unload models", size="sm", scale=0)
    # a click fills the chart and question, then sets the gold as "Random example" does: verdicts follow
    gr.Examples(_examples(), inputs=[image, question], label="Example charts (assets/examples)", fn=example_gold,
                elem_id="example-charts",
                outputs=[gold, example], run_on_click=True, cache_examples=False)
    with gr.Row():
        votes = [gr.Button(v, size="sm") for v in compare.VOTES]
        note = gr.Textbox(placeholder="note (optional)", show_label=False, scale=3)
        blind = gr.Checkbox(False, label="Blind: hide the models and shuffle the sides until the vote", scale=2)
    blind_state = gr.State(False)
    vote_status = gr.Markdown()
    with gr.Accordion("Votes leaderboard (workspace/votes.jsonl)", open=False):
        votes_table = gr.Dataframe(votes_table_rows(studio), interactive=False, wrap=True)
        votes_refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        export_button = gr.Button("Export HTML", size="sm")
        export_file = gr.File(label="Export", interactive=False)
    with gr.Accordion("Batch: one question (or each example's own) over N random dataset examples", open=False):
        with gr.Row():
            batch_n = gr.Number(10, precision=0, minimum=1, maximum=500, label="Examples")
            batch_seed = gr.Number(0, precision=0, label="Seed")
            batch_question = gr.Textbox(label="Question for all (empty: each example's own, scored)", scale=3)
            batch_run = gr.Button("Run batch", variant="primary")
        batch_status = gr.Markdown()
        batch_table = gr.Dataframe(interactive=False, wrap=True)

    # ---- callbacks ----
    def pick_kind(kind):
        choices = side_choices(studio, kind)
        return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)

    def random_example(name):
        if not name:
            return gr.update(), gr.update(), "pick a dataset (workspace/datasets is empty?)", {}
        try:     # a workspace dataset by name; its images stay inside its folder (charts.random_example)
            folder = inside(studio.path("datasets"), name)
            if name not in list_datasets(studio.workspace):
                raise ValueError(f"no dataset {name!r} in the workspace")
            ex = charts_random_example(folder, random.Random(time.time_ns()))
            load_image(ex["image"])      # only a real image within limits goes back to the browser
        except Exception as e:           # noqa: BLE001 - a message, not a crash
            return gr.update(), gr.update(), f"cannot draw an example: {e}", {}
        golds = " | ".join(map(str, ex.get("answers", [])))
        return ex["image"], ex["question"], f"**Gold:** {golds} · {ex.get('chart_type', '')} · {ex.get('family', '')}", ex

    latest: dict[str, object] = {}         # session -> its newest run: a new click ends the older one

    def run_compare(img_path, q, ref_a, ref_b, kind_a_, kind_b_, max_new, temp, ex, wire_, blind_=False,
                    request: gr.Request = None):
        try:
            q = compare.check_question(q)
            img = load_image(img_path) if img_path else None
        except (ValueError, ImageError) as e:
            yield ("", "", f"**{e}**", "", "", f"**{e}**", None)
            return
        golds = list(map(str, ex.get("answers", []))) if ex and ex.get("question") == q else []
        refs = []
        for ref, kind in ((ref_a, kind_a_), (ref_b, kind_b_)):
            try:
                refs.append(compare.to_ref(ref, kind, studio.base))
            except ValueError:
                refs.append("")           # that side reports "pick a model"; the other still runs
        request_ = Request(img, q, max_new_tokens=int(max_new), temperature=float(temp))
        settings = {"max_new_tokens": int(max_new), "temperature": float(temp)}
        if blind_:      # shown side k runs real side order[k]; the vote maps back (eval.compare.unblind)
            settings["blind_order"] = compare.blind_order(random.Random(time.time_ns()))
            refs = [refs[i] for i in settings["blind_order"]]
        session, token = getattr(request, "session_hash", None) or "", object()
        latest[session] = token
        stream = compare.compare_stream(refs, request_, studio.pool, studio.backend_options(wire_), golds)
        try:
            for sides in stream:
                if latest.get(session) is not token:
                    return                # a newer Compare click in this session took over
                out = []
                for s in sides:
                    out += [s.text if not s.error else "", s.verdict,
                            (f"**{s.error}**\n\n" if s.error else "") + s.stats()]
                yield (*out, compare.CompareResult(q, sides, img_path, ex.get("id") if golds else None, golds,
                                                   settings))
        finally:
            stream.close()                # ends both sides' generations (Stop, a new click, a closed tab)

    def stopped(*stats):
        return [s.replace(" · streaming", " · stopped").replace("waiting…", "stopped") for s in stats]

    def vote(label, note_text, res):
        try:
            row = compare.record_vote(studio.workspace, label, note_text or "", res)
        except ValueError as e:
            return f"**{e}**", note_text
        shown = " · ".join(f"{label_} was **{short_name(s.ref)}**" for label_, s in zip("AB", res.sides))
        reveal = f" · revealed: {shown}" if row["blind"] else ""
        return f"vote recorded: **{label}**{reveal} → workspace/votes.jsonl", ""     # a full path runs off-screen

    def export(res):
        if res is None:
            return None
        img = load_image(res.image) if res.image else None
        path = studio.path("exports", f"compare-{time.strftime('%Y%m%d-%H%M%S')}.html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(compare.export_html(res, img), encoding="utf-8")
        return str(path)

    def unload():
        count = studio.pool.unload()
        return f"unloaded {count} model(s); the next Compare loads what it needs"

    def run_batch(name, n, seed, q, ref_a, ref_b, kind_a_, kind_b_, max_new, wire_, progress=gr.Progress()):
        try:
            examples = compare.sample_examples(inside(studio.path("datasets"), name or ""), int(n), int(seed))
            refs = [compare.to_ref(ref_a, kind_a_, studio.base), compare.to_ref(ref_b, kind_b_, studio.base)]
            q = compare.check_question(q) if q and q.strip() else None
        except Exception as e:           # noqa: BLE001
            return f"**{e}**", None
        rows = compare.batch_compare(refs, examples, q, studio.pool, int(max_new), studio.backend_options(wire_),
                                     on_progress=lambda side, done, total: progress(done / total, desc=f"side {side}"))
        import pandas as pd
        table = pd.DataFrame(rows)    # verdicts first: a narrow table still shows who was right
        table = table[[c for c in ("A verdict", "B verdict", "A", "B", "question", "gold", "chart_type", "id")
                       if c in table.columns]]
        return f"{len(rows)} examples · A = {short_name(refs[0])} · B = {short_name(refs[1])}", table

    # ---- wiring ----
    kind_a.change(pick_kind, inputs=kind_a, outputs=side_a)
    kind_b.change(pick_kind, inputs=kind_b, outputs=side_b)
    random_button.click(random_example, inputs=dataset, outputs=[image, question, gold, example])
    inputs = [image, question, side_a, side_b, kind_a, kind_b, max_new_tokens, temperature, example, wire, blind_state]
    outputs = [answer_a, verdict_a, stats_a, answer_b, verdict_b, stats_b, result]
    runs = [button.click(run_compare, inputs=inputs, outputs=outputs, concurrency_limit=None)
            for button in (run, regenerate)]
    runs.append(question.submit(run_compare, inputs=inputs, outputs=outputs, concurrency_limit=None))
    stop.click(stopped, inputs=[stats_a, stats_b], outputs=[stats_a, stats_b], cancels=runs)
    unload_button.click(unload, outputs=pool_status)
    for button in votes:
        button.click(vote, inputs=[button, note, result], outputs=[vote_status, note]
                     ).then(lambda: votes_table_rows(studio), outputs=votes_table)
    votes_refresh.click(lambda: votes_table_rows(studio), outputs=votes_table, api_name="votes_leaderboard")
    # blind: the model pickers hide (their values still run), the sides shuffle at each Compare
    blind.change(lambda b: (b, *[gr.update(visible=not b)] * 4), inputs=blind,
                 outputs=[blind_state, kind_a, side_a, kind_b, side_b], api_name="compare_blind")
    export_button.click(export, inputs=result, outputs=export_file)
    batch_run.click(run_batch, inputs=[dataset, batch_n, batch_seed, batch_question, side_a, side_b, kind_a, kind_b,
                                       max_new_tokens, wire], outputs=[batch_status, batch_table])

    def lists():     # adapters, endpoints, datasets and votes made since the studio started
        models = [c for k in compare.KINDS for c in side_choices(studio, k)]
        return (gr.Dropdown(choices=models), gr.Dropdown(choices=models), gr.Dropdown(choices=_datasets(studio)),
                votes_table_rows(studio))

    return {"on_load": [(lists, None, [side_a, side_b, dataset, votes_table])], "side_a": side_a, "side_b": side_b,
            "image": image, "question": question,
            "kind_a": kind_a, "kind_b": kind_b, "answer_a": answer_a, "answer_b": answer_b, "run": run}
