"""The Compare tab in a running Gradio app, driven through gradio_client on loopback."""
import pytest

from conftest import ROOT, free_port

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def app(demo_model, tmp_path_factory):
    import charts
    from studio import compare_tab
    from studio.context import Studio
    from test_local_backend import make_adapter

    workspace = tmp_path_factory.mktemp("workspace")
    make_adapter(demo_model, workspace / "runs" / "r1" / "adapter")
    charts.generate(4, seed=0, out_dir=workspace / "datasets" / "tiny", workers=1)
    studio = Studio(workspace, str(demo_model), str(workspace / "runs" / "r1" / "adapter"))
    with gr.Blocks() as demo:
        with gr.Tab("Compare"):
            parts = compare_tab.build(studio)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield demo, parts, studio, f"http://127.0.0.1:{port}/"
    demo.close()


def test_build_returns_the_components_other_tabs_wire_to(app):
    _, parts, studio, _ = app
    assert {"side_a", "side_b", "image", "question"} <= set(parts)
    assert parts["side_a"].value == f"local:{studio.base}"
    assert parts["side_b"].value == f"local:{studio.base}+{studio.adapter}"


def test_compare_streams_both_sides_and_votes_and_exports(app):
    from gradio_client import Client, handle_file

    _, _, studio, url = app
    client = Client(url, verbose=False)
    image, question, gold = client.predict("tiny", api_name="/random_example")
    assert "Gold" in gold and question
    # the shipped bar chart: the demo model reads it, and the random adapter changes its answer there
    chart, question = str(ROOT / "assets" / "examples" / "bar.png"), "What is the number of active users in 2020?"
    out = client.predict(handle_file(chart), question,
                         f"local:{studio.base}", f"local:{studio.base}+{studio.adapter}", "local", "local", 8, 0.0,
                         api_name="/run_compare")
    answer_a, verdict_a, stats_a, answer_b, verdict_b, stats_b = out[:6]
    assert answer_a and answer_b and answer_a != answer_b
    assert "tok/s" in stats_a and "tok/s" in stats_b
    status, _ = client.predict("A better", "looks right", api_name="/vote")
    assert "vote recorded" in status and (studio.workspace / "votes.jsonl").exists()
    assert "workspace/votes.jsonl" in status and str(studio.workspace) not in status      # relative, short
    exported = client.predict(api_name="/export")
    assert exported


def test_errors_show_on_their_own_side(app):
    from gradio_client import Client

    _, _, studio, url = app
    client = Client(url, verbose=False)
    out = client.predict(None, "what is the total", f"local:{studio.base}+/no/such/adapter", f"local:{studio.base}",
                         "local", "local", 4, 0.0, api_name="/run_compare")
    assert "adapter folder not found" in out[2] and out[3]
    out = client.predict(None, "x" * 20000, f"local:{studio.base}", f"local:{studio.base}", "local", "local", 4, 0.0,
                         api_name="/run_compare")
    assert "limit is 4,000" in out[2] and "limit is 4,000" in out[5]


def test_every_shipped_example_carries_its_gold_answer_for_a_verdict():
    from studio.compare_tab import example_gold, shipped_examples

    examples = shipped_examples()
    assert examples and all(e["answers"] and e["answers"][0] for e in examples)
    for e in examples:
        line, state = example_gold(e["image"], e["question"])
        assert line.startswith("**Gold:** ") and state["answers"] == e["answers"] and state["question"] == e["question"]
    assert example_gold(None, "a question of my own") == ("", {})


def test_a_blind_comparison_reveals_the_sides_at_the_vote_and_records_the_winner(app):
    import json

    from gradio_client import Client

    _, _, studio, url = app
    base, tuned = f"local:{studio.base}", f"local:{studio.base}+{studio.adapter}"
    client = Client(url, verbose=False)
    client.predict(True, api_name="/compare_blind")
    client.predict(None, "What is the highest value?", base, tuned, "local", "local", 4, 0.0, api_name="/run_compare")
    status, _ = client.predict("A better", "", api_name="/vote")
    assert "revealed: A was" in status and "B was" in status
    row = json.loads((studio.workspace / "votes.jsonl").read_text().splitlines()[-1])
    assert row["blind"] and row["models"] == [base, tuned] and row["winner"] in (base, tuned)
    assert row["winner"] == row["sides"][0]["ref"]             # the side shown as A won
    board = client.predict(api_name="/votes_leaderboard")
    assert {"win rate (%)", "95% CI (%)", "BT strength"} <= set(board["headers"])


def test_example_thumbnails_are_styled_to_show_the_whole_chart(app):
    # gradio draws example images with object-fit: cover in a square, which crops wide charts
    from studio.app import CSS

    demo = app[0]
    assert any(c.get("props", {}).get("elem_id") == "example-charts" for c in demo.config["components"])
    assert "#example-charts img { object-fit: contain; }" in CSS
