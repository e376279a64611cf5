"""Package an adapter for a SageMaker endpoint, deploy it, list running endpoints with their cost, delete.

    python -m training.serving package --adapter workspace/runs/r1/adapter --base llava-hf/llava-1.5-7b-hf --out model.tar.gz
    python -m training.serving deploy --model model.tar.gz --name chartqa-r1 --role ARN --bucket BUCKET
    python -m training.serving endpoints
    python -m training.serving delete chartqa-r1

model.tar.gz layout (Hugging Face inference toolkit): the adapter files and serving.json at the top,
code/inference.py (the handler) with code/eval/{local,images,protocol}.py beside it, so the handler runs
the studio's own generation code, and code/requirements.txt for what the container lacks.
Endpoints are recorded in WORKSPACE/endpoints.json so a restarted studio still knows what is costing money.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

from charts.io import atomic_write_json
from training.prices import PRICES_DATE, describe_cost, hourly_cost

# The handler's own imports; copied under code/ so model.tar.gz needs nothing else from this repo.
BUNDLED_MODULES = ("eval/local.py", "eval/images.py", "eval/protocol.py")
# Installed by the inference toolkit at start-up, on top of the image's torch.
REQUIREMENTS = "transformers>=4.57.1\npeft>=0.17\naccelerate>=1.10\nbitsandbytes>=0.46\nsafetensors\n"
# Hugging Face PyTorch inference DLC; override with --image (tags: aws/deep-learning-containers available_images.md).
DEFAULT_IMAGE = ("763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-inference:"
                 "2.6.0-transformers4.51.3-gpu-py312-cu124-ubuntu22.04")
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
ROOT = Path(__file__).resolve().parents[2]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def package(adapter: str | Path, base: str, out: str | Path, quantize: str = "auto") -> Path:
    """Write model.tar.gz for `adapter` on `base` (a hub id the endpoint can download, or a path there)."""
    from eval.local import read_adapter_config

    adapter, out = Path(adapter), Path(out)
    read_adapter_config(adapter)            # refuse folders that are not PEFT adapters before uploading them
    serving = {"base": base, "quantize": quantize, "name": f"{Path(base).name} + {adapter.name}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in ADAPTER_FILES:
            if (adapter / name).is_file():
                tar.add(adapter / name, arcname=name)
        _add_bytes(tar, "serving.json", json.dumps(serving, indent=2).encode())
        tar.add(Path(__file__).with_name("inference.py"), arcname="code/inference.py")
        _add_bytes(tar, "code/eval/__init__.py", b'"""The studio\'s generation code, bundled for the endpoint."""\n')
        for module in BUNDLED_MODULES:
            tar.add(ROOT / module, arcname=f"code/{module}")
        _add_bytes(tar, "code/requirements.txt", REQUIREMENTS.encode())
    tmp.replace(out)
    return out


def unpack(model_tar: str | Path, into: str | Path) -> Path:
    into = Path(into)
    with tarfile.open(model_tar) as tar:
        tar.extractall(into, filter="data")
    return into


# ---- endpoints.json ----
def endpoints_file(workspace: str | Path) -> Path:
    return Path(workspace) / "endpoints.json"


def load_records(workspace: str | Path) -> list[dict]:
    """endpoints.json: a JSON list of records, each with `name`, `ref` (sagemaker:NAME), region, instance, cost."""
    path = endpoints_file(workspace)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [r for r in data if isinstance(r, dict) and r.get("name")] if isinstance(data, list) else []


def save_records(workspace: str | Path, records: list[dict]) -> None:
    atomic_write_json(endpoints_file(workspace), records)


def _client(service: str, region: str | None, endpoint_url: str | None = None):
    import boto3
    return boto3.client(service, region_name=region, endpoint_url=endpoint_url)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"endpoint name {name!r}: use 1-63 letters, digits and hyphens, starting with a letter or digit")
    return name


def deploy(model_tar: str | Path, name: str, role_arn: str, bucket: str, workspace: str | Path,
           instance_type: str = "ml.g5.2xlarge", count: int = 1, image: str | None = None,
           region: str | None = None, prefix: str = "chartqa-studio/endpoints", wait: bool = False,
           endpoint_url: str | None = None, on_progress=print) -> dict:
    """Upload model.tar.gz, create model + endpoint config + endpoint, record it. Costs money from the
    moment the endpoint is created: callers show `describe_cost` and ask first (the CLI does)."""
    check_name(name)
    s3 = _client("s3", region, endpoint_url)
    sm = _client("sagemaker", region, endpoint_url)
    region = region or sm.meta.region_name
    key = f"{prefix.strip('/')}/{name}/model.tar.gz"
    on_progress(f"uploading {model_tar} to s3://{bucket}/{key}")
    s3.upload_file(str(model_tar), bucket, key)
    model_data = f"s3://{bucket}/{key}"
    image = (image or DEFAULT_IMAGE).format(region=region)
    names = {"model": f"{name}-model", "config": f"{name}-config"}
    on_progress(f"creating model {names['model']} ({image})")
    sm.create_model(ModelName=names["model"], ExecutionRoleArn=role_arn,
                    PrimaryContainer={"Image": image, "ModelDataUrl": model_data,
                                      "Environment": {"SAGEMAKER_PROGRAM": "inference.py"}})
    on_progress(f"creating endpoint config {names['config']}: {describe_cost(instance_type, count)}")
    sm.create_endpoint_config(EndpointConfigName=names["config"], ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": names["model"], "InstanceType": instance_type,
        "InitialInstanceCount": count, "ContainerStartupHealthCheckTimeoutInSeconds": 900}])
    on_progress(f"creating endpoint {name} (takes 5-15 minutes to come InService)")
    sm.create_endpoint(EndpointName=name, EndpointConfigName=names["config"])
    record = {"name": name, "ref": f"sagemaker:{name}", "model": names["model"], "config": names["config"], "region": region,
              "instance_type": instance_type, "count": count, "image": image, "model_data": model_data,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wire": "seed",
              "hourly_usd": hourly_cost(instance_type, count), "prices_date": PRICES_DATE}
    records = [r for r in load_records(workspace) if r["name"] != name] + [record]
    save_records(workspace, records)
    if wait:
        on_progress("waiting for InService")
        sm.get_waiter("endpoint_in_service").wait(EndpointName=name)
    return record


def list_endpoints(workspace: str | Path, refresh: bool = True, endpoint_url: str | None = None,
                   now: datetime | None = None) -> list[dict]:
    """Recorded endpoints with hours since creation, cost so far and (if `refresh`) their live status."""
    now = now or datetime.now(timezone.utc)
    rows = []
    for record in load_records(workspace):
        row = dict(record)
        hours = (now - datetime.fromisoformat(record["created"])).total_seconds() / 3600
        row["hours"] = round(hours, 2)
        rate = record.get("hourly_usd")
        row["cost_usd"] = None if rate is None else round(hours * rate, 2)
        if refresh:
            try:
                status = _client("sagemaker", record.get("region"), endpoint_url).describe_endpoint(
                    EndpointName=record["name"])
                row["status"] = status["EndpointStatus"]
            except Exception as e:            # noqa: BLE001 - shown in the table, never fatal
                row["status"] = f"unknown ({type(e).__name__})"
        rows.append(row)
    return rows


def delete(name: str, workspace: str | Path, endpoint_url: str | None = None, on_progress=print) -> None:
    """Delete the endpoint, its config and its model (each even if another is already gone), then forget it."""
    from botocore.exceptions import ClientError

    records = load_records(workspace)
    record = next((r for r in records if r["name"] == name), {"name": name, "model": f"{name}-model",
                                                              "config": f"{name}-config", "region": None})
    sm = _client("sagemaker", record.get("region"), endpoint_url)
    for what, call, kwargs in (("endpoint", sm.delete_endpoint, {"EndpointName": name}),
                               ("endpoint config", sm.delete_endpoint_config, {"EndpointConfigName": record["config"]}),
                               ("model", sm.delete_model, {"ModelName": record["model"]})):
        try:
            call(**kwargs)
            on_progress(f"deleted {what} {next(iter(kwargs.values()))}")
        except ClientError as e:
            message = e.response.get("Error", {}).get("Message", "")
            if "could not find" not in message.lower() and "does not exist" not in message.lower():
                raise
            on_progress(f"{what} {next(iter(kwargs.values()))} was already gone")
    save_records(workspace, [r for r in records if r["name"] != name])
