"""SageMaker training jobs: against a moto server (S3 upload, create/describe/list, CloudWatch logs) and
botocore's Stubber (the exact request, status progressions moto cannot play, stop). No real AWS."""
import io
import re
import tarfile
import time

import pytest

from training.config import preset
from training.sagemaker import (METRIC_DEFINITIONS, SageMakerError, SageMakerLauncher, SageMakerSettings,
                                billed_cost, build_request, estimate_cost, pack_code)

ROLE = "arn:aws:iam::123456789012:role/studio-training"


def _session():
    import boto3
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1")


@pytest.fixture
def dataset(tmp_path):
    from test_train import make_dataset
    return make_dataset(tmp_path / "ds", n_train=3)


def test_start_uploads_code_and_data_and_creates_a_fastfile_spot_job(moto_url, dataset, tmp_path):
    settings = SageMakerSettings(role=ROLE, bucket="studio-bucket", endpoint_url=moto_url)
    launcher = SageMakerLauncher(tmp_path, settings, session=_session())
    launcher.client("s3").create_bucket(Bucket="studio-bucket")
    job = launcher.start(preset("llava-1.5-7b-qlora", data=str(dataset)), name="chart qa/run_1")
    assert re.fullmatch(r"chart-qa-run-1-\d{8}-\d{6}", job["id"])
    keys = [o["Key"] for o in launcher.client("s3").list_objects_v2(Bucket="studio-bucket")["Contents"]]
    assert f"llava-studio/jobs/{job['id']}/sourcedir.tar.gz" in keys
    data = f"llava-studio/jobs/{job['id']}/data"
    assert f"{data}/train.jsonl" in keys and f"{data}/images/train0.png" in keys
    desc = launcher.client("sagemaker").describe_training_job(TrainingJobName=job["id"])
    assert desc["InputDataConfig"][0]["InputMode"] == "FastFile"
    assert desc["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://studio-bucket/{data}/"
    assert desc["EnableManagedSpotTraining"] is True
    assert launcher.status(job)["status"] == "completed"         # moto completes jobs at once
    fresh = SageMakerLauncher(tmp_path, settings, session=_session())
    assert [j["id"] for j in fresh.list()] == [job["id"]]


def test_logs_come_from_the_training_jobs_log_group(moto_url, tmp_path):
    launcher = SageMakerLauncher(tmp_path, SageMakerSettings(endpoint_url=moto_url), session=_session())
    logs = launcher.client("logs")
    group, stream, now = "/aws/sagemaker/TrainingJobs", "logs-job-1/algo-1-1700000000", int(time.time() * 1000)
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
        {"timestamp": now + i, "message": f"{{'loss': '{2.0 - i / 10}', 'epoch': '{i}'}}"} for i in range(5)])
    text = launcher.logs({"id": "logs-job-1"}, tail_lines=2)
    assert text.splitlines() == ["{'loss': '1.7', 'epoch': '3'}", "{'loss': '1.6', 'epoch': '4'}"]


def _stubbed(tmp_path, **settings):
    from botocore.stub import Stubber
    launcher = SageMakerLauncher(tmp_path, SageMakerSettings(role=ROLE, bucket="b-1", **settings), session=_session())
    sm, s3 = Stubber(launcher.client("sagemaker")), Stubber(launcher.client("s3"))
    return launcher, sm, s3


def test_the_create_request_has_the_exact_documented_shape(tmp_path):
    from botocore.stub import ANY
    launcher, sm, s3 = _stubbed(tmp_path, instance_type="ml.g5.12xlarge", max_runtime_s=7200, max_wait_s=10800)
    cfg = preset("llava-1.5-7b-qlora", data="s3://b-1/data/charts/")
    s3.add_response("put_object", {}, {"Bucket": "b-1", "Key": ANY, "Body": ANY})
    captured = {}
    sm.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/x"},
                    {k: ANY for k in build_request(cfg, launcher.settings, "x", "s3://b/c", "s3://b/d")})
    with sm, s3:
        client = launcher.client("sagemaker")
        client.meta.events.register("provide-client-params.sagemaker.CreateTrainingJob",
                                    lambda params, **kw: captured.update(params))
        job = launcher.start(cfg, name="shape")
    r = captured
    assert r["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    assert "huggingface-pytorch-training" in r["AlgorithmSpecification"]["TrainingImage"]
    assert {m["Name"] for m in r["AlgorithmSpecification"]["MetricDefinitions"]} == \
        {"loss", "eval_loss", "learning_rate", "epoch", "eval_relaxed_accuracy"}
    assert r["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 10800}
    assert r["CheckpointConfig"] == {"S3Uri": f"s3://b-1/llava-studio/checkpoints/{job['id']}",
                                     "LocalPath": "/opt/ml/checkpoints"}
    hp = r["HyperParameters"]
    assert hp["sagemaker_program"] == '"sagemaker_entry.py"' and hp["sagemaker_torch_distributed_enabled"] == "true"
    assert hp["sagemaker_submit_directory"] == f'"s3://b-1/llava-studio/jobs/{job["id"]}/sourcedir.tar.gz"'
    assert hp["data"] == '""' and len(hp) <= 100 and all(len(v) <= 2500 for v in hp.values())
    assert r["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://b-1/data/charts/"
    assert r["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"


def test_status_follows_inprogress_completed_failed_spot_interrupted_and_stop(tmp_path):
    launcher, sm, _ = _stubbed(tmp_path)
    base = {"TrainingJobName": "j", "TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/j",
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
            "AlgorithmSpecification": {"TrainingInputMode": "FastFile"},
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100},
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600}, "CreationTime": 0}
    sm.add_response("describe_training_job", {**base, "TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"})
    sm.add_response("describe_training_job", {
        **base, "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed", "BillableTimeInSeconds": 1200,
        "TrainingTimeInSeconds": 3600, "FinalMetricDataList": [{"MetricName": "eval_relaxed_accuracy", "Value": 0.61},
                                                               {"MetricName": "loss", "Value": 0.42}]})
    sm.add_response("describe_training_job", {**base, "TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
                                              "FailureReason": "AlgorithmError: CUDA out of memory"})
    sm.add_response("describe_training_job", {**base, "TrainingJobStatus": "Stopped",
                                              "SecondaryStatus": "MaxWaitTimeExceeded"})
    sm.add_response("stop_training_job", {}, {"TrainingJobName": "j"})
    job = {"id": "j", "kind": "sagemaker", "created": 1}
    with sm:
        assert launcher.status(job)["status"] == "running"
        done = launcher.status(job)
        assert (done["status"], done["eval_relaxed_accuracy"], done["spot_savings"]) == ("completed", 0.61, 0.6667)
        assert done["cost_usd"] == pytest.approx(1.515 * 1200 / 3600, abs=1e-3)
        assert "out of memory" in launcher.status(job)["detail"]
        assert "spot capacity not regained within max wait" in launcher.status(job)["detail"]
        assert launcher.stop(job)["status"] == "stopping"


def _describe(status, secondary):
    return {"TrainingJobName": "j", "TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/j",
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
            "AlgorithmSpecification": {"TrainingInputMode": "FastFile"},
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100},
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600}, "CreationTime": 0,
            "TrainingJobStatus": status, "SecondaryStatus": secondary}


@pytest.mark.parametrize("status, secondary, shown, detail", [
    ("InProgress", "Interrupted", "running", "waiting for capacity to resume"),   # a reclaim it comes back from
    ("Stopped", "Interrupted", "stopped", "stopped while its spot instance was reclaimed"),
    ("Stopped", "MaxWaitTimeExceeded", "stopped", "not regained within max wait"),
    ("Stopped", "Stopped", "stopped", "stopped on request"),
])
def test_spot_secondary_statuses_say_what_happened(tmp_path, status, secondary, shown, detail):
    launcher, sm, _ = _stubbed(tmp_path)
    sm.add_response("describe_training_job", _describe(status, secondary))
    with sm:
        got = launcher.status({"id": "j", "kind": "sagemaker", "created": 1})
    assert got["status"] == shown and detail in got["detail"]
    if secondary != "MaxWaitTimeExceeded":
        assert "not regained" not in got["detail"]


def test_stopping_a_finished_job_says_so_without_a_traceback(tmp_path):
    launcher, sm, _ = _stubbed(tmp_path)
    sm.add_client_error("stop_training_job", "ValidationException", http_status_code=400,
                        service_message="The request was rejected because the training job is in status Completed.")
    sm.add_response("describe_training_job", _describe("Completed", "Completed"))
    with sm:
        result = launcher.stop({"id": "j", "kind": "sagemaker", "created": 1})
    assert result["status"] == "completed" and result["message"] == "j already completed; nothing to stop"


def test_each_job_gets_its_own_copy_of_the_dataset_so_removed_files_do_not_leak(moto_url, dataset, tmp_path):
    settings = SageMakerSettings(role=ROLE, bucket="studio-bucket", endpoint_url=moto_url)
    launcher = SageMakerLauncher(tmp_path, settings, session=_session())
    s3 = launcher.client("s3")
    s3.create_bucket(Bucket="studio-bucket")
    stale = dataset / "images" / "stale.png"
    stale.write_bytes(b"old")
    first = launcher.start(preset("llava-1.5-7b-qlora", data=str(dataset)), name="first")
    stale.unlink()
    second = launcher.start(preset("llava-1.5-7b-qlora", data=str(dataset)), name="second")
    assert first["data"] != second["data"]
    prefix = second["data"].removeprefix("s3://studio-bucket/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="studio-bucket", Prefix=prefix)["Contents"]]
    assert keys and not any(k.endswith("stale.png") for k in keys)


@pytest.mark.parametrize("settings, message", [
    ({"role": ""}, "role ARN"),
    ({"bucket": ""}, "bucket"),
    ({"max_runtime_s": 7200, "max_wait_s": 3600}, "max wait"),
])
def test_bad_settings_are_refused_before_any_aws_call(tmp_path, settings, message):
    launcher, sm, s3 = _stubbed(tmp_path)
    launcher.settings = SageMakerSettings(**{"role": ROLE, "bucket": "b-1", **settings})
    with sm, s3, pytest.raises(SageMakerError, match=message):      # a stub with no responses: any call fails
        launcher.start(preset("llava-1.5-7b-qlora", data="s3://b-1/d/"))


def test_names_and_hyperparameter_limits_are_checked_before_aws(tmp_path):
    s = SageMakerSettings(role=ROLE, bucket="b-1")
    cfg = preset("llava-1.5-7b-qlora")
    with pytest.raises(SageMakerError, match="63 characters"):
        build_request(cfg, s, "x" * 64, "s3://b/c", "s3://b/d")
    with pytest.raises(SageMakerError, match="letters, digits"):
        build_request(cfg, s, "bad_name", "s3://b/c", "s3://b/d")
    with pytest.raises(ValueError, match="2500"):
        build_request(cfg.replace(lora_target="a" * 2600), s, "ok", "s3://b/c", "s3://b/d")


def test_metric_regexes_read_trainer_log_lines_quoted_or_bare():
    lines = ["{'loss': '1.234', 'grad_norm': '2', 'learning_rate': '1.9e-05', 'epoch': '0.5'}",
             "{'eval_loss': 0.98, 'epoch': 1.0}", "{'eval_relaxed_accuracy': 0.4375, 'epoch': 1.0}"]
    found = {m["Name"]: float(re.search(m["Regex"], " ".join(lines)).group(1)) for m in METRIC_DEFINITIONS}
    assert found == {"loss": 1.234, "eval_loss": 0.98, "learning_rate": 1.9e-05, "epoch": 0.5,
                     "eval_relaxed_accuracy": 0.4375}


def test_cost_estimate_before_and_billed_cost_after():
    est = estimate_cost(SageMakerSettings(instance_type="ml.g5.2xlarge", instance_count=2, max_runtime_s=7200))
    assert est["max_usd"] == pytest.approx(1.515 * 2 * 2) and est["spot_max_usd"] == pytest.approx(6.06 * 0.35)
    assert estimate_cost(SageMakerSettings(instance_type="ml.x9.huge"))["max_usd"] is None
    billed = billed_cost({"ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1},
                          "BillableTimeInSeconds": 3600, "TrainingTimeInSeconds": 3600})
    assert billed["cost_usd"] == pytest.approx(1.515) and billed["spot_savings"] == 0


def test_code_package_holds_the_entry_script_and_the_packages():
    with tarfile.open(fileobj=io.BytesIO(pack_code()), mode="r:gz") as tar:
        names = set(tar.getnames())
        entry = tar.extractfile("sagemaker_entry.py").read().decode()
    assert {"sagemaker_entry.py", "requirements.txt", "training/train.py", "training/deepspeed/zero2.json",
            "charts/validate.py", "eval/metrics.py"} <= names
    assert "from training.train import main" in entry and not any("__pycache__" in n for n in names)


def test_a_multi_instance_job_asks_for_torchrun_on_every_host_in_the_exact_request(tmp_path, monkeypatch):
    """2 x ml.g5.2xlarge (one GPU each): the request the HF training container turns into torchrun with
    --nnodes 2, each host reading the whole (FullyReplicated) dataset and each rank its share of it."""
    import training.sagemaker as sm_module

    launcher, sm, s3 = _stubbed(tmp_path, instance_type="ml.g5.2xlarge", instance_count=2, spot=False)
    monkeypatch.setattr(sm_module, "job_name", lambda base: "multi-host-1")
    cfg = preset("llava-1.5-7b-qlora", mode="lora", deepspeed="zero2", data="s3://b-1/data/charts/")
    code = "s3://b-1/llava-studio/jobs/multi-host-1/sourcedir.tar.gz"
    expected = build_request(cfg, launcher.settings, "multi-host-1", code, "s3://b-1/data/charts/")
    # what the request must say, spelled out rather than taken from build_request alone
    assert expected["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100}
    assert expected["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert expected["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataDistributionType"] == "FullyReplicated"
    assert expected["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in expected["StoppingCondition"]
    from botocore.stub import ANY
    s3.add_response("put_object", {}, {"Bucket": "b-1", "Key": "llava-studio/jobs/multi-host-1/sourcedir.tar.gz",
                                       "Body": ANY})
    arn = "arn:aws:sagemaker:us-east-1:1:training-job/multi-host-1"
    sm.add_response("create_training_job", {"TrainingJobArn": arn}, expected)
    with sm, s3:
        job = launcher.start(cfg)
    sm.assert_no_pending_responses()
    assert job["instance_count"] == 2 and job["id"] == "multi-host-1"
    assert job["estimate"].startswith("2 x ml.g5.2xlarge")


def test_one_single_gpu_instance_runs_without_torchrun():
    settings = SageMakerSettings(role=ROLE, bucket="b-1", spot=False)
    request = build_request(preset("llava-1.5-7b-qlora", mode="lora"), settings, "one", "s3://b/c", "s3://b/d")
    assert "sagemaker_torch_distributed_enabled" not in request["HyperParameters"]
    assert request["ResourceConfig"]["InstanceCount"] == 1


@pytest.mark.parametrize("count, instance_type, message", [
    (0, "ml.g5.2xlarge", "at least 1"), (2.0, "ml.g5.2xlarge", "whole number"), (True, "ml.g5.2xlarge", "whole number"),
    ("2", "ml.g5.2xlarge", "whole number"), (2, "ml.m5.xlarge", "several instances need a GPU type"),
])
def test_a_bad_instance_count_is_refused_before_any_aws_call(tmp_path, count, instance_type, message):
    launcher, sm, s3 = _stubbed(tmp_path)
    launcher.settings = SageMakerSettings(role=ROLE, bucket="b-1", instance_type=instance_type, instance_count=count)
    with sm, s3, pytest.raises(SageMakerError, match=message):      # a stub with no responses: any call fails
        launcher.start(preset("llava-1.5-7b-qlora", data="s3://b-1/d/"))
