"""Package an adapter for a SageMaker endpoint, deploy it, list running endpoints with their cost, delete.

    python -m training.serving package --adapter workspace/runs/r1/adapter --base llava-hf/llava-1.5-7b-hf --out model.tar.gz
    python -m training.serving deploy --model model.tar.gz --name chartqa-r1 --role ARN --bucket BUCKET
    python -m training.serving endpoints
    python -m training.serving delete chartqa-r1

model.tar.gz layout (Hugging Face inference toolkit): the adapter files and serving.json at the top,
code/inference.py (the handler) with code/eval/{local,engine,lora,images,protocol}.py beside it, so the handler runs
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
BUNDLED_MODULES = ("eval/local.py", "eval/engine.py", "eval/features.py", "eval/lora.py", "eval/images.py",
                   "eval/protocol.py")
# Installed by the inference toolkit (pip, before the model server starts) on top of the image's torch 2.6.
# Exact pins: transformers must stay below 5, since the toolkit's transformers_utils imports
# `transformers.file_utils.is_tf_available`, which 5.x dropped (the worker would die at start); 4.57 is the
# oldest that takes the `dtype=` eval.local passes. peft/accelerate/bitsandbytes: releases of that line.
REQUIREMENTS = ("transformers==4.57.1\nhuggingface_hub>=0.34,<1.0\npeft==0.17.1\naccelerate==1.10.1\n"
                "bitsandbytes==0.46.1\nsafetensors>=0.4.3\n")
# Hugging Face PyTorch inference DLC; override with --image (tags: aws/deep-learning-containers available_images.md).
DEFAULT_IMAGE = ("763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-inference:"
                 "2.6.0-transformers4.51.3-gpu-py312-cu124-ubuntu22.04")
# Each target: the container, its environment, and what the client may expect of it (recorded in
# endpoints.json). Timeouts: model_fn downloads and loads a 7B base before the first answer, far past the
# model server's 60 s default, so the worker's timeout and the variant's health-check window are raised.
TARGETS = {
    "hf-toolkit": {
        "image": DEFAULT_IMAGE, "streams": False, "wire": "seed",
        "environment": {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600",
                        "SAGEMAKER_STARTUP_TIMEOUT": "1200",
                        "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                        "STUDIO_STREAMING": "0", "TOKENIZERS_PARALLELISM": "false"},
        "about": "Hugging Face inference DLC + toolkit (MMS): whole answers only, no response streaming"},
    "byoc": {
        "image": None, "streams": True, "wire": "seed",
        "environment": {"STUDIO_STREAMING": "1", "TOKENIZERS_PARALLELISM": "false"},
        "about": "the studio's own server (training/serving/Dockerfile): whole answers and response streaming"},
}
HEALTH_CHECK_TIMEOUT_S = 1800       # /ping may fail this long while the base downloads (limit 3600)
DOWNLOAD_TIMEOUT_S = 1800           # model.tar.gz from S3 (adapters are small; merged models are not)
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


def _client(service: str, region: str | None, endpoint_url: str | None = None, session=None):
    import boto3
    return (session or boto3).client(service, region_name=region, endpoint_url=endpoint_url)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"endpoint name {name!r}: use 1-63 letters, digits and hyphens, starting with a letter or digit")
    return name


def model_request(name: str, role_arn: str, model_data: str, image: str, target: str) -> dict:
    spec = TARGETS[target]
    return {"ModelName": f"{name}-model", "ExecutionRoleArn": role_arn,
            "PrimaryContainer": {"Image": image, "ModelDataUrl": model_data,
                                 "Environment": dict(spec["environment"])}}


def endpoint_config_request(name: str, instance_type: str, count: int) -> dict:
    return {"EndpointConfigName": f"{name}-config", "ProductionVariants": [{
        "VariantName": "AllTraffic", "ModelName": f"{name}-model", "InstanceType": instance_type,
        "InitialInstanceCount": count, "ContainerStartupHealthCheckTimeoutInSeconds": HEALTH_CHECK_TIMEOUT_S,
        "ModelDataDownloadTimeoutInSeconds": DOWNLOAD_TIMEOUT_S}]}


def target_image(target: str, image: str | None, region: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    image = image or TARGETS[target]["image"]
    if not image:
        raise ValueError(f"target {target} needs --image: build training/serving/Dockerfile and push it to ECR, "
                         "e.g. ACCOUNT.dkr.ecr.REGION.amazonaws.com/chartqa-studio-serve:latest")
    return image.format(region=region)


def deploy(model_tar: str | Path, name: str, role_arn: str, bucket: str, workspace: str | Path,
           instance_type: str = "ml.g5.2xlarge", count: int = 1, image: str | None = None,
           region: str | None = None, prefix: str = "chartqa-studio/endpoints", wait: bool = False,
           endpoint_url: str | None = None, on_progress=print, target: str = "hf-toolkit",
           session=None) -> dict:
    """Upload model.tar.gz, create model + endpoint config + endpoint, record it. Costs money from the
    moment the endpoint is created: callers show `describe_cost` and ask first (the CLI does).
    `target` picks the container (TARGETS); its wire format and whether it streams go into endpoints.json."""
    check_name(name)
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    if target == "byoc" and not image:
        target_image(target, image, region or "")       # the clear error, before anything is uploaded
    s3 = _client("s3", region, endpoint_url, session)
    sm = _client("sagemaker", region, endpoint_url, session)
    region = region or sm.meta.region_name
    image = target_image(target, image, region)
    key = f"{prefix.strip('/')}/{name}/model.tar.gz"
    on_progress(f"uploading {model_tar} to s3://{bucket}/{key}")
    s3.upload_file(str(model_tar), bucket, key)
    model_data = f"s3://{bucket}/{key}"
    names = {"model": f"{name}-model", "config": f"{name}-config"}
    on_progress(f"creating model {names['model']} ({TARGETS[target]['about']}; {image})")
    sm.create_model(**model_request(name, role_arn, model_data, image, target))
    on_progress(f"creating endpoint config {names['config']}: {describe_cost(instance_type, count)}")
    sm.create_endpoint_config(**endpoint_config_request(name, instance_type, count))
    on_progress(f"creating endpoint {name} (takes 5-15 minutes to come InService)")
    sm.create_endpoint(EndpointName=name, EndpointConfigName=names["config"])
    record = {"name": name, "ref": f"sagemaker:{name}", "model": names["model"], "config": names["config"], "region": region,
              "instance_type": instance_type, "count": count, "image": image, "model_data": model_data,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "target": target,
              "wire": TARGETS[target]["wire"], "streams": TARGETS[target]["streams"],
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
