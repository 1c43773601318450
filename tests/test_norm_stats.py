"""Pooling norm statistics from clients gives the statistics of the pooled data."""

import torch

from fedsms.data import ArrayData
from fedsms.models import build_model
from fedsms.norms import NormStatsAverage, norm_stat_names, norm_stats, recalibrate_norms


def _cnn():
    torch.manual_seed(0)
    return build_model("cnn", 10, (1, 8, 8))


def test_pooled_stats_equal_stats_of_the_pooled_data():
    model = _cnn()
    generator = torch.Generator().manual_seed(1)
    # Two clients whose inputs differ in mean: averaging variances alone would be wrong.
    a = ArrayData(torch.rand(256, 1, 8, 8, generator=generator) * 0.5, torch.zeros(256, dtype=torch.long))
    b = ArrayData(0.5 + torch.rand(256, 1, 8, 8, generator=generator) * 0.5, torch.zeros(256, dtype=torch.long))
    pooled = NormStatsAverage(model)
    for data in (a, b):
        recalibrate_norms(model, data, fraction=1.0, batch_size=512)
        pooled.add(norm_stats(model), len(data))
    both = ArrayData(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))
    recalibrate_norms(model, both, fraction=1.0, batch_size=1024)
    # The first layer sees the inputs directly: one batch per client gives exact moments.
    first = norm_stat_names(model)[0].rpartition(".")[0]
    result = pooled.result()
    direct = norm_stats(model)
    torch.testing.assert_close(result[f"{first}.running_mean"], direct[f"{first}.running_mean"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result[f"{first}.running_var"], direct[f"{first}.running_var"], rtol=1e-2, atol=1e-4)
    assert pooled.count == 2 and pooled.examples == 512


def test_norm_stats_names_only_running_statistics():
    names = norm_stat_names(_cnn())
    assert names and all(n.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for n in names)
    assert norm_stat_names(build_model("mlp", 10, (1, 8, 8))) == []
