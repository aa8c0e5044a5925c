"""Benchmark: LiveEdit training steps/s of 2 CPU ranks (torchrun, gloo) vs 1 process, same global batch.

Runs `train_vllm_editor.py` twice on the toy world with one torch thread per process: once as
one process, once under `torchrun --standalone --nproc_per_node 2`; same seed, same -bs (the
global batch), same steps. steps/s is measured from the TensorBoard "Loss" events' wall times
between the first and the last step (start-up and model loading left out). Prints one JSON line
per setting, their ratio, and the final losses of both (they agree up to float rounding):

    python bench/bench_distributed.py                      # -bs 16, 40 steps, tiny-blip2, -dbs 0
    python bench/bench_distributed.py --batch 32 --steps 60
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def steps_per_second(records_dir: str) -> tuple[float, dict[int, float]]:
    """(steps/s between the first and last logged step, step -> loss) of the one run under records_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logs,) = glob.glob(os.path.join(records_dir, "*", "*", "*", "logs"))
    acc = EventAccumulator(logs)
    acc.Reload()
    events = acc.Scalars("Loss")
    span = events[-1].wall_time - events[0].wall_time
    return (len(events) - 1) / span, {e.step: e.value for e in events}


def train(launcher: list[str], args: argparse.Namespace, data_dir: str, records_dir: str) -> None:
    cmd = launcher + [os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn", args.model, "-dna",
                      "TOY", "-bs", str(args.batch), "--max_steps", str(args.steps), "-rs", "0", "-dvc", "cpu",
                      "--data_dir", data_dir, "--records_dir", records_dir, "-sci", str(10 ** 6), "-dbs", str(args.buffer)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-blip2")
    parser.add_argument("--batch", type=int, default=16, help="global batch (both settings)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--buffer", type=int, default=0,
                        help="-dbs of both runs; 0 (default) prepares batches in the main thread, so each process "
                             "uses one core (the prefetch thread would let one process use two)")
    args = parser.parse_args()
    from toyworld.world import generate_toyworld

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        generate_toyworld(os.path.join(data_dir, "toyworld"), n_train=args.batch * args.steps, n_eval=8,
                          n_pretrain_scenes=2)
        results = {}
        for ranks, launcher in ((1, [sys.executable]),
                                (2, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", "2"])):
            records = os.path.join(tmp, f"records_{ranks}")
            train(launcher, args, data_dir, records)
            rate, losses = steps_per_second(records)
            results[ranks] = (rate, losses)
            print(json.dumps({"what": "train_steps_per_s", "ranks": ranks, "threads_per_rank": 1,
                              "global_batch": args.batch, "steps": args.steps, "data_buffer_size": args.buffer, "model": args.model,
                              "value": round(rate, 3), "final_loss": losses[args.steps]}), flush=True)
        print(json.dumps({"what": "train_2_ranks_speedup", "value": round(results[2][0] / results[1][0], 3),
                          "load_average": [round(x, 2) for x in os.getloadavg()],
                          "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
