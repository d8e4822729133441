"""One rank of the 2-process resume check of ``test_bad_input.py``: ``python _resume_worker.py RANK WORLD INIT DIR``.

Both ranks train a toy engine for one epoch (rank 0 writes ``DIR/state.pt``); then they resume while rank 1 looks for
the state in a folder where it does not exist (as on a node without the shared file system): every rank must stop
with the same one-line error, none may hang or start from iteration 0. Then both resume the same file and agree.
Writes ``DIR/rank<R>.json``: the error message each rank got and the iteration it resumed at.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from scripts.checkpoints import TrainingState
from scripts.errors import BundleError

RUN = {"lr": 0.1}   # what the toy run records


def toy(path, run: dict | None, resume: bool = False) -> Engine:
    """A one-parameter engine with a TrainingState at ``path`` recording ``run`` (None: a state that records no run);
    its SGD learning rate is ``run["learning_rate"]`` (default 0.1). Also used by test_bad_input.py."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=run.get("learning_rate", 0.1) if run else 0.1)

    def step(engine, batch):
        loss = net(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    engine = Engine(step)
    TrainingState(str(path), {"model": net, "optimizer": opt}, stage="toy", resume=resume, record=run).attach(engine)
    return engine


def main(rank: int, world: int, init: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    shared = f"{folder}/state.pt"
    toy(shared, RUN).run(range(2), max_epochs=1)
    result = {}
    try:
        toy(shared if rank == 0 else f"{folder}/elsewhere/state.pt", RUN, resume=True).run(range(2), max_epochs=2)
    except BundleError as error:
        result["split"] = str(error)
    engine = toy(shared, RUN, resume=True)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: result.setdefault("resumed_at", e.state.iteration))
    engine.run(range(2), max_epochs=2)
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
