"""Resumable runner of the label-efficiency study: a YAML plan -> every stage as ``python -m monai.bundle run`` ->
one results file, then a report (tables, plots, example segmentations).

Repository tooling (not shipped in the bundle). From the repository root::

    PYTHONPATH=bundle python -m study.experiments run    docs/experiments/acdc_cpu.yaml
    PYTHONPATH=bundle python -m study.experiments status docs/experiments/acdc_cpu.yaml   # what is done, what is left
    PYTHONPATH=bundle python -m study.experiments report docs/experiments/acdc_cpu.yaml --output docs/study/acdc_cpu

A plan (docs/experiments.md describes every key) names a dataset (a prepare run id of ``prepare.yaml``, or an already
prepared ``dataset_dir``), the protocol (config overrides per stage), the initialisations (each a pre-training recipe:
a global strategy, optionally followed by a local strategy), the seeds, the labelled subsets per |XL| and the
benchmark on all labelled training volumes. It becomes a list of jobs:

- ``prepare``: the plan's prepare run id (once per experiment folder).
- ``global-<strategy>-seed<s>``: ``pretrain_global``; shared by every initialisation with that global strategy and seed
  (G^D, G^D + L^R and G^D + L^D start from the same encoder).
- ``global-<g>-local-<l>-seed<s>``: ``pretrain_local`` from that global checkpoint (the encoder stays frozen).
- ``<init>-xl<n>-subset<i>-seed<s>`` and ``<init>-xlall-seed<s>`` (the benchmark, ``--train_key labelled_all``):
  fine-tuning (``train.yaml``; model selection on the validation volumes) then evaluation (``evaluate.yaml``) on the
  test volumes.
- with a ``selection`` section: ``select-<rule>-xl<n>-seed<s>`` (``select.yaml``: the pool embedded by the encoder of
  the named initialisation's pre-training, n volumes chosen by the rule, written as the datalist key
  ``selected_<rule>_<n>_seed<s>``), then ``<init>-xl<n>-<rule>-seed<s>``: fine-tuning + evaluation on those volumes.

Pre-trainings come first; fine-tunings then go round by round (subset i of every |XL| for every initialisation), so an
interrupted study has the same subsets for every initialisation. ``--workers N`` runs N jobs at a time, each as soon as
the jobs it needs are done (on 2 cores, two single-threaded jobs do more per hour than one job on two threads).

Experiment folder::

    plan.yaml          the plan of the last start, read by the report (a changed protocol is refused: check_unchanged)
    results.jsonl      one line per finished fine-tuning + evaluation: the results file
    stages.jsonl       one line per finished preparation or pre-training stage
    commands.log       every command started, with the time (shell-quoted: copy, paste, run)
    pretraining/<id>/  models/pretrained_*.pt, eval/ (TensorBoard loss logs), <run id>.log
    runs/<id>/         models/model.pt, eval/ (TensorBoard), eval/test/test_mean_dice_raw.csv,
                       finetune.log, evaluate.log

Resuming: a job is done when its line exists (results.jsonl or stages.jsonl); lines are written by replacing the
whole file atomically once the job's last subprocess has succeeded. A job that did not finish has no line: its folder
is deleted and it runs again from scratch on the next start. The stage subprocesses die with the runner (Linux:
``PR_SET_PDEATHSIG``; SIGTERM and Ctrl-C stop them explicitly), so a killed runner leaves no process writing behind
it. One runner at a time per folder (a lock file).

This module is the command line; the work is done by ``study.plan`` (read and check a plan), ``study.jobs`` (the
plan as jobs and commands), ``study.ledger`` (the folder's ledgers, commands log and plan copy), ``study.scheduler``
(``run``, ``status``: jobs in worker threads), ``study.processes`` (the stage subprocesses), ``study.results`` (a
fine-tuning's results line) and ``study.folder_report`` (``report``: the files of the report).
"""

from __future__ import annotations

import sys

from study.folder_report import report
from study.scheduler import run, status


def _run_and_exit(*args, **kwargs) -> None:
    try:
        failed = run(*args, **kwargs)
    except KeyboardInterrupt:
        print("\ninterrupted: an unfinished job has no result line and runs again on the next start", flush=True)
        sys.exit(130)
    except (ValueError, RuntimeError, FileNotFoundError) as error:   # a bad plan, a busy folder, no dataset
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(1 if failed else 0)


def _report_quietly(*args, **kwargs) -> None:
    report(*args, **kwargs)   # the files are printed; fire would print the returned list again


def main() -> None:
    """``python -m study.experiments run | status | report <plan> ...`` (python-fire: ``--help`` on each)."""
    import functools

    import fire

    command_line_run = functools.wraps(run)(_run_and_exit)   # fire shows run's arguments and docstring
    command_line_report = functools.wraps(report)(_report_quietly)
    fire.Fire({"run": command_line_run, "status": status, "report": command_line_report})


if __name__ == "__main__":
    main()
