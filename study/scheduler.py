"""Runs a plan's jobs (``study.jobs``) that are not done yet, ``workers`` at a time, each as soon as the jobs it needs
are done, in plan order; writes each finished job's line to its ledger (``study.ledger``).

A job runs in a worker thread: its folder is deleted and recreated, then its steps run in order as subprocesses
(``study.processes``), each command logged first. The main thread starts jobs and records finished ones. A job that
failed stops the start of new ones (or, with ``keep_going``, only of those that need it); SIGTERM or Ctrl-C stop
the subprocesses, and no unfinished job gets a line. One runner at a time per experiment folder (a lock file).
``status`` prints what is done and what is left without running anything.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import yaml

from study.jobs import Job, build_jobs
from study.ledger import (
    LOCK,
    PLAN_COPY,
    RESULTS,
    append_ledger,
    check_unchanged,
    done_records,
    jsonable,
    log_command,
    now,
    write_text,
)
from study.plan import load_plan
from study.processes import raise_on_sigterm, run_command, stop_commands
from study.results import check_datalist, result_line

KINDS = ("prepare", "global", "local", "finetune")   # what ``run(kinds=...)`` may select


def run(plan: str, experiment_dir: str | None = None, echo: bool = False, keep_going: bool = False,
        workers: int = 1, kinds: tuple | list | None = None) -> int:
    """Run every job of ``plan`` that is not done yet; returns the number of jobs that failed.

    Args:
        plan: the plan's YAML file.
        experiment_dir: replaces the plan's ``experiment_dir``.
        echo: also stream each subprocess's output to the console (it always goes to the job's log files).
        keep_going: on a failed job, go on with the jobs that do not depend on it (default: stop).
        workers: jobs run at the same time, each as soon as the jobs it needs are done, in plan order. With more
            than one, each job gets ``OMP_NUM_THREADS`` = CPU cores / workers unless the plan's ``env`` sets it.
        kinds: run only the jobs of these kinds (prepare, global, local, finetune); default: every job (a release
            runs the pre-training first and checks its stopping reports before it fine-tunes).
    """
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, not {workers}.")
    config = load_plan(plan, experiment_dir)
    exp = config["experiment_dir"]
    os.makedirs(exp, exist_ok=True)
    lock = open(os.path.join(exp, LOCK), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"another runner is working in {exp}.") from None
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        return _run(config, echo, keep_going, int(workers), kinds)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.close()


def _run(plan: dict, echo: bool, keep_going: bool, workers: int = 1, kinds: tuple | list | None = None) -> int:
    """``run`` on a checked plan, the folder locked: the jobs to run, announced, then scheduled."""
    exp = plan["experiment_dir"]
    jobs, done = _jobs_and_done(plan, kinds)
    estimator = Estimator(plan["estimate"], done)
    pending = [j for j in jobs if j.id not in done]
    print(f"experiment {exp}: {len(jobs)} jobs, {len(jobs) - len(pending)} done, {len(pending)} to run "
          f"(about {_duration(sum(estimator.seconds(j) for j in pending) / workers)}"
          + (f", {workers} at a time" if workers > 1 else "") + ")", flush=True)
    if not pending:
        return 0
    return _Scheduler(plan, jobs, done, estimator, echo, keep_going, workers).run(pending)


def _jobs_and_done(plan: dict, kinds: tuple | list | None) -> tuple[list[Job], dict[str, dict]]:
    """The plan's jobs (of ``kinds`` only, if given) and the done ones' ledger lines, after checking that no finished
    job had another configuration; writes the plan's copy. A pre-training whose checkpoint is gone is not done."""
    exp = plan["experiment_dir"]
    jobs = build_jobs(plan)
    done = done_records(exp)
    check_unchanged(jobs, done)
    if kinds is not None:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"kinds {unknown} unknown; expected some of {', '.join(KINDS)}.")
        jobs = [j for j in jobs if j.kind in kinds]
    write_text(os.path.join(exp, PLAN_COPY), yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    for job in jobs:   # a stage whose outputs were deleted runs again (and so do the jobs waiting for it)
        if job.kind in ("global", "local") and job.id in done:
            if not os.path.isfile(os.path.join(exp, job.info["checkpoint"])):
                print(f"{job.id}: done, but {job.info['checkpoint']} is missing: it runs again")
                del done[job.id]
    return jobs, done


class _Scheduler:
    """Starts pending jobs in worker threads as their needs are done, and records each one that finishes.

    ``done`` (id -> ledger line) gains a line per finished job; ``failed`` holds the ids of failed and skipped jobs.
    """

    def __init__(self, plan: dict, jobs: list[Job], done: dict[str, dict], estimator: Estimator, echo: bool,
                 keep_going: bool, workers: int):
        self.plan, self.jobs, self.done, self.estimator = plan, jobs, done, estimator
        self.exp = plan["experiment_dir"]
        self.echo, self.keep_going, self.workers = echo, keep_going, workers
        self.class_names, self.sizes = [], {}
        if not plan["dataset"]["prepare"] or "prepare" in done:
            self.class_names, self.sizes = check_datalist(plan, jobs)
        self.env = {**os.environ, **plan["env"], "PYTHONUNBUFFERED": "1"}
        if workers > 1 and "OMP_NUM_THREADS" not in plan["env"]:   # share the cores instead of oversubscribing them
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        self.failed: set[str] = set()
        self.stopping = False

    def run(self, pending: list[Job]) -> int:
        """Run ``pending`` (in plan order); returns the number of jobs that failed or were skipped."""
        jobs = self.jobs
        self.position = {job.id: f"[{len(jobs) - len(pending) + n}/{len(jobs)}]" for n, job in enumerate(pending, 1)}
        self.waiting, self.running = list(pending), {}
        started = time.time()
        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            while self.waiting or self.running:
                self._start_ready(pool)
                if not self.running:
                    break
                finished, _ = wait(self.running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = self.running.pop(future)
                    self._finished(job, *future.result())
        except BaseException:   # SIGTERM or Ctrl-C: no job that is still running gets a line
            stop_commands()
            raise
        finally:
            pool.shutdown(wait=True)
        return self._summary(len(pending), started)

    def _start_ready(self, pool: ThreadPoolExecutor) -> None:
        """Start what can start, in plan order; skip the jobs whose needs failed."""
        for job in list(self.waiting):
            if any(n in self.failed for n in job.needs):
                print(f"{self.position[job.id]} {_describe(job)}: skipped, "
                      f"{next(n for n in job.needs if n in self.failed)} did not finish", flush=True)
                self.failed.add(job.id)
                self.waiting.remove(job)
            elif not self.stopping and len(self.running) < self.workers and all(n in self.done for n in job.needs):
                print(f"{self.position[job.id]} {_describe(job)} ...", flush=True)
                self.waiting.remove(job)
                self.running[pool.submit(_execute, job, self.exp, self.env, self.echo)] = job

    def _finished(self, job: Job, times: dict, failure: str | None) -> None:
        """Record a job that ended: its ledger line (when it succeeded) and a progress line."""
        if failure:
            print(f"    FAILED: {job.id}: {failure}", flush=True)
            self.failed.add(job.id)
            self.stopping = self.stopping or not self.keep_going
            return
        record = {"id": job.id, "kind": job.kind, **job.info}
        if job.kind == "prepare":
            self.class_names, self.sizes = check_datalist(self.plan, self.jobs)
        if job.kind == "finetune":
            record = {"id": job.id, **result_line(job, self.exp, self.class_names, self.sizes)}
        record.update(config=jsonable(job.config), wall_time_s=times, finished=now(), machine=_machine())
        append_ledger(os.path.join(self.exp, job.ledger), record)
        self.done[job.id] = record
        self.estimator.add(record)
        left = sum(self.estimator.seconds(j) for j in self.waiting + list(self.running.values())) / self.workers
        score = f", test Dice {record['mean_dice']:.3f}" if record.get("mean_dice") is not None else ""
        where = f"{job.id} " if self.workers > 1 else ""
        print(f"    {where}done in {_duration(sum(times.values()))}{score}; about {_duration(left)} left", flush=True)

    def _summary(self, pending: int, started: float) -> int:
        """Print how the run ended; returns the number of jobs that failed or were skipped."""
        if self.stopping:
            print("stopped; fix the cause and run again (finished jobs are kept).", flush=True)
            return len(self.failed)
        for job in self.waiting:   # needs that are not in the plan: cannot happen with build_jobs, said, not hidden
            print(f"{self.position[job.id]} {_describe(job)}: skipped, its needs never finished", flush=True)
            self.failed.add(job.id)
        print(f"finished {pending - len(self.failed)} job(s) in {_duration(time.time() - started)}"
              + (f", {len(self.failed)} failed or skipped" if self.failed else "")
              + f"; results: {os.path.join(self.exp, RESULTS)}", flush=True)
        return len(self.failed)


def _execute(job: Job, exp: str, env: dict, echo: bool) -> tuple[dict, str | None]:
    """Run a job's steps in order in a fresh folder (a worker thread); returns the seconds per step and, when a
    step failed, what to print about it (else None)."""
    shutil.rmtree(job.folder, ignore_errors=True)   # partial outputs of a killed attempt
    os.makedirs(job.folder)
    times = {}
    for step, command in job.steps:
        log_command(exp, job.id, command)
        log_file = os.path.join(job.folder, f"{step}.log")
        t0 = time.time()
        status = run_command(command, log_file, env, echo=echo)
        times[step] = round(time.time() - t0, 1)
        if status != 0:
            return times, f"{step} exited with status {status}; the last lines of {log_file}:\n{_tail(log_file)}"
    return times, None


def _tail(path: str, lines: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _describe(job: Job) -> str:
    if job.kind == "prepare":
        return f"prepare data ({job.steps[0][0]})"
    if job.kind == "global":
        return f"pre-train global {job.info['strategy']} (seed {job.info['seed']}; {job.id})"
    if job.kind == "local":
        return f"pre-train local {job.info['strategy']} after {job.info['global']}"
    if job.kind == "select":
        return f"select {job.info['num_labelled']} volume(s) by {job.info['selection']} (seed {job.info['seed']})"
    size = job.info["num_labelled"]
    where = "all labelled volumes" if size == "all" else f"|XL|={size} subset {job.info['subset']}"
    return f"fine-tune + evaluate {job.info['label']}, {where}, seed {job.info['seed']}"


def _machine() -> dict:
    return {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


class Estimator:
    """Seconds a job takes: the mean measured so far for its kind, else the plan's ``estimate`` section."""

    def __init__(self, plan_estimate: dict, done: dict[str, dict]):
        self.plan = plan_estimate
        self.measured: dict[str, list[float]] = {}
        for record in done.values():
            self.add(record)

    def add(self, record: dict) -> None:
        times = record.get("wall_time_s", {})
        for step, seconds in times.items():
            self.measured.setdefault(_kind_of_step(step), []).append(float(seconds))

    def seconds(self, job: Job) -> float:
        kinds = ["finetune", "evaluate"] if job.kind == "finetune" else [job.kind]
        total = 0.0
        for kind in kinds:
            measured = self.measured.get(kind)
            total += sum(measured) / len(measured) if measured else self.plan.get(kind, 0.0)
        return total


def _kind_of_step(step: str) -> str:
    fallback = "prepare" if step.startswith("prepare") else step
    return {"pretrain_global": "global", "pretrain_local": "local"}.get(step, fallback)


def status(plan: str, experiment_dir: str | None = None) -> None:
    """Print the plan's jobs by kind (done / to run) and the estimated time left, without running anything."""
    config = load_plan(plan, experiment_dir)
    jobs = build_jobs(config)
    done = done_records(config["experiment_dir"])
    estimator = Estimator(config["estimate"], done)
    print(f"experiment {config['experiment_dir']}")
    print(f"{'kind':<10}{'jobs':>6}{'done':>6}{'to run':>8}{'s per job':>11}{'time left':>16}")
    total = 0.0
    for kind in ("prepare", "global", "local", "select", "finetune"):
        of_kind = [j for j in jobs if j.kind == kind]
        if not of_kind:
            continue
        pending = [j for j in of_kind if j.id not in done]
        each = estimator.seconds(of_kind[0])
        total += each * len(pending)
        print(f"{kind:<10}{len(of_kind):>6}{len(of_kind) - len(pending):>6}{len(pending):>8}{each:>11.0f}"
              f"{_duration(each * len(pending)):>16}")
    print(f"time left: about {_duration(total)} (finetune = fine-tune + evaluation)")
