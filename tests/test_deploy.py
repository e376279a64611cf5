"""Deploying to SageMaker against moto in server mode (loopback, fake credentials), and the price table."""
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from test_local_backend import make_adapter
from training.prices import PRICES_USD_PER_HOUR, describe_cost, hourly_cost
from training.serving import package as pkg

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"

pytestmark = pytest.mark.usefixtures("fake_aws")


@pytest.fixture(scope="module")
def model_tar(demo_model, tmp_path_factory):
    adapter = make_adapter(demo_model, tmp_path_factory.mktemp("deploy") / "adapter")
    return pkg.package(adapter, "llava-hf/llava-1.5-7b-hf", tmp_path_factory.mktemp("tar") / "model.tar.gz")


def test_deploy_uploads_creates_and_records_the_endpoint(moto_url, model_tar, tmp_path):
    import boto3
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    s3.create_bucket(Bucket="studio-bucket")
    record = pkg.deploy(model_tar, "chartqa-r1", ROLE, "studio-bucket", tmp_path, instance_type="ml.g4dn.xlarge",
                        region="us-east-1", endpoint_url=moto_url, on_progress=lambda m: None)
    sm = boto3.client("sagemaker", endpoint_url=moto_url, region_name="us-east-1")
    assert sm.describe_endpoint(EndpointName="chartqa-r1")["EndpointConfigName"] == "chartqa-r1-config"
    model = sm.describe_model(ModelName="chartqa-r1-model")
    assert model["PrimaryContainer"]["ModelDataUrl"] == record["model_data"]
    assert "huggingface-pytorch-inference" in model["PrimaryContainer"]["Image"]
    head = s3.head_object(Bucket="studio-bucket", Key="chartqa-studio/endpoints/chartqa-r1/model.tar.gz")
    assert head["ContentLength"] == model_tar.stat().st_size
    saved = json.loads((tmp_path / "endpoints.json").read_text())
    assert [r["ref"] for r in saved] == ["sagemaker:chartqa-r1"] and saved[0]["hourly_usd"] is None  # g4dn not in the table

    rows = pkg.list_endpoints(tmp_path, endpoint_url=moto_url)
    assert rows[0]["status"] == "InService"

    pkg.delete("chartqa-r1", tmp_path, endpoint_url=moto_url, on_progress=lambda m: None)
    assert pkg.load_records(tmp_path) == []
    assert not sm.list_endpoints()["Endpoints"] and not sm.list_models()["Models"]
    pkg.delete("chartqa-r1", tmp_path, endpoint_url=moto_url, on_progress=lambda m: None)   # already gone: fine


def test_listing_shows_running_cost_from_hours_and_rate(tmp_path):
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    pkg.save_records(tmp_path, [{"name": "e1", "created": created.isoformat(), "hourly_usd": 1.515, "count": 1,
                                 "instance_type": "ml.g5.2xlarge"}])
    row = pkg.list_endpoints(tmp_path, refresh=False, now=created + timedelta(hours=10))[0]
    assert row["hours"] == 10 and row["cost_usd"] == 15.15


def test_price_table_and_cost_lines():
    assert hourly_cost("ml.g5.2xlarge", 2) == pytest.approx(2 * PRICES_USD_PER_HOUR["ml.g5.2xlarge"])
    assert hourly_cost("ml.unknown") is None
    assert "$1.51/hour" in describe_cost("ml.g5.2xlarge") and "not in the table" in describe_cost("ml.x")


def test_bad_endpoint_names_are_refused_before_any_call(tmp_path, model_tar):
    with pytest.raises(ValueError, match="endpoint name"):
        pkg.deploy(model_tar, "bad_name!", ROLE, "b", tmp_path, endpoint_url="http://127.0.0.1:9")


def test_cli_deploy_without_yes_asks_and_stops(tmp_path, model_tar):
    done = subprocess.run([sys.executable, "-m", "training.serving", "--workspace", str(tmp_path),
                           "--endpoint-url", "http://127.0.0.1:9", "deploy", "--model", str(model_tar),
                           "--name", "e1", "--role", ROLE, "--bucket", "b"], input="n\n", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "$1.51/hour" in done.stdout and "not deployed" in done.stdout


# ---- both targets' create requests, exactly, through botocore's validation (Stubber) ----
class _S3:
    def __init__(self):
        self.uploads = []

    def upload_file(self, path, bucket, key):
        self.uploads.append((bucket, key))


@pytest.mark.parametrize("target, image", [
    ("hf-toolkit", None),
    ("byoc", "123456789012.dkr.ecr.us-east-1.amazonaws.com/chartqa-studio-serve:1"),
])
def test_each_targets_create_requests_have_the_exact_shape(target, image, model_tar, tmp_path, monkeypatch):
    import boto3
    from botocore.stub import Stubber

    sm = boto3.client("sagemaker", region_name="us-east-1")
    s3 = _S3()
    monkeypatch.setattr(pkg, "_client", lambda service, *a, **k: sm if service == "sagemaker" else s3)
    image_uri = image or pkg.DEFAULT_IMAGE.format(region="us-east-1")
    env = {"hf-toolkit": {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600",
                          "SAGEMAKER_STARTUP_TIMEOUT": "1200", "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
                          "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "STUDIO_STREAMING": "0",
                          "TOKENIZERS_PARALLELISM": "false"},
           "byoc": {"STUDIO_STREAMING": "1", "TOKENIZERS_PARALLELISM": "false"}}[target]
    data = "s3://b-1/chartqa-studio/endpoints/ep-1/model.tar.gz"
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/ep-1-model"}, {
            "ModelName": "ep-1-model", "ExecutionRoleArn": ROLE,
            "PrimaryContainer": {"Image": image_uri, "ModelDataUrl": data, "Environment": env}})
        config_arn = {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/c"}
        stub.add_response("create_endpoint_config", config_arn, {
            "EndpointConfigName": "ep-1-config", "ProductionVariants": [{
                "VariantName": "AllTraffic", "ModelName": "ep-1-model", "InstanceType": "ml.g5.2xlarge",
                "InitialInstanceCount": 1, "ContainerStartupHealthCheckTimeoutInSeconds": 1800,
                "ModelDataDownloadTimeoutInSeconds": 1800}]})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/ep-1"},
                          {"EndpointName": "ep-1", "EndpointConfigName": "ep-1-config"})
        record = pkg.deploy(model_tar, "ep-1", ROLE, "b-1", tmp_path, image=image, region="us-east-1",
                            target=target, on_progress=lambda m: None)
        stub.assert_no_pending_responses()
    assert s3.uploads == [("b-1", "chartqa-studio/endpoints/ep-1/model.tar.gz")]
    assert (record["target"], record["wire"], record["streams"]) == (target, "seed", target == "byoc")


def test_the_recorded_wire_and_streaming_open_the_endpoint_that_way(tmp_path):
    from eval.backends import open_backend
    from eval.endpoints import endpoint_options
    pkg.save_records(tmp_path, [
        {"name": "tk", "ref": "sagemaker:tk", "target": "hf-toolkit", "wire": "seed", "streams": False,
         "region": "eu-west-1"},
        {"name": "vl", "ref": "sagemaker:vl", "target": "byoc", "wire": "openai", "streams": True},
        {"name": "old", "image": pkg.DEFAULT_IMAGE, "wire": "seed"}])        # recorded before targets existed
    assert endpoint_options(tmp_path, "sagemaker:tk") == {"wire": "seed", "streams": False, "region": "eu-west-1"}
    assert endpoint_options(tmp_path, "sagemaker:old")["streams"] is False
    assert endpoint_options(tmp_path, "sagemaker:elsewhere") == {} == endpoint_options(tmp_path, "local:x")
    backend = open_backend("sagemaker:vl", workspace=tmp_path)
    assert (backend.wire, backend.streams) == ("openai", True)
    tk = open_backend("sagemaker:tk", workspace=tmp_path)
    assert (tk.wire, tk.streams, tk.region) == ("seed", False, "eu-west-1")
    assert open_backend("sagemaker:vl", workspace=tmp_path, wire="seed").wire == "seed"     # explicit wins


def test_byoc_without_an_image_is_refused_before_any_upload(model_tar, tmp_path):
    with pytest.raises(ValueError, match="byoc needs --image.*Dockerfile"):
        pkg.deploy(model_tar, "ep-1", ROLE, "b", tmp_path, target="byoc", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="target 'lmi'"):
        pkg.deploy(model_tar, "ep-1", ROLE, "b", tmp_path, target="lmi", endpoint_url="http://127.0.0.1:9")


def test_the_dockerfile_installs_requirements_txt_pins_and_runs_serve():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    docker = (root / "training/serving/Dockerfile").read_text()
    pins = dict(line.split("==") for line in (root / "requirements.txt").read_text().splitlines() if "==" in line)
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors"):
        assert f"{name}=={pins[name]}" in docker, name
    assert "COPY training/serving/serve /usr/local/bin/serve" in docker and 'CMD ["serve"]' in docker
