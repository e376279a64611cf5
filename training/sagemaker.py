"""SageMaker training jobs with plain boto3 (`create_training_job`: one dict, no hidden calls).

Not the `sagemaker` SDK: v3 has no Hugging Face estimator, validates the role against IAM, uploads code on
dry runs and turns a plain s3:// channel into File mode (defeating FastFile). The request is the one
in notes/SAGEMAKER.md: the Hugging Face training image runs `sagemaker_entry.py` (packed with charts/, eval/,
training/ into sourcedir.tar.gz) with the TrainConfig as hyperparameters; data and, for a local base
model, the model arrive as FastFile channels; checkpoints sync to S3 so spot interruptions resume.

    launcher = SageMakerLauncher("workspace", SageMakerSettings(role=ROLE_ARN, bucket="my-bucket"))
    launcher.estimate(cfg)            # before: rate x instances x max runtime (and the spot figure)
    job = launcher.start(cfg)         # checks names/limits first, then uploads and calls AWS
    launcher.status(job)              # status, secondary status, final metrics, billed cost
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig, check_hyperparameters, to_hyperparameters
from training.launchers import REPO, read_jobs, record, run_name

DEFAULT_IMAGE = ("763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-training:"
                 "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04")
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
ENTRY = "sagemaker_entry.py"
# transformers 5 prints log values quoted ('loss': '1.23'), older versions bare: accept both.
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"'{name}': '?([0-9.eE+-]+)"}
                      for name in ("loss", "eval_loss", "learning_rate", "epoch", "eval_relaxed_accuracy")]
SPOT_FRACTION = 0.35          # spot is often planned at 30-35% of on-demand (SAGEMAKER.md)
CODE_DIRS = ("charts", "eval", "training")
REQUIREMENTS = "peft>=0.21\nbitsandbytes>=0.45\npyyaml\nmatplotlib\n"
STATUS = {"InProgress": "running", "Completed": "completed", "Failed": "failed", "Stopping": "stopping",
          "Stopped": "stopped"}
GPUS_PER_INSTANCE = {"ml.g5.12xlarge": 4, "ml.g5.24xlarge": 4, "ml.g5.48xlarge": 8, "ml.g6e.12xlarge": 4,
                     "ml.g6e.24xlarge": 4, "ml.g6e.48xlarge": 8, "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8,
                     "ml.p5.48xlarge": 8}
# What a secondary status means for the user. `Interrupted` is a spot reclaim the job may come back from
# (it resumes from its last checkpoint); `MaxWaitTimeExceeded` is the terminal one: capacity not regained.
SECONDARY_DETAIL = {
    "Interrupted": "spot instance reclaimed; waiting for capacity to resume from the last checkpoint",
    "MaxWaitTimeExceeded": "spot capacity not regained within max wait; stopped (relaunch to resume from the "
                           "last checkpoint)",
    "MaxRuntimeExceeded": "ran past max runtime; stopped",
    "Stopped": "stopped on request",
}
GPU_FAMILIES = ("ml.g", "ml.p")
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class SageMakerError(ValueError):
    """A request SageMaker would refuse (or that would cost money for nothing), caught before calling AWS."""


@dataclass
class SageMakerSettings:
    role: str = ""                       # IAM role ARN the job runs as
    bucket: str = ""                     # S3 bucket for code, data, checkpoints and the model artifact
    region: str = "us-east-1"
    instance_type: str = "ml.g5.2xlarge"
    instance_count: int = 1
    spot: bool = True
    max_runtime_s: int = 24 * 3600
    max_wait_s: int = 36 * 3600          # spot: time waiting for capacity + running; must be >= max_runtime_s
    volume_gb: int = 100
    image: str = ""                      # custom training image; empty: the Hugging Face one for `region`
    prefix: str = "llava-studio"
    endpoint_url: str | None = None      # tests: a moto server


# ---------------------------------------------------------------- checks and the request
def check_settings(s: SageMakerSettings) -> None:
    if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/.+", s.role or ""):
        raise SageMakerError("a SageMaker execution role ARN is needed (arn:aws:iam::<account>:role/<name>), "
                             "with S3 access to the bucket")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", s.bucket or ""):
        raise SageMakerError("an S3 bucket name is needed (3-63 lowercase letters, digits, dots, hyphens)")
    # botocore would refuse a float (a form's 2.0) only after the code and data were uploaded
    if not isinstance(s.instance_count, int) or isinstance(s.instance_count, bool) or s.instance_count < 1:
        raise SageMakerError(f"instance count {s.instance_count!r}: a whole number, at least 1")
    if not s.instance_type.startswith("ml."):
        raise SageMakerError(f"instance type {s.instance_type!r}: SageMaker types start with 'ml.'")
    if s.instance_count > 1 and not s.instance_type.startswith(GPU_FAMILIES):
        # torchrun across hosts trains on every GPU of every host; CPU hosts would bill for a job far
        # slower than one GPU instance
        raise SageMakerError(f"{s.instance_count} instances of {s.instance_type}: several instances need a GPU "
                             f"type ({', '.join(f + '*' for f in GPU_FAMILIES)})")
    if s.spot and s.max_wait_s < s.max_runtime_s:
        raise SageMakerError(f"spot jobs need max wait ({s.max_wait_s} s) >= max runtime ({s.max_runtime_s} s)")


def job_name(base: str) -> str:
    """A valid TrainingJobName: <=63 characters of [a-zA-Z0-9-], starting and ending alphanumeric."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = re.sub(r"[^a-zA-Z0-9-]+", "-", base).strip("-")[:63 - len(stamp) - 1].strip("-") or "llava"
    return check_job_name(f"{base}-{stamp}")


def check_job_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise SageMakerError(f"training job name {name!r}: at most 63 characters of letters, digits and hyphens, "
                             "starting and ending with a letter or digit")
    return name


def build_request(cfg: TrainConfig, s: SageMakerSettings, name: str, code_uri: str, data_uri: str,
                  model_uri: str | None = None) -> dict:
    check_settings(s)
    check_job_name(name)
    hp = to_hyperparameters(cfg.replace(data="", output_dir="/opt/ml/model", overwrite=True))
    hp.update({"sagemaker_program": json.dumps(ENTRY), "sagemaker_submit_directory": json.dumps(code_uri),
               "sagemaker_region": json.dumps(s.region), "sagemaker_container_log_level": "20"})
    if s.instance_count > 1 or GPUS_PER_INSTANCE.get(s.instance_type, 1) > 1:
        # The Hugging Face container then starts torchrun on every host (--nnodes = instance count, the first
        # host as master); each rank reads its own share of the FullyReplicated channel (training.data)
        hp["sagemaker_torch_distributed_enabled"] = json.dumps(True)
    check_hyperparameters(hp)
    channels = [_channel("train", data_uri)] + ([_channel("model", model_uri)] if model_uri else [])
    request = {
        "TrainingJobName": name, "RoleArn": s.role,
        "AlgorithmSpecification": {"TrainingImage": s.image or DEFAULT_IMAGE.format(region=s.region),
                                   "TrainingInputMode": "FastFile", "MetricDefinitions": METRIC_DEFINITIONS,
                                   "EnableSageMakerMetricsTimeSeries": True},
        "HyperParameters": hp, "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": f"s3://{s.bucket}/{s.prefix}/output"},
        "ResourceConfig": {"InstanceType": s.instance_type, "InstanceCount": s.instance_count,
                           "VolumeSizeInGB": s.volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": s.max_runtime_s},
        "EnableManagedSpotTraining": s.spot,
        "CheckpointConfig": {"S3Uri": f"s3://{s.bucket}/{s.prefix}/checkpoints/{name}",
                             "LocalPath": "/opt/ml/checkpoints"},
        "Environment": {"HF_HUB_ENABLE_HF_TRANSFER": "0", "TOKENIZERS_PARALLELISM": "false"},
        "Tags": [{"Key": "app", "Value": "llava-studio"}, {"Key": "mode", "Value": cfg.mode}],
    }
    if s.spot:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = s.max_wait_s
    return request


def _channel(name: str, uri: str) -> dict:
    return {"ChannelName": name, "InputMode": "FastFile",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                            "S3DataDistributionType": "FullyReplicated"}}}


# ---------------------------------------------------------------- code and data
def pack_code(repo: Path = REPO) -> bytes:
    """sourcedir.tar.gz: charts/, eval/, training/, an entry script and the extra requirements."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in CODE_DIRS:
            for path in sorted((repo / d).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".txt"):
                    tar.add(path, arcname=str(path.relative_to(repo)))
        for arcname, text in ((ENTRY, "from training.train import main\nimport sys\nsys.exit(main())\n"),
                              ("requirements.txt", REQUIREMENTS)):
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime = len(text), int(time.time())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def upload_folder(s3, folder: Path, bucket: str, key_prefix: str) -> str:
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            s3.upload_file(str(path), bucket, f"{key_prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{key_prefix}/"


# ---------------------------------------------------------------- cost
def estimate_cost(s: SageMakerSettings, hours: float | None = None) -> dict:
    """Upper bound before launch: rate x instances x max runtime (and the spot planning figure)."""
    from training.prices import PRICES_DATE, hourly_cost

    hours = hours if hours is not None else s.max_runtime_s / 3600
    rate = hourly_cost(s.instance_type, s.instance_count)
    if rate is None:
        return {"hourly_usd": None, "max_usd": None, "spot_max_usd": None, "prices_date": PRICES_DATE,
                "text": f"{s.instance_type}: price not in training/prices.py ({PRICES_DATE})"}
    on_demand = rate * hours
    spot = on_demand * SPOT_FRACTION if s.spot else None
    text = (f"{s.instance_count} x {s.instance_type} at ${rate:.2f}/h: at most ${on_demand:,.2f} for {hours:g} h"
            + (f" on demand, ~${spot:,.2f} with spot" if spot is not None else "") + f" (prices of {PRICES_DATE})")
    return {"hourly_usd": rate, "max_usd": on_demand, "spot_max_usd": spot, "prices_date": PRICES_DATE, "text": text}


def billed_cost(desc: dict) -> dict:
    """After (or during) a job: billed seconds x rate; spot savings vs the seconds it trained."""
    from training.prices import hourly_cost

    rc = desc.get("ResourceConfig", {})
    rate = hourly_cost(rc.get("InstanceType", ""), rc.get("InstanceCount", 1))
    billable, trained = desc.get("BillableTimeInSeconds"), desc.get("TrainingTimeInSeconds")
    out = {"billable_s": billable, "training_s": trained}
    if billable and trained:
        out["spot_savings"] = round(1 - billable / trained, 4)
    if rate is not None and billable is not None:
        out["cost_usd"] = round(rate * billable / 3600, 4)
    return out


# ---------------------------------------------------------------- the launcher
class SageMakerLauncher:
    kind = "sagemaker"

    def __init__(self, workspace: str | Path, settings: SageMakerSettings | None = None, session=None):
        self.workspace = Path(workspace)
        self.settings = settings or SageMakerSettings()
        self._session = session
        self._clients: dict[tuple, object] = {}

    def client(self, service: str, region: str | None = None):
        """One boto3 client per service and region (botocore clients are thread-safe)."""
        import boto3

        key = (service, region or self.settings.region)
        if key not in self._clients:
            session = self._session or boto3.session.Session()
            self._clients[key] = session.client(service, region_name=key[1], endpoint_url=self.settings.endpoint_url)
        return self._clients[key]

    def estimate(self, cfg: TrainConfig | None = None) -> dict:
        return estimate_cost(self.settings)

    def start(self, cfg: TrainConfig, name: str | None = None) -> dict:
        s = self.settings
        check_settings(s)        # every check before the first AWS call
        name = job_name(name or run_name(cfg).rsplit("-", 2)[0])
        if not cfg.data:
            raise SageMakerError("no dataset: give a dataset folder or an s3:// prefix")
        if not cfg.data.startswith("s3://") and not Path(cfg.data).is_dir():
            raise SageMakerError(f"dataset {cfg.data!r}: not a folder and not an s3:// prefix")
        local_model = Path(cfg.model).is_dir()
        build_request(cfg, s, name, "s3://x/y.tar.gz", "s3://x/data/")    # limits checked before uploading
        s3 = self.client("s3")
        key = f"{s.prefix}/jobs/{name}"
        s3.put_object(Bucket=s.bucket, Key=f"{key}/sourcedir.tar.gz", Body=pack_code())
        # Under the job's own prefix: a shared datasets/<folder>/ keeps files a later version of the folder
        # no longer has, and the S3Prefix channel would hand them to every later job.
        data_uri = cfg.data if cfg.data.startswith("s3://") else \
            upload_folder(s3, Path(cfg.data), s.bucket, f"{key}/data")
        model_uri = upload_folder(s3, Path(cfg.model), s.bucket, f"{key}/model") if local_model else None
        request = build_request(cfg, s, name, f"s3://{s.bucket}/{key}/sourcedir.tar.gz", data_uri, model_uri)
        arn = self.client("sagemaker").create_training_job(**request)["TrainingJobArn"]
        return record(self.workspace, {
            "id": name, "kind": self.kind, "name": name, "arn": arn, "status": "running", "created": time.time(),
            "region": s.region, "instance_type": s.instance_type, "instance_count": s.instance_count,
            "spot": s.spot, "model": cfg.model, "data": data_uri, "mode": cfg.mode,
            "output": f"s3://{s.bucket}/{s.prefix}/output/{name}/output/model.tar.gz",
            "estimate": estimate_cost(s)["text"]})

    def status(self, job: dict) -> dict:
        desc = self.client("sagemaker", job.get("region")).describe_training_job(TrainingJobName=job["id"])
        metrics = {m["MetricName"]: m["Value"] for m in desc.get("FinalMetricDataList", [])}
        status = STATUS.get(desc["TrainingJobStatus"], desc["TrainingJobStatus"].lower())
        secondary = desc.get("SecondaryStatus", "")
        detail = desc.get("FailureReason") or SECONDARY_DETAIL.get(secondary, secondary)
        if status == "stopped" and secondary == "Interrupted":
            detail = "stopped while its spot instance was reclaimed (relaunch to resume from the last checkpoint)"
        job = {**job, "status": status, "secondary_status": desc.get("SecondaryStatus"), "detail": detail,
               **metrics, **billed_cost(desc)}
        if status in ("completed", "failed", "stopped") and read_jobs(self.workspace).get(job["id"], {}).get(
                "status") != status:
            record(self.workspace, job)
        return job

    def logs(self, job: dict, tail_lines: int = 50) -> str:
        logs = self.client("logs", job.get("region"))
        try:
            streams = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=job["id"])["logStreams"]
        except logs.exceptions.ResourceNotFoundException:
            return "(no logs yet: the instance is still starting)"
        lines = []
        for stream in sorted(streams, key=lambda x: x["logStreamName"]):
            events = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream["logStreamName"],
                                         limit=tail_lines, startFromHead=False)["events"]
            prefix = f"[{stream['logStreamName'].split('/', 1)[-1]}] " if len(streams) > 1 else ""
            lines += [prefix + e["message"] for e in events]
        return "\n".join(lines[-tail_lines:]) or "(no log lines yet)"

    def stop(self, job: dict) -> dict:
        """Stop a running job. One that already ended is not an error: its final state is returned, with
        a `message` saying there was nothing to stop."""
        from botocore.exceptions import ClientError

        try:
            self.client("sagemaker", job.get("region")).stop_training_job(TrainingJobName=job["id"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("ValidationException", "ResourceNotFound"):
                raise SageMakerError(f"cannot stop {job['id']}: {e.response.get('Error', {}).get('Message', e)}") from None
            try:
                final = self.status(job)
            except ClientError:
                raise SageMakerError(f"cannot stop {job['id']}: "
                                     f"{e.response.get('Error', {}).get('Message', e)}") from None
            if final["status"] in ("running", "stopping"):
                raise SageMakerError(f"cannot stop {job['id']}: {e.response.get('Error', {}).get('Message', e)}")
            return {**final, "message": f"{job['id']} already {final['status']}; nothing to stop"}
        return record(self.workspace, {**job, "status": "stopping"})

    def list(self) -> list[dict]:
        jobs = [j for j in read_jobs(self.workspace).values() if j.get("kind") == self.kind]
        return sorted(jobs, key=lambda j: -j.get("created", 0))
