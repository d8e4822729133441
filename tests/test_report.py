"""The demo's table and curves: per-volume Dice CSVs and TensorBoard logs in, markdown and PNG out."""

import pytest
from torch.utils.tensorboard import SummaryWriter

from scripts.cli import compare
from scripts.report import dice_table, plot_curves, read_dice, read_scalars


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
