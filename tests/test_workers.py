"""Candidates trained in worker processes equal those trained in this process."""

import pytest
import torch
from helpers import digits

from fedsms.candidates import CandidateTrainer
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.recipe import CandidateConfig


@pytest.mark.slow  # spawns worker processes that import torch
def test_two_workers_give_the_same_candidates_as_one_process():
    configs = [CandidateConfig(seed=s, epochs=1, batch_size=64) for s in (0, 1)]
    results = []
    for workers in (1, 2):
        torch.manual_seed(0)
        with CandidateTrainer("mlp", digits(), torch.device("cpu"), workers=workers) as trainer:
            if workers == 1:
                start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
                mask = compute_mask(
                    dict(trainer.model.named_parameters()),
                    dense_mask(trainer.model, prunable_names(trainer.model)),
                    0.5,
                )
                start = {k: v * mask[k] if k in mask else v for k, v in start.items()}
            results.append(trainer.train(start, mask, configs, "[test]"))
    (serial, parallel) = results
    for (a, _), (b, _) in zip(serial, parallel):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(serial[0][0]["net.1.weight"], serial[1][0]["net.1.weight"])
