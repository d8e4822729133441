"""The data-pipeline benchmark (study.pipeline_bench): a tiny run of the four real workflows, and its output."""

import math

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from conftest import TINY_NETWORK
from scripts.engines import WeightAverage
from study import benchmark, pipeline_bench

# a small network, small batches and the synthetic data at 6 patients: seconds, not minutes
TINY_OVERRIDES = {**TINY_NETWORK, "num_workers": 0, "global#volumes_per_batch": 2, "local#volumes_per_batch": 2,
                  "global#hidden_features": 16, "global#embedding_features": 8, "pretrain_epoch_length": 2,
                  "batch_size": 4, "iterations_per_epoch": 2}
TINY_DATA = ["--synthetic#num_patients", "6", "--synthetic#split",
             "{num_validation: 1, num_test: 1, subset_sizes: [1,2], num_subsets: [1,1]}"]


@pytest.fixture(scope="module")
def rows():
    return pipeline_bench.bench_pipeline(iterations=4, warmup=1, overrides=TINY_OVERRIDES, prepare_overrides=TINY_DATA,
                                         quiet=True)


def test_the_four_workflows_are_measured_against_their_model_step(rows):
    assert [r["stage"] for r in rows] == ["global", "local", "finetune", "consistency"]
    # network input images per step: V=2 views x M=2 volumes x S=4 partitions; 2 x 2 x 4; batch_size slices;
    # batch_size labelled + 3 views (weak, strong, feature-perturbed) of batch_size unlabelled slices
    assert [r["images"] for r in rows] == [16, 16, 4, 16]
    for row in rows:
        assert row["iterations"] == 4 and row["num_workers"] == 0
        for key in ("pipeline_ips", "model_ips"):
            assert math.isfinite(row[key]) and row[key] > 0, row
        assert row["ratio"] == pytest.approx(row["pipeline_ips"] / row["model_ips"])
        # loading and augmenting cost time, and the steps are the same: far above 1 would be a measuring error
        assert 0.05 < row["ratio"] < 3.0, row
    line = pipeline_bench.format_line(rows[0])
    assert line.startswith("stage=global pipeline=") and " model=" in line and " ratio=" in line


def test_the_weight_average_is_part_of_the_consistency_step(rows):
    # consistency.yaml turns the moving average on; plain fine-tuning and pre-training keep none
    assert [r["ema_decay"] for r in rows] == [0.0, 0.0, 0.0, 0.99]
    network = torch.nn.Linear(2, 2)
    average = WeightAverage(network, decay=0.9)
    parser = ConfigParser({"train": {"averaged": average}})
    trainer = Engine(lambda engine, batch: None)
    step = pipeline_bench._with_weight_average(parser, 0.9, trainer, lambda: None)
    step()
    step()
    trainer.run([0, 1, 2], max_epochs=1)
    assert int(average.averaged.n_averaged) == 5   # two model-only steps and three workflow iterations
    untouched = Engine(lambda engine, batch: None)
    assert pipeline_bench._with_weight_average(ConfigParser({}), 0.0, untouched, print) is print


def test_the_workflow_run_leaves_no_batch_for_the_model_only_steps_after_it():
    # the model-only steps after the run fire the trainer's events; a leftover batch would be decollated at each
    class Trainer(Engine):   # a MONAI workflow's shape: it runs over its own data loader
        data_loader = [2, 2, 2]

        def run(self):
            return super().run(self.data_loader, max_epochs=self.state.max_epochs)

    trainer = Trainer(lambda engine, batch: {"image": torch.zeros(batch, 1)})
    seconds, images = pipeline_bench._time_pipeline(trainer, warmup=1, iterations=4)
    assert seconds > 0 and images == 4 * 2
    assert trainer.state.batch is None and trainer.state.output is None


def test_unknown_stages_and_empty_measurements_are_refused():
    with pytest.raises(ValueError, match="stages"):
        pipeline_bench.bench_pipeline(stages=("pretrain",), quiet=True)
    with pytest.raises(ValueError, match="warmup"):
        pipeline_bench.bench_pipeline(warmup=0, quiet=True)


def test_main_prints_one_line_per_stage(rows, monkeypatch, capsys):
    monkeypatch.setattr(pipeline_bench, "bench_pipeline", lambda *args, **kwargs: rows)
    result = benchmark.main(parts="pipeline", device="cpu", quiet=True)
    out = capsys.readouterr().out
    assert result["pipeline"] == rows and "Data pipeline" in out
    lines = [line for line in out.splitlines() if line.startswith("stage=")]
    assert [line.split()[0] for line in lines] == ["stage=global", "stage=local", "stage=finetune",
                                                   "stage=consistency"]
