"""Command line helpers around the bundle's workflows (``PYTHONPATH=bundle python -m scripts.cli <command>``).

The stages themselves run through ``python -m monai.bundle run``; these commands only look at their outputs.
(A whole study of many runs is repository tooling, outside the bundle: ``python -m study.experiments``.)
"""

from __future__ import annotations

import os

import fire

from scripts.report import dice_table, gains_table, plot_curves, stop_summary


def compare(
    results: dict,
    output: str | None = None,
    subsets: list | None = None,
    reference: dict | None = None,
    stops: str | None = None,
) -> None:
    """Print (and write to ``output``) test Dice tables from evaluation directories written by evaluate.yaml.

    - ``results`` maps a name to an evaluation directory: a table of 3D Dice per class, mean ± std over volumes,
      e.g. ``--results "{'random': 'bundle/eval/random_init/test'}"``.
    - With ``subsets`` (datalist keys, e.g. ``"['labelled_1_0','labelled_1_1']"``), ``results`` holds exactly two
      directory patterns with ``{subset}``, the baseline first: the paired table of mean Dice per subset and the
      gain, with mean gain ± std per |XL| (``report.gains_table``).
    - ``reference``: more named directories, shown as a per-class table (e.g. fine-tuning on all labelled volumes).
    - ``stops``: the pre-training output_dir; says for each stage whether it converged (``report.stop_summary``).
    """
    parts = []
    if subsets:
        if len(results) != 2:
            raise ValueError(f"with subsets, results must hold two patterns (baseline, treatment), got {results}")
        (base_name, base), (treat_name, treat) = results.items()
        parts.append("Mean 3D Dice on the test volumes (mean over volumes of the mean over classes), paired by "
                     f"labelled subset; gain = {treat_name} - {base_name}, mean ± std over subsets\n\n"
                     + gains_table(base, treat, list(subsets), names=(base_name, treat_name)))
    else:
        parts.append("3D Dice on the test volumes (mean ± std over volumes)\n\n" + dice_table(results))
    if reference:
        parts.append("Reference: 3D Dice on the test volumes (mean ± std over volumes)\n\n" + dice_table(reference))
    if stops:
        parts.append("Pre-training stages\n\n" + stop_summary(stops))
    text = "\n\n".join(parts)
    print(text)
    if output:
        from scripts.files import atomic_write_text

        atomic_write_text(text + "\n", output)


def curves(output: str, **curves: str) -> None:
    """Plot training curves from TensorBoard logs to a PNG: each ``--name=log_dir:tag`` gives one panel, e.g.
    ``--global_loss=bundle/eval/pretrain_global:global_loss``."""
    if not curves:
        raise ValueError("give at least one curve as --name=log_dir:tag")
    panels = {name.replace("_", " "): tuple(spec.rsplit(":", 1)) for name, spec in curves.items()}
    print(plot_curves(panels, output))


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
    fire.Fire({"compare": compare, "curves": curves, "contract": contract})


if __name__ == "__main__":
    main()
