"""Command line helpers around the bundle's workflows (``PYTHONPATH=bundle python -m scripts.cli <command>``).

The stages themselves run through ``python -m monai.bundle run``; these commands only look at their outputs.
The study (a plan of many runs) has its own runner, ``python -m scripts.experiments run <plan>``; ``study`` here writes
its report.
"""

from __future__ import annotations

import os

import fire

from scripts.report import dice_table, plot_curves


def compare(results: dict, output: str | None = None) -> None:
    """Print (and write to ``output``) a table of 3D test Dice per class: ``results`` maps a name to an evaluation
    directory written by evaluate.yaml, e.g. ``--results "{'random': 'bundle/eval/random_init/test'}"``."""
    table = dice_table(results)
    print(table)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = output + ".tmp"
        with open(tmp, "w") as f:
            f.write("3D Dice on the test volumes (mean ± std over volumes)\n\n" + table + "\n")
        os.replace(tmp, output)


def curves(output: str, **curves: str) -> None:
    """Plot training curves from TensorBoard logs to a PNG: each ``--name=log_dir:tag`` gives one panel, e.g.
    ``--global_loss=bundle/eval/pretrain_global:global_loss``."""
    if not curves:
        raise ValueError("give at least one curve as --name=log_dir:tag")
    panels = {name.replace("_", " "): tuple(spec.rsplit(":", 1)) for name, spec in curves.items()}
    print(plot_curves(panels, output))


def study(target: str, output: str, examples: bool = True) -> None:
    """Report of a study run by ``scripts.experiments``: ``target`` is its plan file or experiment folder; writes
    results.md (tables, the paper's claims checked, wall time), dice_vs_labelled.png, pretraining_losses.png and
    examples.png into ``output``, e.g. ``study docs/experiments/acdc_cpu.yaml --output docs/study/acdc_cpu``."""
    from scripts.experiments import report

    report(target, output, examples=examples)


def contract(checkpoint: str, metadata: str | None = None) -> None:
    """Copy the data contract of a trained ``checkpoint`` into the bundle's ``metadata.json`` (``data_contract``,
    the class names MONAI Label lists, the input's spatial shape) before shipping it, e.g.
    ``contract --checkpoint bundle/models/model.pt``."""
    from scripts.contract import write_metadata

    metadata = metadata or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                        "metadata.json")
    found = write_metadata(checkpoint, metadata)
    print(f"{metadata}: data_contract from {checkpoint}: {found}")


def main() -> None:
    fire.Fire({"compare": compare, "curves": curves, "study": study, "contract": contract})


if __name__ == "__main__":
    main()
