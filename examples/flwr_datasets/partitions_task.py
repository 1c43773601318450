"""A client's data from Flower's data ecosystem: a flwr-datasets partitioner over a local
``datasets.Dataset`` (built offline from arrays, here the embedded digits), in torch format,
as Flower's own quickstarts load theirs; then ``fedsms.data.make_splits`` for the trainer."""

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner

from fedsms.data import ArrayData, DatasetSplits, load_dataset, make_splits


def digits_dataset() -> Dataset:
    """The embedded digits training images and labels as a Hugging Face ``Dataset``."""
    digits = load_dataset("digits", heldout_fraction=0.0)
    return Dataset.from_dict({"image": digits.train.images.numpy(), "label": digits.train.labels.numpy()})


def client_splits(partition_id: int, num_partitions: int, seed: int) -> DatasetSplits:
    """This client's label-skewed share of the digits (Dirichlet, alpha 1), split into
    train / held-out / test the way fedsms splits every data set."""
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=1.0, min_partition_size=20, seed=seed
    )
    partitioner.dataset = digits_dataset()
    rows = partitioner.load_partition(partition_id).with_format("torch")[:]
    part = ArrayData(rows["image"], rows["label"])
    cut = max(1, len(part) // 5)  # a fifth of the client's rows is its test split
    train, test = ArrayData(part.images[cut:], part.labels[cut:]), part.head(cut)
    return make_splits(f"digits-part{partition_id}", train, test, num_classes=10, heldout_fraction=0.1, seed=seed)
