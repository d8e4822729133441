"""Why does the global stage start slowly? Embedding and gradient statistics over its first iterations.

Runs the bundle's own global stage (``global#trainer`` of train.yaml + pretrain.yaml) on a prepared dataset, once per
*variant* (a dict of config overrides, e.g. ``{"global#head_norm": "batch"}``), and records after every
``every``-th iteration, on the trainer's own batch:

- ``loss``: the global contrastive loss of the step;
- ``dim_std``: the mean over the embedding dimensions of the per-dimension std (over the batch) of the
  L2-normalised embeddings. 0 when every image maps to the same point (collapse); 1/sqrt(d) (0.088 at d = 128) when
  the embeddings are spread evenly over the sphere;
- ``similarity``: the mean cosine similarity of all pairs of different images in the batch (1 = collapse);
- ``grad_encoder`` / ``grad_head``: the L2 norm of the gradients of the encoder's and g1's parameters.

The results go to a JSON file and a figure (loss, dim_std, similarity and gradient norms against the iteration, one
line per variant). Repository tooling (not shipped in the bundle); every stage runs as configured, single process::

    PYTHONPATH=bundle python -m study.global_start --dataset_dir runs/diag/data --iterations 600 \\
        --variants "{'paper': {}, 'BN in g1': {'global#head_norm': 'batch'}}" --output runs/diag/start
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from ignite.engine import Events

from study.configs import read_configs

STATS = ("loss", "dim_std", "similarity", "grad_encoder", "grad_head")


def embedding_stats(embeddings: torch.Tensor) -> dict[str, float]:
    """(N, d) embeddings -> {"dim_std", "similarity"} of their L2-normalised rows (see the module docstring)."""
    z = F.normalize(embeddings.detach().float(), dim=1)
    n = z.shape[0]
    similarity = (z @ z.T).sum() - n  # every pair twice, without the diagonal (z_i . z_i = 1)
    return {"dim_std": float(z.std(dim=0).mean()), "similarity": float(similarity / (n * (n - 1)))}


def gradient_norm(module: torch.nn.Module) -> float:
    """L2 norm of all the gradients of ``module``'s parameters (0 where none)."""
    grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def run_variant(dataset_dir: str, overrides: dict, iterations: int, every: int = 10, seed: int = 0) -> dict:
    """Run ``iterations`` steps of the global stage with ``overrides``; returns {"iteration": [...], stat: [...]}.

    The stage writes its checkpoints into a temporary folder that is removed afterwards.
    """
    with tempfile.TemporaryDirectory() as tmp:
        parser = read_configs(("train.yaml", "pretrain.yaml"), {
            "dataset_dir": os.path.abspath(dataset_dir), "model_dir": tmp, "output_dir": tmp, "seed": seed,
            "global#max_iterations": iterations, **overrides})
        parser.get_parsed_content("initialize")  # seeds python, numpy and torch, as `monai.bundle run` does
        trainer = parser.get_parsed_content("global#trainer")
        net = parser.get_parsed_content("global#network")
        record: dict[str, list] = {"iteration": [], **{k: [] for k in STATS}}

        @trainer.on(Events.ITERATION_COMPLETED(every=every))
        def _record(engine) -> None:  # the gradients of this step are still in place (zeroed at the next step)
            record["iteration"].append(engine.state.iteration)
            record["loss"].append(float(engine.state.output["loss"]))
            record.update({k: record[k] + [v] for k, v in embedding_stats(engine.state.output["pred"]).items()})
            record["grad_encoder"].append(gradient_norm(net.unet.encoder))
            record["grad_head"].append(gradient_norm(net.head))

        started = time.perf_counter()
        trainer.run()
        record["seconds"] = time.perf_counter() - started
    return record


def plot(results: dict[str, dict], path: str, smooth: int = 5) -> None:
    """One panel per statistic, one line per variant (running mean over ``smooth`` records), against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    titles = {"loss": "global loss", "dim_std": "per-dimension std of normalised embeddings",
              "similarity": "mean pairwise cosine similarity", "grad_encoder": "gradient norm: encoder",
              "grad_head": "gradient norm: g1 head"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (key, title) in zip(axes.flat, titles.items()):
        for name, record in results.items():
            values = np.convolve(record[key], np.ones(smooth) / smooth, mode="valid")
            ax.plot(record["iteration"][smooth - 1:], values, label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        if key.startswith("grad"):
            ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(dataset_dir: str, variants: dict, iterations: int = 600, every: int = 10, output: str = "runs/diag/start",
         seed: int = 0) -> dict:
    """Run every variant in turn (progress on stdout) -> ``<output>.json`` and ``<output>.png``.

    A variant already in ``<output>.json`` with as many iterations is not run again (rerun after an interruption).
    """
    path = output + ".json"
    results = json.load(open(path)) if os.path.isfile(path) else {}
    for name, overrides in variants.items():
        done = results.get(name, {})
        if done.get("iteration") and done["iteration"][-1] >= iterations and done.get("overrides") == overrides:
            print(f"{name}: already measured")
            continue
        print(f"{name}: {overrides}, {iterations} iterations ...", flush=True)
        results[name] = {"overrides": overrides, **run_variant(dataset_dir, overrides, iterations, every, seed)}
        last = {k: round(results[name][k][-1], 4) for k in STATS}
        print(f"{name}: {results[name]['seconds']:.0f} s, last {last}", flush=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, path)
    plot({k: results[k] for k in variants}, output + ".png")
    print(f"wrote {path} and {output}.png")
    return results


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda _: None)
