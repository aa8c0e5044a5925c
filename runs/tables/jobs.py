"""Run the jobs of a plan as child processes, a few at a time, skipping the finished ones.

A job is finished when its marker file exists and the ledger (`<out>/jobs.json`) records that it
finished with the same fingerprint: a hash of its command and of its dependencies' fingerprints.
Changing a setting (steps, records, seeds, a backbone's pretraining recipe) reruns exactly the jobs it
changes and every job that used their output (a ledger written before fingerprints reruns its jobs).
A failed job is reported with its log and its dependants are skipped; the others go on.
Ctrl-C / SIGTERM stops the children (trainings save their last step, evaluations keep their
finished chunks), so the same command resumes.

Only the results are kept in git (the cells, `jobs.json`, `run_info.json`; see records/README.md), so a
run can be resumed on another machine from a clone: there the world, the backbones and the trained
editors are missing, and a job is run only when an unfinished result needs it (`needed_jobs`).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from utils.errors import UserError
from utils.io import read_json, write_json_atomic
from utils.provenance import commit, machine

from runs.tables.plan import Job

CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "TQDM_DISABLE": "1"}  # bars that do not set `disable` themselves stay out of the logs


def _command(job: Job) -> list[str]:
    return job.argv[1:]  # without the interpreter's path, which may differ between machines


def fingerprints(jobs: list[Job]) -> dict[str, str]:
    """job name -> hash of its command and its dependencies' fingerprints (jobs in dependency order)."""
    prints: dict[str, str] = {}
    for job in jobs:
        blob = json.dumps([_command(job), [prints.get(dep, dep) for dep in job.deps]])
        prints[job.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return prints


@dataclass
class Ledger:
    """`jobs.json`: job name -> {"command": its command, "fingerprint": see `fingerprints`}."""

    path: str
    prints: dict[str, str]
    done: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, jobs: list[Job]) -> "Ledger":
        return cls(path, fingerprints(jobs), read_json(path) if os.path.isfile(path) else {})

    def finished(self, job: Job) -> bool:
        entry = self.done.get(job.name)
        return (os.path.isfile(job.marker) and isinstance(entry, dict)
                and entry.get("fingerprint") == self.prints[job.name])

    def record(self, job: Job) -> None:
        self.done[job.name] = {"command": _command(job), "fingerprint": self.prints[job.name]}
        write_json_atomic(self.path, self.done)


def needed_jobs(jobs: list[Job], finished: set[str]) -> list[Job]:
    """The unfinished jobs that lead to an unfinished result, in the plan's order. A result is a job that
    no other job waits for (a table cell); an unfinished job is needed when it is such a result or when a
    needed job waits for it. So a training whose cells are all finished is not rerun where its checkpoint
    is missing (a resumed clone), and one with a cell left is."""
    dependants: dict[str, list[str]] = {job.name: [] for job in jobs}
    for job in jobs:
        for dep in job.deps:
            dependants[dep].append(job.name)
    needed: set[str] = set()
    for job in reversed(jobs):  # dependants come after what they wait for
        if job.name not in finished and (not dependants[job.name]
                                         or any(d in needed for d in dependants[job.name])):
            needed.add(job.name)
    return [job for job in jobs if job.name in needed]


def unfinished(jobs: list[Job], ledger: Ledger) -> tuple[set[str], list[Job]]:
    """(names of the finished jobs, the jobs left to run: `needed_jobs`)."""
    finished = {j.name for j in jobs if ledger.finished(j)}
    return finished, needed_jobs(jobs, finished)


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)           # finished, or not needed by an unfinished result
    failed: dict[str, str] = field(default_factory=dict)       # job -> its log
    blocked: list[str] = field(default_factory=list)           # never started: a dependency failed


def run_jobs(jobs: list[Job], out_dir: str, workers: int, show_progress: bool = True,
             on_job_end=None) -> Outcome:
    """Run every unfinished job of `jobs` (in dependency order, `workers` at once); `on_job_end()` is
    called after each job ends (the run's accounting, so that a killed runner loses little of it)."""
    ledger = Ledger.load(os.path.join(out_dir, "jobs.json"), jobs)
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    done, pending = unfinished(jobs, ledger)
    names = {j.name for j in pending}
    outcome = Outcome(skipped=[j.name for j in jobs if j.name not in names])
    done |= set(outcome.skipped)  # what a needed job waits for is finished, or needed itself
    # results (table cells) before what only feeds other jobs, the longest first: a run stopped at a
    # session's end then leaves few trainings whose cells are unfinished, which a clone would run again
    waited_for = {dep for job in jobs for dep in job.deps}
    bar = _progress(pending, show_progress)
    running: dict[str, tuple[Job, subprocess.Popen, object]] = {}
    env = os.environ | CHILD_ENV
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    stop = _StopFlag()
    try:
        while pending or running:
            if stop.raised:
                raise KeyboardInterrupt
            for job in _blocked(pending, outcome):
                pending.remove(job)
                outcome.blocked.append(job.name)
                bar.update(job.cost_s)
            ready = sorted((j for j in pending if all(d in done for d in j.deps)),
                           key=lambda j: (j.name in waited_for, -j.cost_s))
            for job in ready[:max(workers - len(running), 0)]:
                pending.remove(job)
                log = open(os.path.join(logs, f"{job.name}.log"), "w")
                log.write(" ".join(_command(job)) + "\n\n")
                log.flush()
                running[job.name] = (job, subprocess.Popen(job.argv, cwd=root, env=env, stdout=log,
                                                           stderr=subprocess.STDOUT), log)
            bar.set_postfix_str(", ".join(running)[:80])
            time.sleep(0.2)
            for name, (job, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                bar.update(job.cost_s)
                if proc.returncode == 0 and os.path.isfile(job.marker):
                    ledger.record(job)
                    done.add(name)
                    outcome.ran.append(name)
                else:
                    outcome.failed[name] = os.path.join(logs, f"{name}.log")
                    bar.write(f"FAILED {name} (exit {proc.returncode}): see {outcome.failed[name]}")
                if on_job_end:
                    on_job_end()
    except KeyboardInterrupt:
        for _, proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc, log in running.values():
            proc.wait()
            log.close()
        raise
    finally:
        stop.restore()
        bar.close()
    return outcome


def _blocked(pending: list[Job], outcome: Outcome) -> list[Job]:
    bad = set(outcome.failed) | set(outcome.blocked)
    return [j for j in pending if bad.intersection(j.deps)]


def _progress(pending: list[Job], show: bool):
    from tqdm import tqdm

    total = round(sum(j.cost_s for j in pending))
    return tqdm(total=total, unit="s", unit_scale=False, desc=f"{len(pending)} jobs (estimated seconds)",
                disable=not show, file=sys.stderr, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} est-s [{elapsed}<{remaining}] {postfix}")


class _StopFlag:
    """SIGTERM turns into the same orderly stop as Ctrl-C (children get SIGTERM, the run resumes)."""

    def __init__(self):
        self.raised = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.raised = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._old)


# ---- a whole run: the plan, the jobs with their provenance, the failures ------------------------
def print_plan(jobs: list[Job], out_dir: str, workers: int) -> None:
    """Every job with its estimated seconds; `done` marks the finished ones and `-` those no unfinished
    result needs; the estimate counts the jobs left to run."""
    ledger = Ledger.load(os.path.join(out_dir, "jobs.json"), jobs)
    finished, left = unfinished(jobs, ledger)
    names = {j.name for j in left}
    for job in jobs:
        state = "" if job.name in names else ("done" if job.name in finished else "-")
        print(f"{job.cost_s:8.0f} s  {state:4}  {job.name}")
    print(f"{len(jobs)} jobs, {len(left)} left to run, about {sum(j.cost_s for j in left) / 3600 / workers:.1f} h "
          f"with {workers} at once (rough CPU estimate)")


def run_recorded(jobs: list[Job], out_dir: str, workers: int, show_progress: bool,
                 report_only: bool = False) -> tuple[Outcome | None, dict]:
    """`run_jobs` (unless `report_only`), accounted in `<out_dir>/run_info.json`: the run's distinct commands,
    every commit its jobs ran at, machine they ran on and number of jobs at once (a resumed run may span
    several) and the wall time of all its calls.
    Returns the outcome and the provenance lines of the run's doc."""
    os.makedirs(out_dir, exist_ok=True)
    info_path = os.path.join(out_dir, "run_info.json")
    info = read_json(info_path) if os.path.isfile(info_path) else {"wall_s_all_calls": 0.0}
    info.setdefault("commands", [info.pop("command")] if "command" in info else [])  # older files: the first one
    info.setdefault("commits", [])
    info.setdefault("machines", [])
    info.setdefault("jobs_at_once", [])
    command = "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    outcome, start, earlier = None, time.time(), info["wall_s_all_calls"]

    def account() -> None:  # after every job, so that a runner killed outright loses little time
        info["wall_s_all_calls"] = round(earlier + time.time() - start, 1)
        write_json_atomic(info_path, info)

    if not report_only:
        for key, value in (("commands", command), ("commits", commit()), ("machines", machine()),
                           ("jobs_at_once", workers)):
            if value not in info[key]:
                info[key].append(value)
        try:
            outcome = run_jobs(jobs, out_dir, workers, show_progress=show_progress, on_job_end=account)
        finally:
            account()
    provenance = {"commands (every call's, first to last)": "; ".join(info["commands"]) or command,
                  "commit of this call": commit(),
                  "commits the jobs ran at": ", ".join(info["commits"]) or "-",
                  "machines the jobs ran on": "; ".join(info["machines"]) or machine(),
                  "wall time (all calls of this run, hours)": f"{info['wall_s_all_calls'] / 3600:.2f}",
                  "jobs at once": ", ".join(map(str, info["jobs_at_once"])) or "-"}
    return outcome, provenance


def report_failures(outcome: Outcome | None) -> int:
    """Print the failed jobs and their logs; the exit status of the run (1 when any failed)."""
    if not outcome or not (outcome.failed or outcome.blocked):
        return 0
    print(f"{len(outcome.failed)} job(s) failed, {len(outcome.blocked)} not started because of them:", file=sys.stderr)
    for name, log in outcome.failed.items():
        print(f"  {name}: {log}", file=sys.stderr)
    return 1


def run_and_report(cfg, jobs: list[Job], report, ns, details: dict) -> int:
    """What both runners do with their plan: print it (`--plan`), or run its jobs (unless `--report_only`),
    then `report.collect` / `write_summary` / `write_doc` with the run's provenance and `details`."""
    if ns.plan:
        print_plan(jobs, cfg.out_dir, cfg.jobs)
        return 0
    outcome, provenance = run_recorded(jobs, cfg.out_dir, cfg.jobs, not ns.no_progress, ns.report_only)
    summary = report.collect(cfg)
    path = report.write_summary(cfg, summary)
    doc = report.write_doc(cfg, summary, provenance | details)
    print(f"wrote {path} and {doc}")
    return report_failures(outcome)


def runner_main(run, parse_args, argv=None) -> int:
    """A resumable runner's exit status: `run(parse_args(argv))`, 2 with one line for a UserError, 130
    after Ctrl-C or SIGTERM (the same command resumes)."""
    try:
        return run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; the same command resumes", file=sys.stderr)
        return 130
