"""training.train under torchrun: 2 CPU processes with the gloo backend on the tiny demo model (LoRA).

The same launch as on GPUs (`python -m torch.distributed.run --nproc_per_node 2 -m training.train ...`), on
loopback with one torch thread per process. Checked: the run completes; metrics.jsonl, result.json and the
adapter are written once, by rank 0; every rank trains on its own share of each epoch, so a step consumes
world_size x per-device batch samples; and both ranks killed after a checkpoint, then relaunched, end with
exactly the adapter of an uninterrupted 2-process run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# 12 samples, 2 per device, 2 ranks: 3 steps an epoch (a single process would take 6); checkpoints every 4
# steps fall mid-epoch, where a resumed epoch's shard of the shuffle must equal the original's. LoRA
# dropout draws from each rank's RNG, whose state the resume restores per rank (rng_state_<rank>.pth).
RUN = {"max_steps": 8, "per_device_batch_size": 2, "max_train_samples": 12, "save_steps": 4,
       "save_total_limit": 2, "logging_steps": 1, "eval_limit": 0, "lora_dropout": 0.1, "warmup_ratio": 0.1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)          # torchrun sets these per worker
    return env


def _argv(model, data, out, **kw) -> list[str]:
    argv = ["--preset", "demo-cpu", "--model", str(model), "--data", str(data), "--output_dir", str(out)]
    for k, v in {**RUN, **kw}.items():
        argv += [f"--{k}", str(v)]
    return argv


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "training.train", *argv]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                            # ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the workers, then the launcher: torchrun starts each worker in a session of its own, so
    killing its process group would leave them training."""
    for pid in _children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait(timeout=30)


def _run(argv: list[str], log: Path, timeout: float = 150) -> int:
    proc = _start(argv, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_all(proc)


def _start_until_checkpoint(argv: list[str], out: Path, log: Path, step: int) -> subprocess.Popen:
    """Both ranks started, and running still once checkpoint-STEP is complete."""
    from training.checkpoints import COMPLETE_MARKER
    proc = _start(argv, log)
    marker = out / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER
    deadline = time.time() + 120
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            _kill_all(proc)
            raise AssertionError(f"no checkpoint-{step} before the run ended (rc {proc.returncode}):\n"
                                 + log.read_text()[-4000:])
        time.sleep(0.01)
    return proc


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import charts
    out = tmp_path_factory.mktemp("ds") / "charts"
    charts.generate(6, seed=3, out_dir=str(out), workers=1, qa_per_chart=3, split=(0.8, 0.1, 0.1))
    return out


@pytest.fixture(scope="module")
def reference(demo_model, data, tmp_path_factory):
    """One uninterrupted 2-process run: (output folder, its log)."""
    out = tmp_path_factory.mktemp("ddp-reference")
    log = out.parent / (out.name + ".log")
    rc = _run(_argv(demo_model, data, out), log)
    assert rc == 0, log.read_text()[-4000:]
    return out, log.read_text()


# ---------------------------------------------------------------- the sampler's shards (no processes)
@pytest.mark.parametrize("lengths", [None, [5, 9, 3, 7, 7, 2, 8, 4, 6, 1, 9, 3]])
def test_each_rank_gets_a_disjoint_share_of_an_epoch_in_an_order_from_seed_and_epoch(lengths):
    """What the Trainer's accelerator does to EpochSampler's loader on each of 2 ranks: the ranks' batches
    are disjoint and together the whole epoch; a resume that skips finished batches sees the same shard."""
    from accelerate import skip_first_batches
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from training.data import EpochSampler

    def shard(rank, epoch, seed=42, skip=0, draws=0):
        torch.randn(draws)                      # whatever the global RNG went through before
        sampler = EpochSampler(12, seed=seed, batch_size=2, lengths=lengths)
        loader = prepare_data_loader(DataLoader(list(range(12)), batch_size=2, sampler=sampler),
                                     device=torch.device("cpu"), num_processes=WORLD, process_index=rank,
                                     put_on_device=False)
        loader = skip_first_batches(loader, skip) if skip else loader
        sampler.set_epoch(epoch)                # what LlavaTrainer._run_epoch does before each epoch
        loader.set_epoch(epoch)                 # and the stock Trainer (it does not reach a skipped shard's)
        return [b.tolist() for b in loader]

    ranks = [shard(r, epoch=2) for r in range(WORLD)]
    seen = [i for batches in ranks for b in batches for i in b]
    assert sorted(seen) == list(range(12)), "the shares overlap or leave samples out"
    assert all(len(batches) == 3 for batches in ranks)      # 12 samples / (2 ranks x 2 per device)
    assert shard(1, epoch=2, draws=5) == ranks[1] and shard(1, epoch=2, skip=1, draws=3) == ranks[1][1:]
    assert shard(0, epoch=3) != ranks[0] and shard(0, epoch=2, seed=7) != ranks[0]


# ---------------------------------------------------------------- torchrun, 2 processes
def test_two_processes_complete_and_rank_zero_alone_writes_metrics_result_and_adapter(reference):
    out, log = reference
    assert log.count('"status": "completed"') == 1, "the result line is printed by every rank"
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == WORLD
    assert result["effective_batch_size"] == WORLD * RUN["per_device_batch_size"]
    rows = _rows(out)                           # every line parses: no torn or interleaved writes
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, RUN["max_steps"] + 1)), "one loss row per step, from one writer"
    # 12 samples, world_size x per-device batch = 4 a step: epoch 1 ends at step 3 (6 in one process).
    assert next(r["epoch"] for r in rows if r["step"] == 3) == pytest.approx(1.0)
    adapter = _adapter(out)
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "README.md").is_file()
    ckpt = out / "checkpoints" / f"checkpoint-{RUN['max_steps']}"
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == [f"rng_state_{r}.pth" for r in range(WORLD)]


def test_both_ranks_killed_after_a_checkpoint_then_relaunched_end_with_the_uninterrupted_adapter(
        demo_model, data, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    argv = _argv(demo_model, data, out)
    proc = _start_until_checkpoint(argv, out, log, 4)
    _kill_all(proc)                             # launcher and both workers, no chance to save
    assert not (out / "adapter").exists(), "the run finished before it could be killed"
    assert _run(argv, log) == 0, log.read_text()[-4000:]
    assert "resuming from" in log.read_text()
    want = _adapter(reference[0])
    got = _adapter(out)
    assert set(got) == set(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)}/{len(want)} tensors differ, e.g. {different[:3]}"
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps == list(range(1, RUN["max_steps"] + 1)), "rows past the checkpoint were not redone once"


# ---------------------------------------------------------------- DeepSpeed (only where it is installed)
@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, False), ("zero3_offload", 3, True)])
def test_the_shipped_zero_configs_pass_the_trainers_deepspeed_checks_with_autos_filled_in(name, stage, offload):
    """The HF Trainer's own validation of the JSON (the `deepspeed=` argument) and DeepSpeed's parser; the
    "auto" batch sizes become the run's: 2 per device x 4 accumulation x world size."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments

    from training.config import preset
    from training.train import deepspeed_config

    path = deepspeed_config(preset("demo-cpu", mode="lora", deepspeed=name))
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             deepspeed=path, report_to="none", use_cpu=True)
    ds = args.hf_deepspeed_config
    assert ds.is_zero3() == (stage == 3) and ds.is_offload() == offload
    cfg = ds.config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2, 4)
    assert cfg["train_batch_size"] == 2 * 4 * args.world_size
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_config.stage == stage
    assert (parsed.zero_config.offload_param is not None) == offload


@pytest.mark.parametrize("stage", ["zero2", "zero3_offload"])
def test_deepspeed_on_two_cpu_processes_saves_the_whole_adapter_of_the_ddp_run(demo_model, data, reference, stage,
                                                                               tmp_path):
    """ZeRO-2, and ZeRO-3 with parameters and optimizer offloaded to the CPU, under the same torchrun launch
    (DeepSpeed's CPU accelerator, its comm op built just in time on first use). ZeRO-3 partitions every
    parameter across the ranks: the adapter must hold the gathered tensors, the DDP run's up to float noise."""
    pytest.importorskip("deepspeed")
    out, log = tmp_path / "run", tmp_path / "log.txt"
    assert _run(_argv(demo_model, data, out, deepspeed=stage), log, timeout=400) == 0, log.read_text()[-4000:]
    want, got = _adapter(reference[0]), _adapter(out)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst < 1e-3, f"{stage} adapter differs from the DDP run's by {worst}"
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, RUN["max_steps"] + 1))


def _worker(proc: subprocess.Popen, rank: int) -> int:
    for pid in _children(proc.pid):
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} worker under torchrun")


def test_sigterm_reaching_one_rank_stops_all_ranks_at_the_same_checkpoint_and_the_rerun_matches(
        demo_model, data, reference, tmp_path):
    """A signal seen by one rank only (one process sent it, or it came late) must not leave that rank in the
    checkpoint barrier while the other waits in the next step's all-reduce: the ranks agree each step."""
    from training.checkpoints import complete_checkpoints

    out, log = tmp_path / "run", tmp_path / "log.txt"
    argv = _argv(demo_model, data, out)
    proc = _start_until_checkpoint(argv, out, log, 4)
    os.kill(_worker(proc, 1), signal.SIGTERM)
    try:
        proc.wait(timeout=60)                   # torchrun reports its workers' exit 143 as a failure
    finally:
        if proc.poll() is None:
            _kill_all(proc)
            raise AssertionError("the ranks hung after one was stopped:\n" + log.read_text()[-4000:])
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted", result
    newest = complete_checkpoints(out / "checkpoints")[-1]
    assert str(newest) == result["checkpoint"] and int(newest.name.split("-")[1]) > 4
    assert sorted(p.name for p in newest.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert _run(argv, log) == 0, log.read_text()[-4000:]
    assert f"resuming from {newest}" in log.read_text()
    want, got = _adapter(reference[0]), _adapter(out)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)}/{len(want)} tensors differ"
