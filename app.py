"""Start the LLaVA Chart Studio.

    python app.py                                   # demo model, http://127.0.0.1:7860
    python app.py --base llava-hf/llava-1.5-7b-hf --adapter workspace/runs/my-run/adapter
    python app.py --host 0.0.0.0 --auth-file ~/.studio-login   # exposed: a login (USER:PASSWORD in the file)

With no --base, the shipped demo model is used (assets/demo-llava: a 23M-parameter LLaVA pretrained on
the project's charts, hbar held out) with its shipped hbar LoRA (assets/demo-adapter), so the studio
works offline, on a CPU. The first start builds nothing and trains nothing: it links the model into
WORKSPACE/models, copies the adapter into WORKSPACE/runs and draws the small hbar demo dataset as a
background job at low CPU priority (the Charts tab shows it, and opens the dataset when it is done), so
Compare answers without waiting for it.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

DEMO = "demo"
COMPILE = {"auto": "auto", "on": True, "off": False}     # --compile -> the engine's compile option


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LLaVA fine-tuning and evaluation studio for chart QA.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="workspace", help="folder for datasets, runs, evals and jobs")
    p.add_argument("--base", default=DEMO, help="base model: a local folder or a hub id "
                   "(e.g. llava-hf/llava-1.5-7b-hf); 'demo' is the shipped offline model (assets/demo-llava)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder for side B of Compare "
                   "(default with --base demo: the demo adapter)")
    p.add_argument("--quantize", default="auto", choices=("auto", "4bit", "none"),
                   help="local models on CUDA: auto = bf16 when the base fits in free GPU memory, else 4-bit nf4")
    p.add_argument("--compile", default="auto", choices=tuple(COMPILE),
                   help="local models on CUDA: compile the decode step at load (auto = on with CUDA; ~3 min for a "
                        "7B, ~1.3x faster tokens); off loads in seconds")
    p.add_argument("--auth-file", default=None, help="file holding the USER:PASSWORD login (or set env "
                   "STUDIO_AUTH); required when --host is not loopback")
    p.add_argument("--auth", default=None, help=argparse.SUPPRESS)   # refused: argv shows in the process list
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise SystemExit("the login (--auth-file or STUDIO_AUTH) must be USER:PASSWORD")
    return user, password


def read_auth(args: argparse.Namespace, env=os.environ) -> tuple[str, str] | None:
    """The login from --auth-file or env STUDIO_AUTH, never from argv: any user can read another's
    command line (ps, /proc/PID/cmdline), not their files or environment."""
    if args.auth is not None:
        raise SystemExit("--auth is refused: a password on the command line shows in the process list. "
                         "Put USER:PASSWORD in a file and pass --auth-file PATH, or set env STUDIO_AUTH.")
    if args.auth_file:
        try:
            return parse_auth(Path(args.auth_file).expanduser().read_text(encoding="utf-8"))
        except OSError as e:
            raise SystemExit(f"cannot read --auth-file: {e.strerror}") from None
    return parse_auth(env.get("STUDIO_AUTH"))


def prepare_models(workspace: Path, base: str, adapter: str | None) -> tuple[str, str | None]:
    """Resolve 'demo' to the shipped model and, with no --adapter, its shipped adapter; the demo dataset
    is left to draw_demo_dataset."""
    if base != DEMO:
        return base, adapter
    from training.demo import install_demo

    try:
        base_dir, demo_adapter = install_demo(workspace, dataset=False)
    except FileNotFoundError as e:
        raise SystemExit(f"cannot start on the demo model: {e}") from None
    return str(base_dir), adapter or str(demo_adapter)


BACKGROUND_NICE = 10    # CPU weight ~1/10 of the studio's while both want a core: a first click is barely slowed


def draw_demo_dataset(workspace: Path) -> dict | None:
    """Start drawing WORKSPACE/datasets/demo as a `charts generate` job (the Charts tab follows it like any
    generation and a killed one resumes on the next start); None when it is drawn or already being drawn.
    Drawing it before serving cost ~3 s of every first start on 2 cores; the studio needs it only for
    Benchmark and Fine-tune, so it is drawn at low priority beside the model loading."""
    from charts.config import GenerateConfig
    from training.demo import DEMO_DATASET, demo_dataset_settings
    from training.launchers import LocalLauncher, read_jobs

    out = workspace / "datasets" / DEMO_DATASET
    if (out / "dataset.json").exists():
        return None
    launcher = LocalLauncher(workspace)
    for job in read_jobs(workspace).values():      # one started by an earlier start may still run
        if job.get("task") == "charts" and job.get("kind") == "local" and job.get("status") == "running" \
                and Path(job.get("output_dir", "")) == out.resolve() and launcher.status(job)["status"] == "running":
            return None
    s = demo_dataset_settings(out)
    cfg = GenerateConfig(out=str(out), n=s["n"], kinds=s["kinds"], seed=s["seed"], workers=s["workers"],
                         look=s["look"], multi_turn=s["multi_turn"], qa_per_chart=s["qa_per_chart"],
                         split=",".join(map(str, s["split"])), instruct_share=s["instruct_share"])
    job = launcher.start(cfg, name=DEMO_DATASET)
    lower_priority(job["pid"])
    return job


def lower_priority(pid: int, nice: int = BACKGROUND_NICE) -> None:
    """Make a job (its own session) yield the CPU to the studio. Linux groups each session's processes
    (autogroup) and weighs the groups alike whatever their nice values, so the group's nice is set too."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except (OSError, AttributeError):      # gone already, or no setpriority (Windows)
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:                        # no autogroup (not Linux, or a kernel without it)
        pass


def tune_cpu(env=os.environ) -> None:
    """Before torch is imported: OpenMP threads that wait for work sleep instead of spinning. On a busy
    2-core machine the spinning thread holds a core that the other thread (or a neighbour) needs, and
    a demo-model forward ran 5-10x slower (3 s instead of 0.3-0.6 s); on an idle machine both ways time
    alike (docs/BENCHMARKS.md, "Compare on CPU"). A value the user set is kept; jobs inherit it."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> None:
    tune_cpu()
    args = parse_args(argv)
    auth = read_auth(args)
    os.environ.pop("STUDIO_AUTH", None)       # read once; nothing the studio starts needs it
    if not is_loopback(args.host) and auth is None:
        sys.exit(f"Refusing to listen on {args.host} without a login: give --auth-file PATH (USER:PASSWORD "
                 "in it) or set STUDIO_AUTH.")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    workspace = Path(args.workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    base, adapter = prepare_models(workspace, args.base, args.adapter)
    if args.base == DEMO:
        draw_demo_dataset(workspace)

    from studio.app import CSS, build_app
    from studio.context import Studio

    studio = Studio(workspace=workspace, base=base, adapter=adapter, quantize=args.quantize,
                    compile=COMPILE[args.compile])
    print(f"Base model: {base}" + (f"\nAdapter:    {adapter}" if adapter else ""), flush=True)
    # Load (and on CUDA, compile and capture the decode step) before serving, so no first click waits for it.
    for ref in [f"local:{base}"] + ([f"local:{base}+{adapter}"] if adapter else []):
        studio.pool.backend(ref, on_progress=lambda msg: print(f"  {msg}", flush=True), **studio.local_options())
    print("Loaded: " + "; ".join(e["mode"] for e in studio.pool.loaded()), flush=True)
    app = build_app(studio)
    app.queue(default_concurrency_limit=4)
    # Gradio serves files only from allowed places: the workspace holds every chart and report shown.
    app.launch(server_name=args.host, server_port=args.port, share=False, auth=auth, css=CSS,
               show_error=True, inbrowser=False, allowed_paths=[str(workspace), str(Path(__file__).parent / "assets")])


if __name__ == "__main__":
    main()
