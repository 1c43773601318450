"""Deployment overhead: fedsms against Flower's FedAvg on a real Flower deployment on loopback.

    python bench/deployment.py [--clients 2] [--epochs 1] [--repeats 3] [--out results/deployment.json]

Each run starts its own ``flower-superlink --insecure`` (Fleet, Control and Runtime API on
one free HTTP port), ``--clients`` ``flower-supernode --insecure`` processes (node config
``partition-id=i num-partitions=N``, each its own free ClientAppIo port) and submits the app
folder with ``flwr run APP fedsms --stream`` (``FLWR_HOME`` a fresh temporary folder with the
connection in its ``config.toml``; ``fedsms_flower.deployment`` provides the environment,
ports and connection, as ``fedsms-server`` / ``fedsms-client`` use them). Two variants,
same model (``cnn``), same data (the embedded digits train split, every client all of it:
fedsms's default hyperparameter soup), same clients and epochs per round:

- fedsms: the app folder ``fedsms-server`` writes (``write_app_dir``: ServerApp
  ``fedsms_server.app:app``, ClientApp ``fedsms_client.app:app``), 1 dense round then 3
  phases of 2 rounds to 90 % sparsity (``--tiny``: 1 phase of 1 round), the job's settings as
  ``bench/federation_overhead.py`` sets them (no OOD, no federated evaluation, the server
  evaluates on the test split, recalibrates BatchNorm at a phase end and checkpoints);
- FedAvg: ``bench/deployment_fedavg_app.py`` copied into a temporary app folder with its
  own ``pyproject.toml``: ``flwr.serverapp.strategy.FedAvg`` through ``strategy.start``,
  its ``evaluate_fn`` on the test split, and a quickstart-style ClientApp that loads the
  ``ArrayRecord``, trains with ``train_candidate`` (no mask) and replies with the dense
  ``ArrayRecord``; the same number of rounds.

Why fresh processes per run: the start-up of the SuperLink and SuperNodes is one of the
measured figures, and nothing a run leaves behind (a SuperNode's installed app, Flower's
state) can favour the variant that runs next. Fresh processes cost a few seconds per run,
outside the rounds. The variants alternate (``common.interleaved``: fedsms, FedAvg, FedAvg,
fedsms, ...) so that other load on the machine hits both alike.

Per run, from the server side (each app writes one JSON line per round to its out-dir:
fedsms's ``rounds.jsonl``, and the FedAvg app's lines with the same keys):

- round wall time: a round's ``seconds``, from the end of the previous round (round 1: from
  the strategy's construction) to the end of its evaluation and record. The figure is the
  median over rounds 2.. of every run; round 1 is shown on its own (it carries the wait
  for the nodes and the first app start on each SuperNode);
- client training: the clients' mean ``train_seconds`` per round (``train_candidate``'s
  own timing, which fedsms's replies carry and the FedAvg client returns), and the rest of
  the round outside training;
- bytes per round, all clients together: what the strategy sent and received as array
  data (fedsms's ``bytes_down`` / ``bytes_up``: its sparse payloads; FedAvg: the summed
  array data of its dense ``ArrayRecord``\\ s, counted the way fedsms counts a dense record);
- start-up: SuperLink started until its port answers; SuperNodes started until the
  SuperLink has activated all of them (its log); ``flwr run`` started until round 1 begins
  (the first round line's arrival, polled every 20 ms, less its ``seconds``); after the
  last round until ``flwr run`` exits (fedsms writes its final model, tables and plots).

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message, so a
client's imports are paid in every round, not once: the benchmark also times
``python -c "import ..."`` of each variant's apps beside ``import torch, flwr`` (median of
5, interleaved; ``--tiny``: once each).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import interleaved, median, parser, report, table
from federation_overhead import fedsms_config

from fedsms_flower.deployment import (
    CONNECTION,
    flower_bin,
    flower_env,
    free_port,
    reachable,
    run_config_arg,
    stop,
    write_app_dir,
    write_connection,
)

FEDAVG_APP = Path(__file__).with_name("deployment_fedavg_app.py")
HOST = "127.0.0.1"
ACTIVATED = "[Fleet.ActivateNode] Activated node_id="  # the SuperLink's line for each SuperNode it admits
# What each variant's app processes import (flwr-serverapp / flwr-clientapp), and the floor.
IMPORTS = {
    "fedsms_server.app": "import fedsms_server.app",
    "fedsms_client.app": "import fedsms_client.app",
    "FedAvg app": f"import sys; sys.path.insert(0, {str(FEDAVG_APP.parent)!r}); import deployment_fedavg_app",
    "torch, flwr": "import torch, flwr",
}


def shape(tiny: bool) -> dict:
    """fedsms's schedule: 1 dense round, then 3 phases of 2 rounds (``--tiny``: 1 phase of 1 round)."""
    return {"pretrain-rounds": 1, "phases": 1 if tiny else 3, "rounds-per-phase": 1 if tiny else 2}


def rounds_of(job: dict) -> int:
    return job["pretrain-rounds"] + job["phases"] * job["rounds-per-phase"]


def write_fedavg_app(folder: Path, rounds: int, clients: int, epochs: int) -> Path:
    """A Flower app folder for the FedAvg variant: the app module and its pyproject.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FEDAVG_APP, folder / "fedavg_app.py")
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedavg-bench"\nversion = "1.0.0"\n'
        'description = "FedAvg on the digits cnn, for bench/deployment.py"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedsms"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedavg_app:server_app"\nclientapp = "fedavg_app:client_app"\n\n'
        f"[tool.flwr.app.config]\nnum-server-rounds = {rounds}\nlocal-epochs = {epochs}\nlr = 0.05\n"
        f'batch-size = 64\nclients = {clients}\nout-dir = ""\n'
    )
    return folder


def start(command: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    with open(log, "w") as file:
        # a session of its own: stop() ends the process with the app processes it started
        return subprocess.Popen(
            command, env=env, stdout=file, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def wait(condition, process: subprocess.Popen, timeout: float, what: str, log: Path) -> float:
    """Seconds until ``condition()`` holds, polled every 20 ms; fails if ``process`` exits first."""
    begin = time.perf_counter()
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {process.returncode}; see {log}")
        if time.perf_counter() - begin > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s; see {log}")
        time.sleep(0.02)
    return time.perf_counter() - begin


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:  # a line being written
            break
    return lines


def run_deployment(variant: str, clients: int, epochs: int, tiny: bool, timeout: float) -> dict:
    """One job of ``variant`` ("fedsms" or "fedavg") on fresh Flower processes; its figures."""
    home = Path(tempfile.mkdtemp(prefix=f"fedsms-deployment-{variant}-"))
    env = flower_env(home)
    port = free_port(HOST)
    write_connection(home, f"{HOST}:{port}", None)
    out = home / "out"
    job = shape(tiny)
    rounds = rounds_of(job)
    if variant == "fedsms":
        app = write_app_dir(home / "app")
        config = fedsms_config(str(out), clients, epochs, **job)
    else:
        app = write_fedavg_app(home / "app", rounds, clients, epochs)
        config = {"out-dir": str(out)}
    processes: list[subprocess.Popen] = []
    ok = False
    try:
        superlink_log = home / "superlink.log"
        superlink = start(
            [flower_bin("flower-superlink"), "--insecure", "--host", HOST, "--port", str(port)],
            superlink_log,
            env,
            home,
        )
        processes.append(superlink)
        superlink_up = wait(lambda: reachable(HOST, port, 0.2), superlink, 60, "the SuperLink", superlink_log)
        begin = time.perf_counter()
        for i in range(clients):
            node_config = f"partition-id={i} num-partitions={clients}"
            processes.append(
                start(
                    [
                        flower_bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"{HOST}:{port}",
                        "--port",
                        str(free_port(HOST)),
                        "--node-config",
                        node_config,
                    ],
                    home / f"supernode{i}.log",
                    env,
                    home,
                )
            )
        wait(
            lambda: superlink_log.read_text(errors="replace").count(ACTIVATED) >= clients,
            superlink,
            120,
            "the SuperNodes' activation",
            superlink_log,
        )
        supernodes_up = time.perf_counter() - begin
        run_log = home / "flwr-run.log"
        submitted = time.time()
        flwr = start(
            [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", run_config_arg(config)],
            run_log,
            env,
            home,
        )
        processes.append(flwr)
        arrived: list[float] = []  # wall time each round line was first seen
        deadline = time.monotonic() + timeout
        while flwr.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: the job did not end within {timeout:.0f} s; see {run_log}")
            seen = len(read_lines(out / "rounds.jsonl"))
            arrived += [time.time()] * (seen - len(arrived))
            time.sleep(0.02)
        ended = time.time()
        lines = read_lines(out / "rounds.jsonl")
        arrived += [ended] * (len(lines) - len(arrived))
        if flwr.returncode != 0 or not lines:
            raise RuntimeError(
                f"{variant}: flwr run exited with code {flwr.returncode} after {len(lines)} rounds; see {run_log}:\n"
                + run_log.read_text(errors="replace")[-3000:]
            )
        ok = True
    finally:
        for process in reversed(processes):
            stop(process, grace=10)
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"{variant}: Flower's files and logs of this run are kept in {home}", file=sys.stderr)
    first_round_start = arrived[0] - lines[0]["seconds"]
    return {
        "variant": variant,
        "rounds_expected": rounds,
        "rounds": len(lines),
        "server_rounds": [line["server_round"] for line in lines],
        "round_s": [line["seconds"] for line in lines],
        "train_s": [line.get("train", {}).get("train_seconds", float("nan")) for line in lines],
        "bytes_down": [line["bytes_down"] for line in lines],
        "bytes_up": [line["bytes_up"] for line in lines],
        "accuracy": lines[-1].get("central_eval", {}).get("accuracy", float("nan")),
        "superlink_up_s": superlink_up,
        "supernodes_up_s": supernodes_up,
        "submit_to_first_round_s": first_round_start - submitted,
        "finish_s": ended - arrived[-1],
        "total_s": ended - submitted,
    }


def import_seconds(statement: str) -> float:
    """Wall seconds of a fresh interpreter that runs ``statement``."""
    env = flower_env(Path(tempfile.gettempdir()))
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], env=env, check=True, capture_output=True)
    return time.perf_counter() - begin


def median_or_nan(values: list[float]) -> float:
    """The median; NaN where a job ended before its second round (its row then shows it)."""
    return median(values) if values else float("nan")


def summarise(runs: list[dict], clients: int, epochs: int) -> dict:
    def steady(key: str) -> list[float]:  # rounds 2.. of every run
        return [value for run in runs for value in run[key][1:]]

    round_s, train_s = median_or_nan(steady("round_s")), median_or_nan(steady("train_s"))
    return {
        "variant": runs[0]["variant"],
        "clients": clients,
        "epochs": epochs,
        "runs": len(runs),
        "rounds": runs[0]["rounds_expected"],
        "rounds_completed": [run["rounds"] for run in runs],
        "round_s": round_s,
        "first_round_s": median_or_nan([run["round_s"][0] for run in runs]),
        "train_s": train_s,
        "outside_train_s": round_s - train_s,
        "bytes_down_per_round": median_or_nan(steady("bytes_down")),
        "bytes_up_per_round": median_or_nan(steady("bytes_up")),
        "first_round_bytes_down": median_or_nan([run["bytes_down"][0] for run in runs]),
        "first_round_bytes_up": median_or_nan([run["bytes_up"][0] for run in runs]),
        "superlink_up_s": median_or_nan([run["superlink_up_s"] for run in runs]),
        "supernodes_up_s": median_or_nan([run["supernodes_up_s"] for run in runs]),
        "submit_to_first_round_s": median_or_nan([run["submit_to_first_round_s"] for run in runs]),
        "finish_s": median_or_nan([run["finish_s"] for run in runs]),
        "total_s": median_or_nan([run["total_s"] for run in runs]),
        "accuracy": median_or_nan([run["accuracy"] for run in runs]),
        "runs_detail": runs,
    }


def main() -> None:
    p = parser(__doc__, "results/deployment.json", repeats=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--run-timeout", type=float, default=900, help="seconds one job may take (default 900)")
    p.add_argument("--import-repeats", type=int, default=5, help="timed imports per statement (default 5)")
    args = p.parse_args()
    repeats = 1 if args.tiny else args.repeats
    runs: dict[str, list[dict]] = {"fedsms": [], "fedavg": []}

    def variant(name: str):
        def run() -> float:
            result = run_deployment(name, args.clients, args.epochs, args.tiny, args.run_timeout)
            runs[name].append(result)
            print(
                f"{name}: {result['rounds']}/{result['rounds_expected']} rounds, "
                f"rounds {', '.join(f'{s:.2f}' for s in result['round_s'])} s",
                flush=True,
            )
            return result["total_s"]

        return run

    interleaved({"fedsms": variant("fedsms"), "fedavg": variant("fedavg")}, repeats, warmup=0)
    imports = interleaved(
        {name: (lambda s=statement: import_seconds(s)) for name, statement in IMPORTS.items()},
        1 if args.tiny else args.import_repeats,
        warmup=0 if args.tiny else 1,
    )
    import_rows = [{"import": name, "seconds": median(times), "all": times} for name, times in imports.items()]
    print(table(import_rows, [("import", "python -c 'import ...'", "s"), ("seconds", "median s", ".2f")]) + "\n")

    rows = [summarise(runs[name], args.clients, args.epochs) for name in ("fedsms", "fedavg")]
    fedsms, fedavg = rows
    ratio = fedsms["round_s"] / fedavg["round_s"]
    print(f"fedsms/FedAvg round wall time: {ratio:.3f} (target <= 1.15: {'met' if ratio <= 1.15 else 'missed'})")
    report(
        args.out,
        rows,
        [
            ("variant", "variant", "s"),
            ("runs", "runs", "d"),
            ("rounds", "rounds", "d"),
            ("round_s", "s/round", ".2f"),
            ("train_s", "train s", ".2f"),
            ("outside_train_s", "outside train", ".2f"),
            ("first_round_s", "round 1 s", ".2f"),
            ("superlink_up_s", "SuperLink up", ".2f"),
            ("supernodes_up_s", "SuperNodes up", ".2f"),
            ("submit_to_first_round_s", "submit->round 1", ".2f"),
            ("finish_s", "after last", ".2f"),
            ("bytes_down_per_round", "B down/round", ".0f"),
            ("bytes_up_per_round", "B up/round", ".0f"),
            ("accuracy", "accuracy", ".3f"),
        ],
        ratio=ratio,
        target="fedsms round time <= 1.15x FedAvg's",
        target_met=ratio <= 1.15,
        imports={row["import"]: {"median_s": row["seconds"], "all_s": row["all"]} for row in import_rows},
    )


if __name__ == "__main__":
    main()
