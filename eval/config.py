"""`EvalConfig`: the one description of a benchmark run. Its fields give the flags of `python -m eval run`,
the YAML a benchmark job is started from (and saved with, in workspace/jobs/ID/config.yaml), and the
Benchmark tab's defaults; `cfg.run()` calls `eval.run.run_eval` with them.

    cfg = EvalConfig(data="workspace/datasets/demo", model=["local:workspace/models/demo-llava"],
                     out="workspace/evals/demo", split="test", limit=100).validate()
"""
from __future__ import annotations

from dataclasses import dataclass

from charts.config import JobConfig, option
from eval.endpoints import WIRES
from eval.metrics import DEFAULT_METRICS, METRICS
from eval.run import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SUFFIX, check_settings

SPLITS = ("test", "val", "train", "human", "augmented", "all")


@dataclass
class EvalConfig(JobConfig):
    cli = "python -m eval run"
    data: str = option("", "Dataset folder, ChartQA-style JSON/JSONL (or ChartQA's test folder), or a "
                           "LLaVA-format file.", required=True)
    model: list = option([], "local:PATH, local:PATH+ADAPTER, sagemaker:ENDPOINT, openai:URL#MODEL (repeat the "
                             "flag for more; the first is the baseline of reports).", required=True,
                         flag={"action": "append"})
    out: str = option("", "Output folder, e.g. workspace/evals/NAME.", required=True)
    split: str = option("", "test / val / train for our datasets; human / augmented for ChartQA; empty or "
                            "'all': every question.")
    images: str = option("", "Image folder for ChartQA-style files (default: png/ beside the file).")
    limit: int = option(0, "First N questions only (0: all).")
    prompt_suffix: str = option(DEFAULT_SUFFIX, "Appended to each question.")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "Longest answer in tokens.")
    batch_size: int = option(0, "Requests per generate call (0: the backend's max_batch for local models, 1 for "
                                "endpoints).")
    concurrency: int = option(0, "Requests in flight for endpoints (0: 4).")
    metrics: list = option(list(DEFAULT_METRICS), "Metrics to score.", choices=tuple(sorted(METRICS)),
                           flag={"nargs": "+"})
    allow_errors: bool = option(False, "Exit 0 even when samples failed (they are scored wrong and counted in "
                                       "n_errors).")
    workspace: str = option("workspace", "Its endpoints.json gives deployed endpoints' wire.")
    wire: str = option("", "Wire format of sagemaker: endpoints deployed elsewhere (empty: as recorded in "
                           "endpoints.json, else seed).", choices=("", *WIRES))

    def problems(self):
        out = [self.limit < 0 and "limit must be 0 (all) or more",
               self.max_new_tokens < 1 and "max_new_tokens must be at least 1",
               self.batch_size < 0 and "batch_size must be 0 (automatic) or more",
               self.concurrency < 0 and "concurrency must be 0 (automatic) or more"]
        if self.model and not any(out):
            try:
                check_settings(self.model, metrics=self.metrics or ("",))
            except ValueError as e:
                out.append(str(e))
        return out

    def run(self, on_progress=None, open_backend=None) -> list[dict]:
        """Run it: every model on the same questions; one summary per model (see eval.run.run_eval)."""
        from eval.run import run_eval
        return run_eval(self.data, list(self.model), self.out, split=None if self.split in ("", "all") else self.split,
                        images=self.images or None, limit=self.limit or None, prompt_suffix=self.prompt_suffix,
                        max_new_tokens=self.max_new_tokens, batch_size=self.batch_size or None,
                        concurrency=self.concurrency or None, metrics=tuple(self.metrics),
                        on_progress=on_progress, open_backend=open_backend)
