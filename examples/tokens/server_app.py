"""The user's ServerApp: fedsms's SparseSoupStrategy prunes, averages and keeps the mask,
and writes the final soup as ``final_model.safetensors`` for a plain ``load_state_dict``."""

from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from tokens_task import TokenNet

from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import prunable_names
from fedsms_server.strategy import SparseSoupStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_dir = Path(str(cfg["out-dir"])).resolve()
    torch.manual_seed(int(cfg["seed"]))
    model = TokenNet(int(cfg["hidden"]))
    run = RunConfig(
        target_sparsity=float(cfg["target-sparsity"]),
        phases=int(cfg["phases"]),
        candidates=int(cfg["candidates"]),
        pretrain_epochs=int(cfg["pretrain-epochs"]),
        retrain_epochs=int(cfg["retrain-epochs"]),
        pretrain_lr=float(cfg["pretrain-lr"]),
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight-decay"]),
        batch_size=int(cfg["batch-size"]),
        augment=False,
        ood=False,
        seed=int(cfg["seed"]),
        out_dir=str(out_dir),
    )
    clients = int(cfg["clients"])
    fed = FederationConfig(mode="data", min_train_clients=clients, min_available_clients=clients)
    strategy = SparseSoupStrategy(run, fed, model, out_dir=out_dir)
    strategy.start(grid)  # every round; then final_model.safetensors, summary.json, results.jsonl in out_dir

    model.load_state_dict(strategy.soup)
    weights = dict(model.named_parameters())
    names = prunable_names(model)
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    total = sum(weights[n].numel() for n in names)
    accuracy = strategy.rounds[-1].federated_eval.get("accuracy", float("nan"))
    print(
        f"tokens example: sparsity {zeros / total:.4f} of {total} prunable weights, "
        f"federated test accuracy {accuracy:.4f}; final model in {out_dir / 'final_model.safetensors'}"
    )
