"""The user's ServerApp: fedsms's SparseSoupStrategy on the user's Transformer, scored by
R² (``fedsms.task.REGRESSION``): the greedy soup keeps the clients whose updates raise the
held-out R², and every metric goes to ``rounds.jsonl``, ``results.jsonl`` and ``summary.json``."""

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from regression_task import FeatureTransformer, server_splits

from fedsms.config import split_config
from fedsms.masks import sparsity
from fedsms.task import REGRESSION
from fedsms_server.strategy import SparseSoupStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    run, fed = split_config(cfg, strict=False)  # fedsms's keys; "hidden", "heads", "rows-per-client" are this app's
    torch.manual_seed(run.seed)
    model = FeatureTransformer(int(cfg["hidden"]), int(cfg["heads"]))
    splits = server_splits(run.seed, int(cfg["server-rows"]), run.heldout_fraction)
    strategy = SparseSoupStrategy(run, fed, model, server_data=splits, task=REGRESSION)
    strategy.start(grid)
    central = strategy.rounds[-1].central_eval
    print(
        f"regression example: sparsity {sparsity(strategy.mask):.4f} over {len(strategy.mask)} weight matrices, "
        f"central R² {central['r2']:.4f}; final model in {strategy.out_dir / 'final_model.safetensors'}"
    )
