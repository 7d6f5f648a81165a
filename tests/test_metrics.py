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


def test_per_sequence_nll_in_batch_order():
    table = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    batches = [torch.tensor([[0, 0, 1]]), torch.tensor([[1, 0, 0], [1, 1, 1]])]
    scores = evaluate(FixedLM(table), batches)
    # per sequence: -(log p(0|0) + log p(1|0)) / 2 | -(log p(0|1) + log p(0|0)) / 2 | -log p(1|1)
    expected = [-math.log(0.5), -(math.log(0.9) + math.log(0.5)) / 2, -math.log(0.1)]
    assert scores.seq_nll == pytest.approx(expected)
    assert math.fsum(scores.seq_nll) / 3 == pytest.approx(scores.nll)  # equal lengths: their mean is the nll


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
    assert scores.seq_nll is None
    assert scores.top1_agreement == pytest.approx(2 / 3)  # the NaN position counts as a disagreement


# ---------------------------------------------------------------- exact KL (float64, no cancellation)

def _mp_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> list[float]:
    """KL(softmax(ref) || softmax(z)) per position at 50 significant digits (mpmath): the reference."""
    import mpmath

    mpmath.mp.dps = 50
    out = []
    for zr, z in zip(ref_logits.reshape(-1, ref_logits.shape[-1]).tolist(), logits.reshape(-1, logits.shape[-1]).tolist()):
        lse_r = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(a)) for a in zr))
        lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(b)) for b in z))
        out.append(float(mpmath.fsum(mpmath.exp(a - lse_r) * ((a - lse_r) - (b - lse)) for a, b in zip(zr, z))))
    return out


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-5, 1e-3, 1e-1, 3.0])
def test_kl_matches_a_50_digit_reference_at_every_magnitude(scale):
    from sensray.metrics import row_lse_kl
    from sensray.testing import tiny_model

    model = tiny_model("llama")
    batches = [torch.arange(32).remainder(97).view(2, 16)]
    ref = reference(model, batches)
    with torch.no_grad():
        weight = model.get_parameter("model.layers.1.mlp.down_proj.weight")
        weight.add_(scale * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
        logits = model(input_ids=batches[0]).logits.float()
    _, kl = row_lse_kl(logits, ref, 0)
    expected = _mp_kl(ref.logits[0], logits)
    for got, want in zip(kl.tolist(), expected):
        assert got >= 0
        assert got == pytest.approx(want, rel=1e-6, abs=1e-300)
    scores = evaluate(model, batches, ref)
    assert scores.kl == pytest.approx(math.fsum(expected) / len(expected), rel=1e-6, abs=1e-300)


def test_a_shifted_row_and_an_overflowing_row_stay_exact():
    """A near-uniform shift of every logit (c >> d') and a logit that jumps by 1000 nats (exp overflows)."""
    from sensray.metrics import Reference, row_lse_kl

    gen = torch.Generator().manual_seed(0)
    zr = torch.randn(1, 3, 50, generator=gen) * 4
    z = zr.clone()
    z[0, 0] += 5.0 + 1e-6 * torch.randn(50, generator=gen)  # shift-dominated: KL ~ 1e-13
    z[0, 1, 7] += 1000.0  # overflow route
    z[0, 2] *= 1.5
    p = torch.softmax(zr.double(), -1)
    ref = Reference([zr], [p], [torch.logsumexp(zr.double(), -1)], [zr.argmax(-1)])
    lse, kl = row_lse_kl(z, ref, 0)
    for got, want in zip(kl.tolist(), _mp_kl(zr, z)):
        assert got == pytest.approx(want, rel=1e-6)
    assert torch.allclose(lse, torch.logsumexp(z.double(), -1).flatten(), rtol=0, atol=1e-12)


def test_nll_and_kl_do_not_depend_on_the_thread_count():
    from sensray.testing import tiny_model

    model = tiny_model("llama")
    batches = [torch.arange(64).remainder(113).view(4, 16), torch.arange(32).remainder(89).view(2, 16)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = reference(model, batches)
        with torch.no_grad():
            model.get_parameter("model.layers.0.self_attn.o_proj.weight").mul_(1.001)
        one = evaluate(model, batches, ref)
        torch.set_num_threads(2)
        two = evaluate(model, batches, ref)
    finally:
        torch.set_num_threads(threads)
    assert one.nll == two.nll and one.ppl == two.ppl and one.top1_agreement == two.top1_agreement
    assert one.kl > 0 and abs(one.kl - two.kl) <= 1e-12 * one.kl
