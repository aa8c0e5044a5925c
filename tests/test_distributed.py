"""torchrun: 2 CPU ranks (gloo) train and evaluate exactly like one process; failures end every rank.

Real `torchrun --standalone` subprocesses (one torch thread per rank) on tiny-blip2 and a tiny toy world.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from runs.eval_config import EvalConfig
from runs.eval_run import run_evaluation
from runs.training import TrainRunConfig, run_training
from utils.distributed import Shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
N_TRAIN = 9       # batches of 4, 4, 1: the last one leaves rank 1 without a real row (padding path)
TRAIN = dict(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY", batch_size=4, seed=11,
             data_limit=N_TRAIN, data_buffer_size=0, save_every=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("dist")
    generate_toyworld(root / "data" / "toyworld", n_train=12, n_eval=8, n_pretrain_scenes=2)
    return root


def torchrun(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + [os.path.join(ROOT, script), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def train_args(root, records: str, steps: int) -> list[str]:
    return ["-en", "liveedit", "-mn", "tiny-blip2", "-dna", "TOY", "-bs", "4", "--max_steps", str(steps), "-rs", "11",
            "-dn", str(N_TRAIN), "-dbs", "0", "-sci", "2", "-dvc", "cpu", "--data_dir", str(root / "data"),
            "--records_dir", str(root / records)]


def tb_losses(run_dir: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "logs"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("Loss")}


def editor_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoint, "editor.safetensors"))


def assert_weights_close(a: dict, b: dict) -> None:
    """Equal up to float rounding. The attention KEY biases are left out: adding a constant to every
    logit of a softmax changes nothing, so their true gradient is 0 and what they get is rounding
    noise, which Adam scales up to lr-sized steps (measured: every other tensor within 3e-6)."""
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith("k_mlp.bias"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_shard_rows_split_evenly_and_pad():
    assert [Shard(4, r, 2).rows() for r in range(2)] == [[0, 1], [2, 3]]
    assert [Shard(3, r, 2).rows() for r in range(2)] == [[0, 1], [2, 2]]   # rank 1 repeats its last row
    assert [Shard(1, r, 2).rows() for r in range(2)] == [[0], [0]]         # rank 1 has no real row
    assert [Shard(1, r, 2).size for r in range(2)] == [1, 0]
    one = Shard(5)
    assert one.rows() == list(range(5)) and not one.sharded
    x = torch.rand(5)
    assert one.mean(x) is not None and torch.equal(one.mean(x), x.mean()) and one.gather(x) is x


def test_two_ranks_train_like_one_process_and_resume_in_one(world, tmp_path):
    """torchrun 2 x 2 rows == 1 x 4 rows: losses, checkpoints; the run then resumes in one process."""
    done = torchrun("train_vllm_editor.py", *train_args(world, "records_2", 3))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = glob.glob(str(world / "records_2" / "liveedit" / "tiny-blip2" / "*"))
    assert len(runs) == 1, runs                                  # one run folder for both ranks
    ckpts = sorted(os.listdir(os.path.join(runs[0], "checkpoints")))
    assert ckpts == ["latest", "step-2", "step-3"]               # one checkpoint set (rank 0 writes)
    assert done.stdout.count("run folder:") == 1                 # rank 0 alone prints

    single = run_training(TrainRunConfig(**TRAIN, max_steps=3, records_dir=str(tmp_path / "one"),
                                         data_dir=str(world / "data")), echo=None)
    logged = tb_losses(runs[0])
    assert sorted(logged) == [1, 2, 3]
    for step, loss in single.losses.items():
        assert logged[step] == pytest.approx(loss, rel=1e-5), step  # the global loss is logged
    assert_weights_close(editor_weights(os.path.join(runs[0], "checkpoints", "step-3")),
                         editor_weights(single.final_checkpoint))

    # resume the 2-rank run's step 2 in one process (another world size, same global batch)
    resumed = run_training(TrainRunConfig(**TRAIN, max_steps=3, resume_from=os.path.join(runs[0], "checkpoints",
                                                                                          "step-2"),
                                          data_dir=str(world / "data")), echo=None)
    assert resumed.losses[3] == pytest.approx(single.losses[3], rel=1e-5)
    assert_weights_close(editor_weights(resumed.final_checkpoint), editor_weights(single.final_checkpoint))


def test_batch_not_divisible_by_the_ranks_is_one_line(world):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # checked before joining the group
    args = train_args(world, "records_bad", 2)
    args[args.index("-bs") + 1] = "3"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: rank 0 of 2: -bs/--batch_size 3 is the global batch")
    assert "divisible by 2" in done.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` (its environment says RANK=<rank>)."""
    for pid in _children(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode():
            return pid
    return None


def test_sigterm_on_one_rank_stops_every_rank_and_rank0_saves(world):
    args = train_args(world, "records_sig", 100000)
    args[args.index("-sci") + 1] = "1000"
    args[args.index("-dn") + 1] = "12"
    proc = subprocess.Popen(TORCHRUN + [os.path.join(ROOT, "train_vllm_editor.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        logs = None
        deadline = time.time() + 120
        while time.time() < deadline and logs is None:  # wait until training runs (TensorBoard file exists)
            logs = next(iter(glob.glob(str(world / "records_sig" / "*" / "*" / "*" / "logs" / "events.*"))), None)
            time.sleep(0.5)
        assert logs is not None, "training did not start"
        time.sleep(2)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGTERM)                 # only rank 1 is asked to stop
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = os.path.dirname(os.path.dirname(logs))
    ckpts = [c for c in os.listdir(os.path.join(run_dir, "checkpoints")) if c.startswith("step-")]
    assert len(ckpts) == 1, ckpts                        # rank 0 saved the last finished step
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", ckpts[0], "editor.safetensors"))
    assert err.count("interrupted (SIGTERM) after step") == 2, err[-3000:]  # both ranks stopped the same way
    assert f"holds step {ckpts[0].split('-')[1]}" in err


def untimed(mean: dict) -> dict:
    """A mean without its timing fields (edit_time)."""
    return {k: untimed(v) if isinstance(v, dict) else v for k, v in mean.items() if k != "edit_time"}


def test_sharded_evaluation_equals_one_process_and_resumes(world, tmp_path):
    args = ["-en", "ft_l", "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-dsn", "8", "--data_dir",
            str(world / "data"), "--no_progress"]
    done = torchrun("test_vllm_edit.py", *args, "--results_dir", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "two" / "ft_l" / "tiny-blip2" / "TOY" / "sequential_edit_2"
    two = json.loads((folder / "mean_results.json").read_text())
    assert two["run"]["config"]["world_size"] == 2 and two["run"]["chunks_run"] == 4
    assert not (folder / ".lock").exists()

    cfg = EvalConfig(sequential_edit_n=2, editor_name="ft_l", model_name="tiny-blip2", data_name="TOY",
                     data_sample_n=8, data_dir=str(world / "data"), results_dir=str(tmp_path / "one"),
                     show_progress=False)
    one = run_evaluation(cfg)
    alone = json.loads(open(os.path.join(one.folder, "mean_results.json")).read())["total_mean"]
    assert untimed(two["total_mean"]) == untimed(alone)          # every metric equal (timings aside)

    # a chunk lost: one process reruns only that chunk and reuses the 2-rank run's other files
    os.remove(folder / "progress" / "chunk_00001.json")
    again = run_evaluation(EvalConfig(**{**cfg.__dict__, "results_dir": str(tmp_path / "two")}))
    assert (again.chunks_run, again.chunks_resumed) == (1, 3)
    assert untimed(json.loads((folder / "mean_results.json").read_text())["total_mean"]) == untimed(alone)


WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    from runs import distributed
    group, _ = distributed.setup("cpu", timeout_s=3)
    if group.rank == 1:
        time.sleep(60)          # alive but never joins the collective
    else:
        start = time.time()
        try:
            distributed.barrier(group, "the test barrier")
        except distributed.PeerFailure as exc:
            print(f"after {{time.time() - start:.1f}} s: {{exc}}")
            sys.exit(5)
""")


def test_a_rank_that_hangs_makes_the_others_fail_with_a_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = WORKER.format(root=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**ENV, "WORLD_SIZE": "2", "RANK": str(r),
                              "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=50)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 5, err[-2000:]
    seconds = float(out.split(" s:")[0].split()[-1])
    assert seconds < 30
    assert "rank 0 of 2: the test barrier failed" in out and "within 3 s" in out


COLLECTIVES_WORKER = textwrap.dedent("""
    import json, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from runs import distributed
    from runs.training import Trainer, TrainRunConfig, run_training
    from utils.distributed import Shard, StepTotals

    calls = {{"all_gather": 0, "all_reduce": 0}}
    def counted(name):  # the real collective, counted
        real = getattr(dist, name)
        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return run
    for name in calls:
        setattr(dist, name, counted(name))
    def taken(before):
        return {{k: calls[k] - before[k] for k in calls}}

    group, _ = distributed.setup("cpu", timeout_s=60)
    out = {{}}
    # several per-row tensors in one all_gather: values and gradients of separate gathers
    shard = Shard(3, group.rank, 2)                     # rows [0, 1] | [2, 2 (a repeat)]
    torch.manual_seed(0)
    a, b = torch.rand(3, 2, 4), torch.rand(3, 5, dtype=torch.float32)
    wa, wb = torch.rand(3, 2, 4) + group.rank, torch.rand(3, 5) - group.rank   # a different loss per rank
    results = []
    for together in (True, False):
        xa, xb = a[shard.rows()].clone().requires_grad_(), b[shard.rows()].clone().requires_grad_()
        before = dict(calls)
        ga, gb = shard.gather_rows(xa, xb) if together else (shard.gather(xa), shard.gather(xb))
        ((ga * wa).sum() + (gb * wb).sum()).backward()
        results.append((ga.detach(), gb.detach(), xa.grad, xb.grad, taken(before)))
    out["gather_rows_equal"] = all(torch.equal(x, y) for x, y in zip(results[0][:4], results[1][:4]))
    out["gather_rows_values"] = torch.equal(results[0][0], a) and torch.equal(results[0][1], b)
    out["gather_rows_calls"], out["separate_calls"] = results[0][4], results[1][4]
    # gradients, logged shares and stop requests: one all-reduce
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), group.rank + 1.0)
    totals = shard.totals({{"Loss": torch.tensor(group.rank + 1.0), "Other": torch.tensor(0.5)}})
    before = dict(calls)
    signum = distributed.sum_gradients(group, [p], 1, totals, [signal.SIGTERM] if group.rank == 1 else [signal.SIGINT])
    out["sum"] = {{"grad": p.grad.tolist(), "logs": dict(totals), "signal": signum, "calls": taken(before),
                   "is_step_totals": isinstance(totals, StepTotals)}}
    lazy = shard.totals({{"Loss": torch.tensor(group.rank + 1.0)}})
    out["lazy_loss"] = lazy["Loss"]                      # read without the trainer: sums on its own
    out["no_signal"] = distributed.sum_gradients(group, [p], 2, None, [])
    # a training step: 1 all_gather (experts + in-batch negatives) and 2 all-reduces (its backward; the
    # gradients with the logged losses and the stop vote), nothing else
    per_step = []
    real_train_one = Trainer.train_one
    def train_one(self, step, batch):
        before = dict(calls)
        logs = real_train_one(self, step, batch)
        per_step.append(taken(before))
        return logs
    Trainer.train_one = train_one
    cfg = TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY", batch_size=4, seed=11,
                         data_limit=8, data_buffer_size=0, max_steps=2, save_every=100, data_dir={data!r},
                         records_dir={records!r})
    before = dict(calls)
    run_training(cfg, echo=None)
    out["train_steps"], out["train_total"] = per_step, taken(before)
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_a_sharded_step_makes_three_collectives_and_they_sum_everything(world, tmp_path):
    """The fixed cost per step: one all_gather for every in-batch tensor, one all-reduce in its backward, one
    all-reduce for the gradients + logged losses + stop requests (was 6 all_gathers and 9 all-reduces)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = COLLECTIVES_WORKER.format(root=ROOT, data=str(world / "data"), records=str(tmp_path / "records"))
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**ENV, "WORLD_SIZE": "2", "RANK": str(r),
                              "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            p.kill()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for r in results:
        assert r["gather_rows_equal"] and r["gather_rows_values"]
        assert r["gather_rows_calls"] == {"all_gather": 1, "all_reduce": 1}
        assert r["separate_calls"] == {"all_gather": 2, "all_reduce": 2}
        assert r["sum"] == {"grad": [3.0, 3.0, 3.0], "logs": {"Loss": 3.0, "Other": 1.0}, "signal": int(signal.SIGTERM),
                            "calls": {"all_gather": 0, "all_reduce": 1}, "is_step_totals": True}
        assert r["lazy_loss"] == 3.0 and r["no_signal"] == 0
        assert r["train_steps"] == [{"all_gather": 1, "all_reduce": 2}] * 2
    assert results[0]["train_total"] == results[1]["train_total"]


def test_step_profiler_of_the_benchmark_times_every_phase(world, tmp_path):
    """bench/profile_distributed_step.py (bench_distributed.py --split) still finds the phases it times."""
    args = train_args(world, "records_prof", 4)
    args[args.index("--records_dir") + 1] = str(tmp_path / "records")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "profile_distributed_step.py"), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"what": "train_step_split"')]
    assert line["world"] == 1 and line["steps_timed"] == 2 and line["step_cpu_ms"] > 0
    assert {"data preparation", "editor forward+backward", "gradient sum", "optimizer"} <= set(line["cpu_ms"])
