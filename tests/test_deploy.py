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
