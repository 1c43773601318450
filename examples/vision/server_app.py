"""The user's ServerApp: fedsms's SparseSoupStrategy on the user's model, with the
server's copy of the images for central evaluation and BatchNorm recalibration.

It writes ``summary.json``, ``rounds.jsonl``, ``results.jsonl`` and
``final_model.safetensors`` (a plain ``load_state_dict`` into ``PatternNet``) to ``out-dir``.
"""

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from vision_task import PatternNet, load_splits

from fedsms.config import split_config
from fedsms_server.strategy import SparseSoupStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # fedsms reads its own keys; any other key of the run config is left to this app.
    run, fed = split_config(context.run_config, strict=False)
    splits = load_splits(run.data_dir, run.heldout_fraction, run.seed)
    torch.manual_seed(run.seed)
    model = PatternNet(splits.num_classes)
    strategy = SparseSoupStrategy(run, fed, model, server_data=splits, out_dir=run.out_dir)
    strategy.start(grid)
