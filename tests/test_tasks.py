"""lm-eval tasks on a resident model (sensray/tasks/): the shipped tasks, scoring, exactness, the cross-check.

One scorer over the shipped model serves the module (lm-eval's HFLM is built once, as in a replica);
every evaluation is limited to a few documents.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from sensray.checksum import weights_checksum
from sensray.errors import SensrayError, SpecError
from sensray.models import load_model, load_tokenizer
from sensray.perturbations import PERTURBATIONS
from sensray.spec import DataSpec, ModelSpec

from conftest import REPO

pytest.importorskip("lm_eval")

from sensray.tasks import Catalog, TaskScorer, shipped_names  # noqa: E402
from sensray.tasks.catalog import INSTALL, require_lm_eval  # noqa: E402

TASKS = ["sensray-pydoc-choice", "sensray-pydoc-swap"]


@pytest.fixture(scope="module")
def shipped():
    """(model, tokenizer, checksum before any scorer existed) of the shipped model."""
    spec = ModelSpec()
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    return model, tokenizer, weights_checksum(model)


@pytest.fixture(scope="module")
def scorer(shipped):
    model, tokenizer, _ = shipped
    return TaskScorer(model, tokenizer, TASKS, limit=8)


@pytest.fixture(scope="module")
def dense(scorer):
    return scorer.score()


def test_the_shipped_task_files_are_what_the_script_builds():
    spec = importlib.util.spec_from_file_location("make_tasks", REPO / "scripts" / "make_tasks.py")
    make_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tasks)
    assert make_tasks.main(["--check"]) == 0
    built = make_tasks.files()
    assert {name.rsplit(".", 1)[0] for name in built} | {"sensray-data-ppl"} == set(shipped_names())
    choice = [line for line in built["sensray-pydoc-choice.jsonl"].splitlines()]
    assert len(choice) > 100  # enough documents for a binomial interval of a few points


def test_scores_are_columns_with_stderr_and_document_count(dense):
    cols = dense.columns
    for task in TASKS:
        assert cols[f"{task}/n"] == 8
        assert 0 <= cols[f"{task}/acc"] <= 1 and cols[f"{task}/acc_stderr"] is not None
    assert cols["sensray-pydoc-choice/acc"] >= 0.75  # the easy task: the trained model tells prose from shuffles
    assert [s["doc_id"] for s in dense.samples["sensray-pydoc-choice"]] == list(range(8))
    assert dense.seconds > 0


def test_building_the_scorer_leaves_the_weights_as_they_were(shipped, scorer):
    model, _, before = shipped
    assert weights_checksum(model) == before
    assert model.lm_head.weight is model.model.embed_tokens.weight  # HFLM's tie_weights kept the one tensor


def test_perturb_then_restore_gives_bit_identical_per_document_results(shipped, scorer, dense):
    model = shipped[0]
    kind = PERTURBATIONS.get("ablation")
    edits = kind.apply(model, kind.parse({"target": "blocks.0.mlp.down", "mode": "zero"}))
    try:
        damaged = scorer.score()
    finally:
        edits.restore()
    assert edits.verify()
    assert damaged.samples != dense.samples  # the tasks saw the perturbed weights, not a cache
    assert damaged.columns["sensray-pydoc-choice/acc"] < dense.columns["sensray-pydoc-choice/acc"]
    again = scorer.score()
    assert again.samples == dense.samples and again.columns == dense.columns


def test_a_model_left_in_train_mode_is_scored_in_eval_mode(shipped, scorer, dense):
    model = shipped[0]
    model.train()  # the shipped model has attention dropout 0.2: train mode would change every score
    try:
        assert scorer.score().samples == dense.samples
        assert not model.training
    finally:
        model.eval()


def test_cross_check_lm_evals_rolling_perplexity_beside_sensrays(shipped):
    """lm-eval's own loglikelihood_rolling on the text of the default sweep's 16 windows: its protocol
    (256-token windows, every token scored, the first from lm-eval's prefix token) gives 45.4667 (measured
    independently with lm-eval 0.4.13); sensray's (128-token windows, each window's first token unscored) 43.18."""
    from sensray.data import eval_batches
    from sensray.metrics import evaluate

    model, tokenizer, _ = shipped
    batches = eval_batches(DataSpec(num_sequences=16, batch_size=16), tokenizer)
    text = tokenizer.decode(torch.cat(batches).flatten().tolist())
    lm_eval = TaskScorer(model, tokenizer, ["sensray-data-ppl"], data_text=text).score().columns
    ours = evaluate(model, batches)
    assert lm_eval["sensray-data-ppl/token_perplexity"] == pytest.approx(45.4667, abs=1e-4)
    assert ours.ppl == pytest.approx(43.1832, abs=1e-4) and ours.tokens == 16 * 127
    # The same loglikelihoods per byte: lm-eval's own metric, from the same per-document sum.
    total = math.log(lm_eval["sensray-data-ppl/token_perplexity"]) * 2048
    assert lm_eval["sensray-data-ppl/byte_perplexity"] == pytest.approx(math.exp(total / len(text.encode())))


def test_shipped_tasks_need_no_index_of_lm_evals_own():
    catalog = Catalog(TASKS)
    assert catalog.manager.all_tasks == []  # lm-eval's ~15,000 built-in task files were never read
    catalog.check("eval.tasks")


def test_without_lm_eval_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(SensrayError, match="not installed") as err:
        require_lm_eval()
    assert INSTALL in str(err.value) and "lm-eval==0.4.13" in str(err.value)


@pytest.fixture(scope="module")
def everything():
    """A catalog over lm-eval's own index (built once per process: seconds)."""
    return Catalog(["arc_easy"])


@pytest.mark.slow  # lm-eval's index of its own ~15,000 task files: seconds, once per process
@pytest.mark.parametrize("name, words", [
    ("sensray-pydoc-choise", ("unknown lm-eval task", "did you mean 'sensray-pydoc-choice'")),
    ("hellaswg", ("unknown lm-eval task", "did you mean 'hellaswag'")),
    ("gsm8k", ("generate_until", "by likelihood")),
    ("arc_easy", ("allenai/ai2_arc", "HF_HUB_OFFLINE", "cache")),
])
def test_bad_tasks_fail_the_checks_in_one_line(everything, name, words):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: no test reaches the Hub
    with pytest.raises(SpecError) as err:
        Catalog([name]).check("eval.tasks")
    message = str(err.value)
    assert err.value.path == "eval.tasks" and "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.slow  # lm-eval's index, as above
def test_a_hub_dataset_without_a_network_fails_the_checks_before_any_retry(everything, monkeypatch):
    from sensray.tasks import catalog

    monkeypatch.setattr(catalog, "hub_offline", lambda: False)  # HF_HUB_OFFLINE unset, as on a user's machine
    monkeypatch.setattr(catalog, "hub_unreachable", lambda: "huggingface.co:443: Name or service not known")
    with pytest.raises(SpecError) as err:
        Catalog(["arc_easy"]).check("eval.tasks")
    message = str(err.value)
    assert "\n" not in message and "allenai/ai2_arc" in message and "cannot be reached" in message
    assert "HF_HUB_OFFLINE=1" in message
    Catalog(["sensray-pydoc-choice"]).check("eval.tasks")  # shipped tasks never ask for the network


def test_the_hub_probe_names_the_address_it_could_not_reach(monkeypatch):
    import socket

    from sensray.tasks import catalog

    def refused(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    catalog.hub_unreachable.cache_clear()
    try:
        assert catalog.hub_unreachable() == "huggingface.co:443: Connection refused"
    finally:
        catalog.hub_unreachable.cache_clear()
