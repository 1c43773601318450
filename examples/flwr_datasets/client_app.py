"""fedsms's built-in ClientApp on data from a flwr-datasets partitioner: the data function
gets the Flower Context (for the node's partition-id) and returns this client's own
partition, which fedsms then uses whole (``partitioned=True``)."""

from flwr.app import Context
from partitions_task import client_splits

from fedsms.config import RunConfig
from fedsms.data import DatasetSplits
from fedsms_client.app import make_client_app


def my_data(run: RunConfig, data_dir: str, context: Context) -> DatasetSplits:
    node = context.node_config
    return client_splits(int(node["partition-id"]), int(node["num-partitions"]), run.seed)


app = make_client_app(data_fn=my_data, partitioned=True)
