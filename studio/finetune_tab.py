"""Fine-tune tab: a form generated from TrainConfig, launch locally or on SageMaker, watch jobs.

Thin UI: every callback calls training.config / training.launchers / training.sagemaker and formats
the result. The form has one input per TrainConfig field (label = CLI flag, info = the field's help).
"""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from charts.io import inside
from eval.demo import DEMO_NAME, is_demo_model
from eval.display import pct, rounded
from eval.report import training_chart
from studio.context import Studio
from training.config import PRESETS, TrainConfig, command, form_fields, preset
from training.launchers import LocalLauncher, all_jobs, find_job, job_adapter, read_jobs, read_metrics
from training.sagemaker import SageMakerLauncher, SageMakerSettings

# every job of the workspace (fine-tunes, benchmarks, generations) by short name; scores beside it; accuracy in
# percent like every accuracy of the studio; the full id last
JOB_COLUMNS = ["job", "status", "progress (%)", "step", "loss", "eval_loss", "eval accuracy (%)", "task", "kind",
               "created", "id"]
FIELDS = form_fields()
SKIPPED = {"output_dir"}          # chosen by the launcher (runs/NAME)


def _input(f: dict, value):
    label, info = f"{f['flag']}", f["help"]
    if f["choices"]:
        return gr.Dropdown(list(f["choices"]), value=value, label=label, info=info)
    if f["type"] is bool:
        return gr.Checkbox(value=value, label=label, info=info)
    if f["type"] in (int, float):
        return gr.Number(value=value, label=label, info=info, precision=0 if f["type"] is int else None)
    return gr.Textbox(value=value, label=label, info=info)


def _initial(studio: Studio, name: str, datasets: list[str]) -> TrainConfig:
    """The preset with this workspace's model and first dataset filled in, so Launch works as is: the demo
    preset trains the workspace's demo model; other presets keep their hub id unless the studio runs a
    real base, which then wins."""
    overrides = {"data": str(studio.path("datasets", datasets[0]))} if datasets else {}
    if name == "demo-cpu":
        overrides["model"] = str(studio.path("models", DEMO_NAME))
    elif not is_demo_model(studio.base):
        overrides["model"] = studio.base
    return preset(name, **overrides) if name in PRESETS else TrainConfig(**{"model": studio.base, **overrides})


def _config(names: list[str], values) -> TrainConfig:
    return TrainConfig.from_dict({n: v for n, v in zip(names, values) if v is not None})


def _settings(role, bucket, region, instance_type, count, spot, hours) -> SageMakerSettings:
    hours = float(hours or 24)
    return SageMakerSettings(role=role.strip(), bucket=bucket.strip(), region=region.strip() or "us-east-1",
                             instance_type=instance_type, instance_count=int(count or 1), spot=bool(spot),
                             max_runtime_s=int(hours * 3600), max_wait_s=int(hours * 3600 * 1.5))


def _jobs_table(workspace: Path, remote: bool = True):
    """Every job; `remote=False` (the timer) asks only local processes, not SageMaker, for a fresh status."""
    import pandas as pd

    rows = all_jobs(workspace, refresh=True) if remote else \
        [LocalLauncher(workspace).status(j) if j.get("kind") == "local" else j for j in all_jobs(workspace, False)]
    for r in rows:
        r["created"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.get("created", 0)))
        r["loss"], r["eval_loss"] = rounded(r.get("loss"), 3), rounded(r.get("eval_loss"), 3)
        r["eval accuracy (%)"] = pct(r.get("eval_relaxed_accuracy"))
        r["job"], r["progress (%)"] = r.get("short"), r.get("progress")
    return pd.DataFrame([{c: r.get(c) for c in JOB_COLUMNS} for r in rows], columns=JOB_COLUMNS)


def _curves(job: dict | None):
    """Loss beside eval accuracy for one job, every point marked (eval points are few)."""
    train = job and job.get("task", "train") == "train" and job.get("output_dir")
    return training_chart(read_metrics(job["output_dir"]) if train else [])


def build(studio: Studio) -> dict:
    workspace = studio.workspace
    names = [f["name"] for f in FIELDS if f["name"] not in SKIPPED]
    datasets = _datasets(workspace)
    # A CPU studio on the demo model starts on the demo preset; a real base on the seed's QLoRA recipe.
    first = "demo-cpu" if is_demo_model(studio.base) else "llava-1.5-7b-qlora"
    initial = _initial(studio, first, datasets)
    with gr.Row():
        preset_box = gr.Dropdown(["(defaults)"] + list(PRESETS), value=first, label="Preset")
        dataset_box = gr.Dropdown(datasets, value=datasets[0] if datasets else None,
                                  label="Dataset (workspace/datasets/*)", allow_custom_value=True)
        run_name = gr.Textbox(label="Run name (runs/NAME-timestamp)", placeholder="optional")
    inputs: dict[str, gr.components.Component] = {}
    groups = {}
    for f in FIELDS:
        groups.setdefault(f["group"], []).append(f)
    for group, fields in groups.items():
        with gr.Accordion(f"{group} settings", open=group in ("data", "recipe")):
            with gr.Row(equal_height=False):
                for f in fields:
                    if f["name"] not in SKIPPED:
                        inputs[f["name"]] = _input(f, getattr(initial, f["name"]))
    with gr.Row():
        yaml_path = gr.Textbox(label="YAML file (inside the workspace)", value="configs/run.yaml")
        save_btn, load_btn, cmd_btn = gr.Button("Save YAML"), gr.Button("Load YAML"), gr.Button("Show command")
    cmd_out = gr.Code(label="Command / messages", language="shell")
    with gr.Accordion("Where it runs", open=True):
        with gr.Row():
            target = gr.Radio(["local", "sagemaker"], value="local", label="Target")
            gpus = gr.Number(value=1, precision=0, label="Local GPUs (torchrun when > 1)")
        with gr.Row():
            role = gr.Textbox(label="SageMaker role ARN")
            bucket = gr.Textbox(label="S3 bucket")
            region = gr.Textbox(value="us-east-1", label="Region")
            instance_type = gr.Dropdown(["ml.g5.2xlarge", "ml.g5.12xlarge", "ml.g6e.2xlarge", "ml.g6e.12xlarge",
                                         "ml.p4d.24xlarge"], value="ml.g5.2xlarge", label="Instance type",
                                        allow_custom_value=True)
            count = gr.Number(value=1, precision=0, label="Instances")
            spot = gr.Checkbox(value=True, label="Spot")
            hours = gr.Number(value=24, label="Max runtime (hours)")
        with gr.Row():
            estimate_btn, launch_btn = gr.Button("Estimate cost"), gr.Button("Launch", variant="primary")
    jobs = gr.Dataframe(_jobs_table(workspace), label="Jobs (fine-tunes, benchmarks, generations)",
                        interactive=False)
    with gr.Row():
        job_box = gr.Dropdown(_job_choices(workspace), label="Job", allow_custom_value=True)
        refresh_btn, stop_btn = gr.Button("Refresh"), gr.Button("Stop", variant="stop")
        resume_btn = gr.Button("Resume")
        compare_btn = gr.Button("Compare this checkpoint")
    compare_adapter = gr.Textbox(label="Adapter of the selected job", interactive=False)
    plot = gr.Plot(_curves(None), label="loss and eval accuracy")
    log = gr.Textbox(label="Log tail", lines=14, max_lines=14, autoscroll=True)
    timer = gr.Timer(5.0)
    sm_inputs = [role, bucket, region, instance_type, count, spot, hours]
    form = [inputs[n] for n in names]

    # ---------------------------------------------------------------- callbacks
    def apply_preset(name):
        cfg = _initial(studio, name, datasets)
        return [getattr(cfg, n) for n in names]

    def pick_dataset(name):
        return str(workspace / "datasets" / name) if name else gr.update()

    def show_command(*values):
        return command(_config(names, values))

    def save_yaml(path, *values):
        try:
            path = yaml_file(workspace, path)
            cfg = _config(names, values)
        except (ValueError, TypeError) as e:
            return f"# not saved: {e}"
        cfg.to_yaml(path)
        return f"# saved {path}\n" + command(cfg, str(path))

    def load_yaml(path):
        try:
            cfg = TrainConfig.from_yaml(yaml_file(workspace, path, must_exist=True))
        except Exception as e:           # noqa: BLE001 - bad path or bad YAML: a message, not a traceback
            raise gr.Error(f"not loaded: {e}")
        return [getattr(cfg, n) for n in names]

    def estimate(*sm):
        return SageMakerLauncher(workspace, _settings(*sm)).estimate()["text"]

    def launch(where, n_gpus, name, *rest):
        sm, values = rest[:len(sm_inputs)], rest[len(sm_inputs):]
        try:
            cfg = _config(names, values)
            job = (LocalLauncher(workspace).start(cfg, name or None, gpus=int(n_gpus or 1)) if where == "local"
                   else SageMakerLauncher(workspace, _settings(*sm)).start(cfg, name or None))
        except Exception as e:           # config / AWS errors are for the user to fix: show them
            return f"# not launched: {e}", _jobs_table(workspace), gr.update()
        return (f"# launched {job['id']} ({job['short']})", _jobs_table(workspace),
                gr.update(choices=_job_choices(workspace), value=job["id"]))

    def watch(job_id, *sm):
        job = find_job(workspace, job_id or "")
        if not job:
            return _curves(None), "", ""
        launcher = _launcher(workspace, job, sm)
        try:
            text = launcher.logs(job, 40)
        except Exception as e:
            text = f"(logs unavailable: {e})"
        return _curves(job), text, job_adapter(job)

    def stop(job_id, *sm):
        job = find_job(workspace, job_id or "")
        if job:
            _launcher(workspace, job, sm).stop(job)
        return _jobs_table(workspace)

    def resume(job_id):
        """A stopped or killed local job continues from its newest complete checkpoint, same run folder."""
        try:
            job = LocalLauncher(workspace).resume((find_job(workspace, job_id or "") or {}).get("id", job_id or ""))
        except ValueError as e:
            return f"# not resumed: {e}", _jobs_table(workspace)
        return f"# resumed {job['id']}", _jobs_table(workspace)

    # ---------------------------------------------------------------- wiring
    preset_box.change(apply_preset, preset_box, form)
    dataset_box.change(pick_dataset, dataset_box, inputs["data"])
    cmd_btn.click(show_command, form, cmd_out)
    save_btn.click(save_yaml, [yaml_path] + form, cmd_out)
    load_btn.click(load_yaml, yaml_path, form)
    estimate_btn.click(estimate, sm_inputs, cmd_out)
    launch_btn.click(launch, [target, gpus, run_name] + sm_inputs + form, [cmd_out, jobs, job_box])

    def lists():     # jobs started elsewhere (CLI, another tab, before a reload) appear in the table and the picker
        return (_jobs_table(workspace), gr.Dropdown(choices=_job_choices(workspace)),
                gr.Dropdown(choices=_datasets(workspace)))

    refresh_btn.click(lists, None, [jobs, job_box, dataset_box])
    stop_btn.click(stop, [job_box] + sm_inputs, jobs)
    resume_btn.click(resume, job_box, [cmd_out, jobs])
    job_box.change(watch, [job_box] + sm_inputs, [plot, log, compare_adapter])
    timer.tick(watch, [job_box] + sm_inputs, [plot, log, compare_adapter])
    timer.tick(lambda: _jobs_table(workspace, remote=False), None, jobs)   # progress of every job, whoever started it
    return {"on_load": [(lists, None, [jobs, job_box, dataset_box])], "inputs": inputs, "preset": preset_box,
            "dataset": dataset_box, "jobs": jobs, "job": job_box,
            "plot": plot, "log": log, "timer": timer, "launch": launch_btn, "stop": stop_btn, "resume": resume_btn,
            "compare_adapter": compare_adapter, "compare_button": compare_btn}   # wired in studio/app.py


def yaml_file(workspace: Path, path: str, must_exist: bool = False) -> Path:
    """The YAML file a user typed, confined to the workspace (relative names are taken from it)."""
    full = inside(workspace, path)
    if full.suffix not in (".yaml", ".yml"):
        raise ValueError(f"{path} is not a .yaml / .yml file")
    if must_exist and not full.is_file():
        raise ValueError(f"no such file in the workspace: {path}")
    return full


def _job_choices(workspace: Path) -> list[tuple[str, str]]:
    """(short name, id) of every job, newest first: the picker shows `bench-3`, callbacks get the id."""
    jobs = sorted(read_jobs(workspace).values(), key=lambda j: -j.get("created", 0))
    return [(f"{j['short']} · {j['id']}", j["id"]) for j in jobs]


def _datasets(workspace: Path) -> list[str]:
    from charts import list_datasets
    return list_datasets(workspace)


def _launcher(workspace: Path, job: dict, sm):
    if job.get("kind") == "sagemaker":
        return SageMakerLauncher(workspace, _settings(*sm))
    return LocalLauncher(workspace)
