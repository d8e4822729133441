"""The demo's table and curves: per-volume Dice CSVs and TensorBoard logs in, markdown and PNG out."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from scripts.cli import compare
from scripts.report import dice_table, gains_table, labelled_size, plot_curves, read_dice, read_scalars, stop_summary


def _dice_csv(folder, rows):
    folder.mkdir(parents=True)
    lines = ["filename,right ventricle,myocardium,left ventricle,mean"]
    lines += [",".join(["v%d" % i, *map(str, r), str(sum(r) / 3)]) for i, r in enumerate(rows)]
    (folder / "test_mean_dice_raw.csv").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_table_means_and_stds_over_volumes(tmp_path, capsys):
    a = _dice_csv(tmp_path / "a", [(0.5, 0.6, 0.7), (0.7, 0.8, 0.9)])
    assert read_dice(a).shape == (2, 3)
    table = dice_table({"random": a})
    assert table.startswith("| initialisation | volumes | right ventricle | myocardium | left ventricle | mean |")
    assert "| random | 2 | 0.600 ± 0.100 | 0.700 ± 0.100 | 0.800 ± 0.100 | 0.700 ± 0.100 |" in table
    compare({"random": a}, output=str(tmp_path / "out" / "table.md"))
    assert table in (tmp_path / "out" / "table.md").read_text() and table in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="run the evaluation"):
        read_dice(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="names given"):
        dice_table({"random": a}, class_names=["only one"])


def test_curves_from_tensorboard_logs(tmp_path):
    writer = SummaryWriter(str(tmp_path / "log"))
    for step in range(1, 41):
        writer.add_scalar("global_loss", 4.0 / step, step)
    writer.close()
    steps, values = read_scalars(str(tmp_path / "log"), "global_loss")
    assert len(steps) == 40 and values[0] == pytest.approx(4.0)
    png = plot_curves({"global loss": (str(tmp_path / "log"), "global_loss")}, str(tmp_path / "curves.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="no scalar 'local_loss'"):
        read_scalars(str(tmp_path / "log"), "local_loss")


def test_paired_gains_per_subset_and_per_size(tmp_path, capsys):
    """Each subset pairs its own two runs; per |XL| the mean gain and the sample std of the gains over subsets."""
    # (baseline, treatment) per-volume Dice of each subset: gains +0.1 and +0.3 at |XL| = 1, -0.05 at |XL| = 2
    runs = {"labelled_1_0": (0.4, 0.5), "labelled_1_1": (0.2, 0.5), "labelled_2_0": (0.6, 0.55)}
    for subset, (base, treat) in runs.items():
        _dice_csv(tmp_path / "random" / subset, [(base, base, base), (base - 0.1, base, base + 0.1)])
        _dice_csv(tmp_path / "pre" / subset, [(treat, treat, treat)] * 3)
    _dice_csv(tmp_path / "random" / "labelled_all", [(0.9, 0.9, 0.9)])
    table = gains_table(str(tmp_path / "random" / "{subset}"), str(tmp_path / "pre" / "{subset}"), list(runs),
                        names=("random", "pre-trained"))
    assert "| 1 | labelled_1_0 | 0.400 | 0.500 | +0.100 |" in table
    assert "| 1 | labelled_1_1 | 0.200 | 0.500 | +0.300 |" in table
    assert "| 2 | labelled_2_0 | 0.600 | 0.550 | -0.050 |" in table
    assert "| **1** | mean of 2 | 0.300 | 0.500 | **+0.200 ± 0.141** |" in table  # std([0.1, 0.3], ddof=1)
    assert "| **2** | mean of 1 | 0.600 | 0.550 | **-0.050 ± n/a** |" in table
    # swapping the two runs of one subset changes that subset's gain only: the pairing is by subset
    swapped = gains_table(str(tmp_path / "random" / "{subset}"), str(tmp_path / "pre" / "{subset}"),
                          ["labelled_1_1", "labelled_1_0"])
    assert swapped.index("labelled_1_1") < swapped.index("labelled_1_0")
    assert "| **1** | mean of 2 | 0.300 | 0.500 | **+0.200 ± 0.141** |" in swapped

    stops = tmp_path / "eval"
    stops.mkdir()
    (stops / "pretrain_global_stop.json").write_text(
        json.dumps({"stage": "global", "iteration": 700, "reason": "plateau", "loss": 1.234}))
    (stops / "pretrain_local_stop.json").write_text(
        json.dumps({"stage": "local", "iteration": 400, "reason": "budget", "loss": 0.5}))
    out = tmp_path / "out" / "demo.md"
    compare({"random": str(tmp_path / "random" / "{subset}"), "pre": str(tmp_path / "pre" / "{subset}")},
            output=str(out), subsets=list(runs), reference={"all labelled": str(tmp_path / "random" / "labelled_all")},
            stops=str(stops))
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "gain = pre - random" in text and "| **1** | mean of 2 | 0.300 | 0.500 | **+0.200 ± 0.141** |" in text
    assert "| all labelled | 1 | 0.900 ± 0.000 |" in text
    assert "- global stage: converged (loss plateau) at iteration 700, running loss 1.234" in text
    assert "- local stage: did NOT converge (iteration budget spent) at iteration 400" in text
    assert "NO stop record" in stop_summary(str(tmp_path))
    # a plateau at the starting loss is not convergence
    flat = {"stage": "global", "iteration": 300, "reason": "plateau", "loss": 3.21,
            "history": [[100, 3.22], [300, 3.21]]}
    (stops / "pretrain_global_stop.json").write_text(json.dumps(flat))
    assert "global stage: stopped on a plateau at its starting loss: did NOT learn" in stop_summary(str(stops))
    stuck = {**flat, "iteration": 2000, "reason": "budget", "history": [[100, 3.19], [1000, 3.22], [2000, 3.22]]}
    (stops / "pretrain_global_stop.json").write_text(json.dumps(stuck))   # a collapse that the budget ends
    assert ("global stage: did NOT converge (iteration budget spent), its loss still near its first: did NOT learn"
            in stop_summary(str(stops)))
    # the budget ended after the loss had been flat for its patience: the flag, not the reason, says converged
    flat_at_budget = {**stuck, "history": [[100, 3.0], [1000, 1.0], [2000, 1.0]], "loss": 1.0}
    (stops / "pretrain_global_stop.json").write_text(json.dumps({**flat_at_budget, "converged": True}))
    assert "global stage: converged (loss flat for its patience when the iteration budget ended)" in stop_summary(
        str(stops))
    (stops / "pretrain_global_stop.json").write_text(json.dumps({**flat_at_budget, "converged": None}))
    assert "global stage: ran its iteration budget; convergence not judged" in stop_summary(str(stops))
    (stops / "pretrain_global_stop.json").write_text(json.dumps({**flat_at_budget, "converged": False}))
    assert "global stage: did NOT converge (iteration budget spent) at iteration 2000" in stop_summary(str(stops))
    ended = {"stage": "global", "iteration": 1800, "reason": "schedule", "loss": 0.2}
    (stops / "pretrain_global_stop.json").write_text(json.dumps(ended))
    assert "global stage: ran its learning-rate schedule to the end (decayed to 0) at iteration 1800" in stop_summary(
        str(stops))


def test_paired_gains_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="labelled_<n>_<i>"):
        labelled_size("validation")
    assert labelled_size("labelled_8_2") == "8" and labelled_size("labelled_all") == "all"
    with pytest.raises(ValueError, match="{subset}"):
        gains_table(str(tmp_path / "a"), str(tmp_path / "b" / "{subset}"), ["labelled_1_0"])
    with pytest.raises(FileNotFoundError, match="run the evaluation"):
        gains_table(str(tmp_path / "a" / "{subset}"), str(tmp_path / "b" / "{subset}"), ["labelled_1_0"])
    with pytest.raises(ValueError, match="two patterns"):
        compare({"a": str(tmp_path / "{subset}")}, subsets=["labelled_1_0"])
