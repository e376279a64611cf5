"""Optional rewording of template questions through Amazon Bedrock (Converse API).

The LLM only rewords questions; answers always come from the chart data. A rewording that drops
or changes a number or a chart label of the original is rejected and the original is kept, as it
is when Bedrock throttles past the retries or fails. boto3 is imported inside the functions.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_MODEL = "us.meta.llama3-3-70b-instruct-v1:0"
SYSTEM = ("You reword questions about a chart so they sound natural and varied. Keep every number, name, "
          "year and label exactly as written. Do not answer the question. Reply with the reworded question only.")
RETRYABLE = {"ThrottlingException", "ServiceUnavailableException", "ModelNotReadyException",
             "InternalServerException", "TooManyRequestsException"}
NO_CREDENTIALS = ("Paraphrasing is off: no AWS credentials found (configure a profile or set AWS_ACCESS_KEY_ID and "
                  "AWS_SECRET_ACCESS_KEY). Questions keep their template wording.")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def bedrock_status(session=None) -> tuple[bool, str]:
    """(usable, message). Usable means credentials exist; it does not call AWS."""
    import boto3
    session = session or boto3.Session()
    if session.get_credentials() is None:
        return False, NO_CREDENTIALS
    return True, "AWS credentials found: questions will be paraphrased through Bedrock."


def make_client(region: str | None = None, endpoint_url: str | None = None):
    """A bedrock-runtime client. botocore's own retries are off: paraphrase() does its own backoff,
    so a throttled call is retried a known number of times."""
    import boto3
    from botocore.config import Config
    region = region or boto3.Session().region_name or "us-east-1"
    return boto3.client("bedrock-runtime", region_name=region, endpoint_url=endpoint_url,
                        config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=60))


def rejection(original: str, candidate: str, keep=()) -> str | None:
    """Why `candidate` is not a faithful rewording of `original`, or None if it is."""
    if not candidate or "\n" in candidate.strip():
        return "empty or several lines"
    if len(candidate) > 2.5 * len(original) + 40:
        return "too long"
    if "<image>" in candidate:
        return "contains <image>"
    if sorted(_NUMBER.findall(original)) != sorted(_NUMBER.findall(candidate)):
        return "changed a number"
    low = candidate.lower()
    if ("how many" in low) != ("how many" in original.lower()):
        return "changed a 'how many' question"      # counts must stay counts, and only counts
    from .validate import _is_yes_no_question
    if _is_yes_no_question(candidate) != _is_yes_no_question(original):
        return "changed the question type"
    for term in keep:
        if term.lower() not in low:
            return f"dropped label {term!r}"
    return None


def _clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    return re.sub(r"^(paraphrase|reworded question|question)\s*:\s*", "", text, flags=re.I).strip()


def paraphrase(question: str, client, model_id: str = DEFAULT_MODEL, keep=(), retries: int = 3,
               backoff: float = 1.0, sleep=time.sleep) -> tuple[str, str]:
    """(question to use, status). Status: 'paraphrased', 'rejected: <why>' or 'error: <code>';
    on anything but 'paraphrased' the original question is returned."""
    from botocore.exceptions import BotoCoreError, ClientError
    for attempt in range(retries + 1):
        try:
            reply = client.converse(
                modelId=model_id,
                system=[{"text": SYSTEM}],
                messages=[{"role": "user", "content": [{"text": f"Reword this question: {question}"}]}],
                inferenceConfig={"maxTokens": 120, "temperature": 0.7, "topP": 0.9},
            )
            break
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "ClientError")
            if code in RETRYABLE and attempt < retries:
                sleep(backoff * 2 ** attempt)
                continue
            return question, f"error: {code}"
        except BotoCoreError as e:
            return question, f"error: {type(e).__name__}"
    blocks = reply.get("output", {}).get("message", {}).get("content", [])
    candidate = _clean(next((b["text"] for b in blocks if "text" in b), ""))
    why = rejection(question, candidate, keep)
    return (question, f"rejected: {why}") if why else (candidate, "paraphrased")


def paraphrase_many(items: list[tuple[str, tuple]], client, model_id: str = DEFAULT_MODEL, threads: int = 4,
                    **kw) -> list[tuple[str, str]]:
    """paraphrase() over (question, keep) pairs, a few calls in flight (boto3 clients are thread-safe)."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(lambda it: paraphrase(it[0], client, model_id, keep=it[1], **kw), items))
