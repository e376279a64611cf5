"""eval.compare: both sides at once, errors kept to their side, verdicts, votes, HTML export, batch."""
import json
import time

import pytest
from PIL import Image

from eval import compare
from eval.protocol import Request


class FakeBackend:
    def __init__(self, name, pieces, delay=0.0, fail=None):
        self.name, self.pieces, self.delay, self.fail, self.max_batch = name, pieces, delay, fail, 2

    def stream(self, request):
        for piece in self.pieces:
            time.sleep(self.delay)
            yield piece
        if self.fail:
            raise RuntimeError(self.fail)

    def generate(self, requests):
        return ["".join(self.pieces)] * len(requests)


class FakePool(dict):
    """Stands in for eval.pool.ModelPool: backends by ref."""

    def backend(self, ref, **options):
        if ref not in self:
            from eval.pool import ModelPool
            self[ref] = ModelPool().backend(ref, **options)
        return self[ref]


@pytest.fixture
def fakes():
    return FakePool()


def test_a_slow_side_does_not_hold_up_the_fast_one(fakes):
    fakes["local:slow"] = FakeBackend("slow", ["a", "b", "c"], delay=0.7)
    fakes["local:fast"] = FakeBackend("fast", ["4", "2"], delay=0.01)
    start, fast_done_at, slow_text_then = time.perf_counter(), None, None
    for a, b in compare.compare_stream(["local:slow", "local:fast"], Request(None, "q"), fakes):
        if b.done and fast_done_at is None:
            fast_done_at, slow_text_then = time.perf_counter() - start, a.text
    assert fast_done_at < 0.5 and slow_text_then == ""
    assert (a.text, b.text, a.done, b.done) == ("abc", "42", True, True)
    assert "tok/s" in b.stats() and b.first_token_s is not None


def test_an_error_stays_on_its_side(fakes):
    fakes["local:bad"] = FakeBackend("bad", ["par"], fail="CUDA error: device-side assert")
    fakes["local:good"] = FakeBackend("good", ["Asia"])
    *_, (a, b) = compare.compare_stream(["local:bad", "local:good"], Request(None, "q"), fakes)
    assert "device-side assert" in a.error and "error" in a.stats()
    assert b.text == "Asia" and not b.error
    *_, (c, d) = compare.compare_stream(["", "local:good"], Request(None, "q"), fakes)
    assert c.error == "pick a model" and d.text == "Asia"


def test_missing_adapter_is_reported_on_that_side(demo_model, tmp_path):
    ref = f"local:{demo_model}+{tmp_path / 'no-such-adapter'}"
    *_, (a, b) = compare.compare_stream([ref, f"local:{demo_model}"], Request(None, "what is the total", max_new_tokens=4),
                                        FakePool())
    assert "adapter folder not found" in a.error and b.done and not b.error


def test_questions_are_checked():
    with pytest.raises(ValueError, match="type a question"):
        compare.check_question("  ")
    with pytest.raises(ValueError, match="20,000 characters; the limit is 4,000"):
        compare.check_question("x" * 20000)
    assert compare.check_question(" What is it? ") == "What is it?"


def test_typed_models_become_refs(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert compare.to_ref("chartqa-r1", "sagemaker") == "sagemaker:chartqa-r1"
    assert compare.to_ref("http://h:8000/v1#m", "openai") == "openai:http://h:8000/v1#m"
    assert compare.to_ref(str(tmp_path), "local", "base") == f"local:base+{tmp_path}"
    assert compare.to_ref("local:x+y", "sagemaker") == "local:x+y"


def test_choices_list_base_adapters_and_endpoints(tmp_path):
    (tmp_path / "runs" / "r1" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "endpoints.json").write_text(json.dumps([{"name": "ep1", "ref": "sagemaker:ep1"}]))
    adapter = tmp_path / "runs" / "r1" / "adapter"
    assert compare.model_choices(tmp_path, "B", "/x/ad") == [
        "local:B", "local:B+/x/ad", f"local:B+{adapter}", "sagemaker:ep1"]


def test_verdict_marks_need_no_emoji_font():
    # emoji (and the variation selector that asks for emoji style) show as empty boxes without an emoji font
    for text in (compare.verdict("104", ["100"]), compare.verdict("1,000", ["1000"]), compare.verdict("9", ["1"])):
        assert all(ord(c) < 0x2600 or 0x2700 <= ord(c) < 0x2705 or 0x2710 <= ord(c) < 0x2718 for c in text), text
        assert "\ufe0f" not in text


def test_verdicts_use_relaxed_accuracy():
    assert compare.verdict("104", ["100"]).startswith("✓ correct")
    assert compare.verdict("106", ["100"]).startswith("✗ wrong")
    assert "normalization" in compare.verdict("1,000", ["1000"])
    assert compare.verdict("x", []) == ""


def test_votes_append_one_line_each(tmp_path):
    result = compare.CompareResult("q", [compare.Side("local:a", "a", "1"), compare.Side("local:b", "b", "2")],
                                   "/i.png", gold=["1"], settings={"temperature": 0})
    compare.record_vote(tmp_path, "A better", " crisp ", result)
    compare.record_vote(tmp_path, "tie", "", result)
    rows = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert [r["vote"] for r in rows] == ["A better", "tie"] and rows[0]["note"] == "crisp"
    assert rows[0]["sides"][1]["text"] == "2"
    with pytest.raises(ValueError):
        compare.record_vote(tmp_path, "maybe", "", result)
    with pytest.raises(ValueError, match="compare something first"):
        compare.record_vote(tmp_path, "tie", "", None)


def test_html_export_is_self_contained_and_escaped():
    result = compare.CompareResult("Is <b> bigger?", [compare.Side("local:a", "base", "No"),
                                                      compare.Side("sagemaker:e", "tuned", error="endpoint e: ModelError")],
                                   gold=["Yes"], settings={"max_new_tokens": 16})
    page = compare.export_html(result, Image.new("RGB", (40, 30), (255, 0, 0)))
    assert "data:image/png;base64," in page and "Is &lt;b&gt; bigger?" in page
    assert "ModelError" in page and "max_new_tokens" in page and "src='http" not in page


def test_batch_runs_every_example_on_both_sides(fakes, tmp_path):
    import charts
    charts.generate(4, seed=0, out_dir=tmp_path / "ds", workers=1)
    fakes["local:a"] = FakeBackend("a", ["Yes"])
    fakes["local:b"] = FakeBackend("b", [], fail="boom")
    fakes["local:b"].generate = lambda requests: (_ for _ in ()).throw(RuntimeError("boom"))
    examples = compare.sample_examples(tmp_path / "ds", 3, seed=1)
    rows = compare.batch_compare(["local:a", "local:b"], examples, None, fakes)
    assert len(rows) == 3 and all(r["A"] == "Yes" and r["B"] == "error: boom" for r in rows)
    assert all(r["gold"] and r["A verdict"] for r in rows)
    same = compare.batch_compare(["local:a", "local:a"], examples, "How many bars?", fakes)
    assert all(r["question"] == "How many bars?" and r["gold"] == "" for r in same)


def test_closing_the_comparison_stops_both_local_sides(demo_model):
    """Stop (or a new click, or a closed tab) closes the generator: both generations leave the engine."""
    pool = FakePool()
    refs = [f"local:{demo_model}", f"local:{demo_model}"]
    backend = pool.backend(refs[0], generate_kwargs={"min_new_tokens": 300})
    pool[refs[1]] = backend
    stream = compare.compare_stream(refs, Request(None, "what is the total", max_new_tokens=300), pool)
    next(stream)
    stream.close()
    deadline = time.time() + 5
    while backend.engine.busy and time.time() < deadline:
        time.sleep(0.01)
    assert not backend.engine.busy
    start = time.perf_counter()
    assert backend.generate([Request(None, "hi", max_new_tokens=2)])
    assert time.perf_counter() - start < 1.0


def test_sides_report_the_backends_own_token_counts(demo_model):
    pool = FakePool()
    *_, (a, b) = compare.compare_stream([f"local:{demo_model}", f"local:{demo_model}"],
                                        Request(None, "what is the total", max_new_tokens=6), pool)
    assert a.exact_tokens and 1 <= a.tokens <= 6 and a.tokens == b.tokens and a.text == b.text   # it may stop early
