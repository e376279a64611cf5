"""Bedrock paraphrasing against botocore's Stubber and a fake Bedrock server on 127.0.0.1.
Fake credentials only; nothing leaves the machine."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

import charts
from charts import paraphrase as para
from charts.io import read_jsonl

MODEL = "us.meta.llama3-3-70b-instruct-v1:0"
QUESTION = "What is the revenue for North in 2023?"


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def _reply(text):
    return {"output": {"message": {"role": "assistant", "content": [{"text": text}]}}, "stopReason": "end_turn",
            "usage": {"inputTokens": 10, "outputTokens": 8, "totalTokens": 18}, "metrics": {"latencyMs": 5}}


@pytest.fixture
def stubbed(fake_aws):
    from botocore.stub import Stubber
    client = para.make_client("us-east-1")
    with Stubber(client) as stub:
        yield client, stub


def test_rejection_keeps_numbers_and_labels():
    keep = ("North",)
    assert para.rejection(QUESTION, "In 2023, how much revenue did North make?", keep) is None
    assert para.rejection(QUESTION, "How much revenue did North make in 2024?", keep) == "changed a number"
    assert para.rejection(QUESTION, "How much revenue was made in 2023?", keep) == "dropped label 'North'"
    assert para.rejection(QUESTION, "", keep) is not None
    assert para.rejection(QUESTION, "How many dollars did North make in 2023?", keep) == "changed a 'how many' question"
    assert para.rejection(QUESTION, "Did North make revenue in 2023?", keep) == "changed the question type"


def test_stubbed_paraphrase_is_used_when_faithful(stubbed):
    client, stub = stubbed
    stub.add_response("converse", _reply("In 2023, how much revenue did North bring in?"),
                      {"modelId": MODEL, "system": [{"text": para.SYSTEM}],
                       "messages": [{"role": "user", "content": [{"text": f"Reword this question: {QUESTION}"}]}],
                       "inferenceConfig": {"maxTokens": 120, "temperature": 0.7, "topP": 0.9}})
    text, status = para.paraphrase(QUESTION, client, MODEL, keep=("North",))
    assert (text, status) == ("In 2023, how much revenue did North bring in?", "paraphrased")
    stub.assert_no_pending_responses()


def test_stubbed_paraphrase_that_changes_a_number_is_rejected(stubbed):
    client, stub = stubbed
    stub.add_response("converse", _reply("What was North's revenue in 2022?"))
    assert para.paraphrase(QUESTION, client, MODEL, keep=("North",)) == (QUESTION, "rejected: changed a number")


def test_throttling_is_retried_with_backoff_then_succeeds(stubbed):
    client, stub = stubbed
    for _ in range(2):
        stub.add_client_error("converse", service_error_code="ThrottlingException", http_status_code=429)
    stub.add_response("converse", _reply("For North, what was the 2023 revenue?"))
    sleeps = []
    text, status = para.paraphrase(QUESTION, client, MODEL, keep=("North",), backoff=0.5, sleep=sleeps.append)
    assert status == "paraphrased" and sleeps == [0.5, 1.0]


def test_persistent_throttling_falls_back_to_the_original(stubbed):
    client, stub = stubbed
    for _ in range(3):
        stub.add_client_error("converse", service_error_code="ThrottlingException", http_status_code=429)
    sleeps = []
    result = para.paraphrase(QUESTION, client, MODEL, retries=2, sleep=sleeps.append)
    assert result == (QUESTION, "error: ThrottlingException") and len(sleeps) == 2


def test_other_errors_fall_back_at_once(stubbed):
    client, stub = stubbed
    stub.add_client_error("converse", service_error_code="AccessDeniedException", http_status_code=403)
    assert para.paraphrase(QUESTION, client, MODEL, sleep=pytest.fail) == (QUESTION, "error: AccessDeniedException")


def test_without_credentials_paraphrasing_is_off_with_a_message(no_aws, tmp_path):
    ok, message = para.bedrock_status()
    assert not ok and "no AWS credentials" in message
    manifest = charts.generate(3, ["bar"], seed=0, out_dir=tmp_path / "ds", paraphrase=True)
    assert manifest["notes"] == [para.NO_CREDENTIALS]
    assert not (tmp_path / "ds" / ".paraphrase.jsonl").exists()


class FakeBedrock(BaseHTTPRequestHandler):
    """POST /model/{modelId}/converse, like bedrock-runtime; answers from the class's script."""
    calls: list = []
    throttle_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = unquote(self.path.split("/")[2])
        FakeBedrock.calls.append((self.path, model, body))
        if not self.path.endswith("/converse"):
            return self._send(404, {"message": "not found"})
        if FakeBedrock.throttle_first > 0:
            FakeBedrock.throttle_first -= 1
            return self._send(429, {"message": "slow down"}, {"x-amzn-ErrorType": "ThrottlingException"})
        question = body["messages"][0]["content"][0]["text"].split(": ", 1)[1]
        return self._send(200, _reply(f"According to the chart, {question[0].lower()}{question[1:]}"))

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(fake_aws):
    FakeBedrock.calls, FakeBedrock.throttle_first = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeBedrock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fake_bedrock_server_paraphrases_through_boto3(fake_server):
    FakeBedrock.throttle_first = 1
    client = para.make_client("us-east-1", endpoint_url=fake_server)
    text, status = para.paraphrase(QUESTION, client, MODEL, keep=("North",), backoff=0.01)
    assert status == "paraphrased" and text == "According to the chart, what is the revenue for North in 2023?"
    paths = [c[0] for c in FakeBedrock.calls]
    assert len(paths) == 2 and all(c[1] == MODEL for c in FakeBedrock.calls)
    assert paths[0].startswith("/model/") and paths[0].endswith("/converse")


def test_generate_with_paraphrase_rewords_questions_but_never_answers(fake_server, tmp_path):
    plain = charts.generate(6, ["bar", "pie"], seed=9, out_dir=tmp_path / "plain")
    reworded = charts.generate(6, ["bar", "pie"], seed=9, out_dir=tmp_path / "para", paraphrase=True,
                               bedrock_model=MODEL, bedrock_endpoint_url=fake_server)
    assert any("paraphrased" in n for n in reworded["notes"])
    before = {r["id"]: r for r in read_jsonl(tmp_path / "plain" / "train.jsonl")}
    after = {r["id"]: r for r in read_jsonl(tmp_path / "para" / "train.jsonl")}
    assert before.keys() == after.keys()
    changed = 0
    for rid, rec in after.items():
        assert rec["conversations"][1] == before[rid]["conversations"][1]           # answers untouched
        assert rec["conversations"][0]["value"].startswith("<image>\n")
        changed += rec["conversations"][0]["value"] != before[rid]["conversations"][0]["value"]
    assert changed == len(after)
    assert charts.validate(tmp_path / "para").ok and plain["counts"] == reworded["counts"]
