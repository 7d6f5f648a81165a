"""Perplexity, KL and top-1 agreement against hand-computable answers."""

import math

import pytest
import torch
from torch import nn

from sensray.metrics import evaluate, reference


class FixedLM(nn.Module):
    """A 'model' whose logits are a fixed table per input token: answers are computable by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_uniform_predictions_give_vocab_perplexity():
    model = FixedLM(torch.zeros(5, 5))
    scores = evaluate(model, [torch.tensor([[0, 1, 2, 3]])])
    assert scores.ppl == pytest.approx(5.0) and scores.tokens == 3 and scores.kl is None


def test_nll_is_token_weighted_across_batches():
    table = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    model = FixedLM(table)
    batches = [torch.tensor([[0, 0, 1]]), torch.tensor([[1, 0], [1, 1]])]
    # predicted: p(0|0)=.5, p(1|0)=.5 | p(0|1)=.9 | p(1|1)=.1
    expected = -(math.log(0.5) * 2 + math.log(0.9) + math.log(0.1)) / 4
    scores = evaluate(model, batches)
    assert scores.nll == pytest.approx(expected) and scores.ppl == pytest.approx(math.exp(expected))


def test_kl_and_agreement_against_the_reference():
    model = FixedLM(torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8]])))
    batches = [torch.tensor([[0, 1, 0, 1]])]
    ref = reference(model, batches)
    same = evaluate(model, batches, ref)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    model.table.data[0] = torch.log(torch.tensor([0.4, 0.6]))  # flips the argmax after token 0
    changed = evaluate(model, batches, ref)
    kl0 = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    # KL and top-1 count every position (the last has no target but a prediction): 2 of 4 follow token 0
    assert changed.kl == pytest.approx(kl0 * 2 / 4, rel=1e-5)
    assert changed.top1_agreement == pytest.approx(2 / 4)


def test_nonfinite_logits_are_a_result():
    model = FixedLM(torch.zeros(3, 3))
    batches = [torch.tensor([[0, 1, 2]])]
    ref = reference(model, batches)
    model.table.data[1, 0] = float("nan")
    scores = evaluate(model, batches, ref)
    assert scores.nonfinite and scores.ppl == math.inf and scores.nll == math.inf and scores.kl == math.inf
    assert scores.top1_agreement == pytest.approx(2 / 3)  # the NaN position counts as a disagreement
