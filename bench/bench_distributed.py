"""Benchmark: LiveEdit training steps/s of 2 CPU ranks (torchrun, gloo) vs 1 process, same global batch.

Runs `train_vllm_editor.py` on the toy world with one torch thread per process: as one process, then
under `torchrun --standalone --nproc_per_node 2`, side by side, `--repeats` times; same seed, same -bs
(the global batch), same steps. steps/s is measured from the TensorBoard "Loss" events' wall times
between the first and the last step (start-up and model loading left out). Prints one JSON line per
run (with the load average before it), one per repetition (the ratio), a summary (median steps/s and
ratio), and the final losses (they agree up to float rounding; the 1-process one is the bit-identity
check of one-process training):

    python bench/bench_distributed.py                      # -bs 16, 40 steps, tiny-blip2, -dbs 0, once
    python bench/bench_distributed.py --batch 32 --steps 60 --repeats 3
    python bench/bench_distributed.py --batch 16 --split   # + each process's time split per step

`--split` runs `bench/profile_distributed_step.py` in place of the training script (the same training,
timed): per rank, wall and CPU ms per step of data preparation, forward+backward, gradient sum,
optimizer, ..., and the collectives per step. `cpu_bound_ratio` = the 1-process CPU ms per step over
the busiest rank's: the ratio an idle machine with 2 free cores would approach, waits aside.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def steps_per_second(records_dir: str) -> tuple[float, dict[int, float]]:
    """(steps/s between the first and last logged step, step -> loss) of the one run under records_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logs,) = glob.glob(os.path.join(records_dir, "*", "*", "*", "logs"))
    acc = EventAccumulator(logs)
    acc.Reload()
    events = acc.Scalars("Loss")
    span = events[-1].wall_time - events[0].wall_time
    return (len(events) - 1) / span, {e.step: e.value for e in events}


def train(launcher: list[str], args: argparse.Namespace, data_dir: str, records_dir: str) -> list[dict]:
    """One training run; returns the split lines (`--split`) it printed, one per rank."""
    script = "bench/profile_distributed_step.py" if args.split else "train_vllm_editor.py"
    cmd = launcher + [os.path.join(ROOT, script), "-en", "liveedit", "-mn", args.model, "-dna",
                      "TOY", "-bs", str(args.batch), "--max_steps", str(args.steps), "-rs", "0", "-dvc", "cpu",
                      "--data_dir", data_dir, "--records_dir", records_dir, "-sci", str(10 ** 6), "-dbs", str(args.buffer)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"what": "train_step_split"')]
    return sorted(lines, key=lambda line: line["rank"])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        avx512 = " AVX-512" if "avx512f" in open("/proc/cpuinfo").read() else ""
        return f"{len(names)} x {names[0]}{avx512}" if names else platform.processor()
    except OSError:
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-blip2")
    parser.add_argument("--batch", type=int, default=16, help="global batch (both settings)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1, help="side-by-side repetitions (1 process, then 2 ranks)")
    parser.add_argument("--split", action="store_true", help="also report each process's time split per step")
    parser.add_argument("--buffer", type=int, default=0,
                        help="-dbs of both runs; 0 (default) prepares batches in the main thread, so each process "
                             "uses one core (the prefetch thread would let one process use two)")
    args = parser.parse_args()
    from toyworld.world import generate_toyworld

    rates: dict[int, list[float]] = {1: [], 2: []}
    final: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        # one epoch of distinct records where the (version-3) world allows it; 2,048 is divisible by any
        # power-of-two batch, so no step of a later epoch is short
        generate_toyworld(os.path.join(data_dir, "toyworld"), n_train=min(args.batch * args.steps, 2048), n_eval=8,
                          n_pretrain_scenes=2)
        for rep in range(1, args.repeats + 1):
            cpu_ms = {}
            for ranks, launcher in ((1, [sys.executable]), (2, TORCHRUN)):
                records = os.path.join(tmp, f"records_{rep}_{ranks}")
                load = [round(x, 2) for x in os.getloadavg()]
                split = train(launcher, args, data_dir, records)
                rate, losses = steps_per_second(records)
                rates[ranks].append(rate)
                final[ranks] = losses[args.steps]
                line = {"what": "train_steps_per_s", "repeat": rep, "ranks": ranks, "threads_per_rank": 1,
                        "global_batch": args.batch, "steps": args.steps, "data_buffer_size": args.buffer,
                        "model": args.model, "value": round(rate, 3), "final_loss": losses[args.steps],
                        "load_average_before": load}
                print(json.dumps(line), flush=True)
                for rank_line in split:
                    print(json.dumps(rank_line), flush=True)
                if split:
                    cpu_ms[ranks] = max(rank_line["step_cpu_ms"] for rank_line in split)
            repeat = {"what": "train_2_ranks_speedup", "repeat": rep, "value": round(rates[2][-1] / rates[1][-1], 3),
                      "load_average_after": [round(x, 2) for x in os.getloadavg()]}
            if cpu_ms.get(2):
                repeat["cpu_bound_ratio"] = round(cpu_ms[1] / cpu_ms[2], 3)
            print(json.dumps(repeat), flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(json.dumps({"what": "summary", "global_batch": args.batch, "repeats": args.repeats,
                      "median_steps_per_s": {"1": round(one, 3), "2": round(two, 3)},
                      "ratio_of_medians": round(two / one, 3),
                      "ratios": [round(b / a, 3) for a, b in zip(rates[1], rates[2])],
                      "final_loss": {"1": final[1], "2": final[2]}, "cpus": os.cpu_count(), "cpu": cpu_model()}))


if __name__ == "__main__":
    main()
