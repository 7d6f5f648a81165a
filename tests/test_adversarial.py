"""The attack's core on a tiny model: gradients, candidate ranking, the step rule, seeding and resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adversarial_support import build, spec_of, spec_text
from sensray.adversarial.attack import problem_of, resume_attacks, search, start_attacks
from sensray.adversarial.objective import Problem, Scorer, _target_logprobs, objective_loss
from sensray.adversarial.plan import make_attack_plan
from sensray.adversarial.pool import LocalPool
from sensray.adversarial.search import allowed_tokens, positions, propose_gcg, propose_hotflip, retokenizes
from sensray.perturbations.base import keyed_rng


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("adv"))


@pytest.fixture(scope="module")
def model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny[0]).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny[0])


HEAD, TARGET = tuple(range(10, 22)), tuple(range(30, 36))


@pytest.mark.parametrize("objective", ["nll", "kl", "target"])
def test_gradient_is_the_one_hot_gradient(model, objective):
    """Taken through the embeddings and projected on the embedding table, the gradient equals autograd's on a
    literal one-hot input (onehot @ E as the edited positions' embeddings), for every objective."""
    scorer = Scorer(model, 64)
    problem = Problem(HEAD, (40, 41, 42), (), TARGET, objective)
    edit = torch.tensor([50, 60, 70])
    weight = model.get_input_embeddings().weight.detach()
    onehot = torch.nn.functional.one_hot(edit, weight.shape[0]).float().requires_grad_()
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(HEAD)), onehot @ weight, embed(torch.tensor(TARGET))])[None]
    clean = scorer.clean(problem) if objective == "kl" else None
    loss = objective_loss(problem, _target_logprobs(model, problem, {"inputs_embeds": embeds}), clean).sum()
    (expected,) = torch.autograd.grad(loss, onehot)
    assert torch.allclose(scorer.gradient(problem, edit), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_neo", "gptj", "opt", "bloom", "gpt_neox", "falcon"])
def test_every_family_gives_the_one_hot_gradient_and_exact_losses(family):
    """Each supported family's embedding path (positions added, an embedding norm, a projection) and its
    logits_to_keep: the gradient is the literal one-hot gradient, and a loss equals the full forward's."""
    from sensray.testing import tiny_model

    model = tiny_model(family, seed=0).eval()
    problem = Problem((5, 6, 7, 8), (), (), (9, 10, 11), "nll")
    edit = torch.tensor([20, 30])
    weight = model.get_input_embeddings().weight.detach()
    onehot = torch.nn.functional.one_hot(edit, weight.shape[0]).float().requires_grad_()
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(problem.head)), onehot @ weight, embed(torch.tensor(problem.target))])
    logits = model(inputs_embeds=embeds[None]).logits[0, -4:-1].log_softmax(-1)
    loss = logits.gather(-1, torch.tensor(problem.target)[:, None]).mean()  # minus the NLL: objective nll
    (expected,) = torch.autograd.grad(loss, onehot)
    scorer = Scorer(model, 8)
    assert torch.allclose(scorer.gradient(problem, edit), expected, rtol=1e-4, atol=1e-6)
    assert float(scorer.losses(problem, edit[None])[0]) == pytest.approx(loss.detach().item(), rel=1e-5)


def test_gradient_predicts_the_change_along_a_swap(model):
    """Central differences along e_p + t (E[v] - E[cur]) agree with grad[p, v] - grad[p, cur] (a float64 copy;
    the model's float32 norms bound how small a step still resolves)."""
    import copy

    double = copy.deepcopy(model).double()
    scorer = Scorer(double, 64)
    problem = Problem(HEAD, (), (), TARGET, "nll")
    edit = torch.tensor([50, 60, 70])
    grad = scorer.gradient(problem, edit)
    weight = double.get_input_embeddings().weight.detach()
    ids = torch.tensor([HEAD + tuple(edit.tolist()) + TARGET])
    for p, v in [(0, 5), (1, 77), (2, 33)]:
        def loss(t: float) -> float:
            embeds = double.get_input_embeddings()(ids).detach().clone()
            embeds[0, len(HEAD) + p] += t * (weight[v] - weight[edit[p]])
            with torch.no_grad():
                return float(objective_loss(problem, _target_logprobs(double, problem, {"inputs_embeds": embeds}),
                                            None)[0])

        numeric = (loss(1e-2) - loss(-1e-2)) / 2e-2
        assert float(grad[p, v] - grad[p, edit[p]]) == pytest.approx(numeric, rel=0.05)


@pytest.mark.parametrize("objective", ["nll", "target"])
def test_gradient_ranking_agrees_with_exact_evaluation_for_the_top_candidates(model, objective):
    """Every single swap at each position evaluated exactly: the gradient's order agrees with the exact one
    (rank correlation), and the exact best swap is among the gradient's top 10 (of 97)."""
    def spearmanr(a: np.ndarray, b: np.ndarray) -> float:  # ranks' Pearson correlation (no ties in floats)
        return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])

    scorer = Scorer(model, 512)
    problem = Problem(HEAD, (), (), TARGET, objective)
    edit = torch.tensor([40, 50, 60, 70])
    grad = scorer.gradient(problem, edit)
    base = float(scorer.losses(problem, edit[None])[0])
    for p in range(len(edit)):
        swaps = edit.repeat(97, 1)
        swaps[:, p] = torch.arange(97)
        exact = scorer.losses(problem, swaps).numpy() - base
        predicted = (grad[p, :97] - grad[p, edit[p]]).numpy()
        order = list(np.argsort(predicted))
        assert spearmanr(predicted, exact) > 0.85
        assert order.index(int(np.argmin(exact))) < 10


def test_losses_are_exact_whatever_the_batch(model):
    """A candidate's loss does not depend on the sub-batch it is evaluated in."""
    problem = Problem(HEAD, (), (), TARGET, "target")
    edits = torch.randint(0, 97, (10, 3), generator=torch.Generator().manual_seed(0))
    whole = Scorer(model, 10).losses(problem, edits)
    alone = torch.cat([Scorer(model, 1).losses(problem, e[None]) for e in edits])
    assert torch.allclose(whole, alone, rtol=1e-6, atol=1e-9)


def test_gcg_draws_from_each_positions_top_k_and_is_seeded(tokenizer):
    grad = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    allowed = allowed_tokens(tokenizer, 128, allow_non_ascii=False)
    assert not allowed[96] and not allowed[100] and allowed[:95].all()  # [UNK] (special), rows past the vocab
    ids = [1, 2, 3, 4, 5]
    a = propose_gcg(grad, ids, allowed, [0, 1, 2, 3, 4], 4, 64, keyed_rng(0, "gcg", 0, 5, 1))
    b = propose_gcg(grad, ids, allowed, [0, 1, 2, 3, 4], 4, 64, keyed_rng(0, "gcg", 0, 5, 1))
    assert torch.equal(a, b) and len(a) == len({tuple(r) for r in a.tolist()})
    masked = grad.masked_fill(~allowed, math.inf)
    for row in a:
        (p,) = (row != torch.tensor(ids)).nonzero().flatten().tolist()
        assert row[p] in (-masked[p]).topk(4).indices


def test_hotflip_takes_the_best_ranked_swaps_in_order():
    grad = torch.zeros(3, 6)
    grad[1, 4], grad[2, 0], grad[0, 5] = -3.0, -2.0, -1.0
    edits = propose_hotflip(grad, [1, 1, 1], torch.ones(6, dtype=torch.bool), [0, 1, 2], 3)
    assert edits.tolist() == [[1, 4, 1], [1, 1, 0], [5, 1, 1]]


def test_a_substitution_never_changes_more_positions_than_its_budget():
    original = (5, 6, 7, 8)
    assert positions([5, 6, 7, 8], original, 2) == [0, 1, 2, 3]
    assert positions([9, 6, 9, 8], original, 2) == [0, 2]  # budget spent: only those, or back
    grad = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    grad[0, 5] = grad[2, 7] = 100.0  # going back is always allowed, however the gradient ranks it
    edits = propose_hotflip(grad, [9, 6, 9, 8], torch.ones(12, dtype=torch.bool), [0, 2], 40, original)
    assert all(sum(x != y for x, y in zip(row, original)) <= 2 for row in edits.tolist())
    assert [5, 6, 9, 8] in edits.tolist()


def test_retokenize_keeps_only_edits_whose_text_encodes_back():
    """The shipped byte-level BPE merges ' ' + 'x' into ' x': tokens that do not survive their own text."""
    from sensray.models import load_tokenizer
    from sensray.spec import ModelSpec

    tok = load_tokenizer(ModelSpec())
    good = tok(" x x", add_special_tokens=False).input_ids
    split = tok.convert_tokens_to_ids(["Ġ", "x", "Ġ", "x"])
    assert len(good) == 2 and retokenizes(tok, torch.tensor([good + good, split])).tolist() == [True, False]


def _run(pool, spec, tokenizer, stop_after: int | None = None, rows: list | None = None):
    plan = make_attack_plan(spec, tokenizer=tokenizer)
    attacks = start_attacks(plan.cases, spec, tokenizer)
    rows = [] if rows is None else rows
    resume_attacks(attacks, rows)

    def on_step(row: dict) -> None:
        if stop_after is not None and len(rows) >= stop_after:
            raise KeyboardInterrupt  # the driver dies here: the journal has what was recorded
        rows.append(row)

    search(pool, attacks, spec, tokenizer, on_step, log=lambda line: None)
    return rows, attacks


@pytest.fixture(scope="module")
def pool(tiny, tmp_path_factory):
    spec = spec_of(spec_text(*tiny, tmp_path_factory.mktemp("out")))
    pool = LocalPool(spec)
    yield pool
    pool.close()


@pytest.mark.parametrize("method, objective, edit", [("gcg", "nll", "suffix"), ("gcg", "kl", "substitute"),
                                                      ("hotflip", "nll", "suffix"), ("gcg", "target", "suffix")])
def test_a_step_never_increases_the_loss_and_the_loss_is_the_inputs(tiny, pool, tokenizer, tmp_path, method,
                                                                    objective, edit):
    target = {"target": "x * 7"} if objective == "target" else {}
    spec = spec_of(spec_text(*tiny, tmp_path, {"method": method, "objective": objective, "edit": edit}, target))
    rows, attacks = _run(pool, spec, tokenizer)
    for attack in attacks:
        losses = [r["loss"] for r in rows if r["attack"] == attack.key]
        assert all(b <= a for a, b in zip(losses, losses[1:])) and attack.stop is not None
        exact = pool.replica.scorer.losses(attack.problem, torch.tensor([attack.ids]))
        assert float(exact[0]) == attack.loss
        if edit == "substitute":
            assert sum(x != y for x, y in zip(attack.ids, attack.problem.clean)) <= attack.budget
    assert any(r["accepted"] for r in rows)  # the attack moved


def test_the_same_spec_finds_the_same_inputs_and_resume_continues_the_same_sequence(tiny, pool, tokenizer, tmp_path):
    spec = spec_of(spec_text(*tiny, tmp_path))
    whole, _ = _run(pool, spec, tokenizer)
    again, _ = _run(pool, spec, tokenizer)
    assert again == [dict(r, seconds=a["seconds"]) for r, a in zip(whole, again)]
    cut: list = []
    with pytest.raises(KeyboardInterrupt):
        _run(pool, spec, tokenizer, stop_after=7, rows=cut)
    assert len(cut) == 7
    resumed, attacks = _run(pool, spec, tokenizer, rows=cut)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    by_attack = lambda rows: sorted(strip(rows), key=lambda r: (r["attack"], r["step"]))  # noqa: E731
    assert by_attack(resumed) == by_attack(whole)


def test_problem_of_a_substitution_keeps_the_fixed_tokens_apart(tiny, tokenizer, tmp_path):
    spec = spec_of(spec_text(*tiny, tmp_path, {"edit": "substitute"}))
    case = make_attack_plan(spec, tokenizer=tokenizer).cases[0]
    problem = problem_of(case, spec)
    assert problem.head + problem.clean == case.before and problem.target == case.target
