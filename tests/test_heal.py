"""sensray heal: LoRA and masked fine-tuning keep a pruned model's zeros exactly, say what they did,
resume bit-identically after a crash, stop on a non-finite loss keeping the last good checkpoint,
never train on the eval text, and refuse bad arguments before writing anything."""

from __future__ import annotations

import json

import pytest
import torch
from heal_support import SMALL, heal, prune, weights
from safetensors import safe_open

from sensray.heal.masks import PRUNE_RECORD

HEAL_RECORD = "sensray-heal.json"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The shipped model pruned to 50% by wanda (sensray prune), once for this module."""
    return prune(tmp_path_factory.mktemp("pruned") / "tiny-wanda50")


@pytest.fixture(scope="module")
def healed(pruned, tmp_path_factory):
    """The pruned model healed by each method (3 steps, LoRA's lr high enough to move the weights)."""
    from heal_support import main

    out = {}
    for method, lr in (("lora", "1e-3"), ("masked", "1e-4")):
        out[method] = tmp_path_factory.mktemp("healed") / method
        assert main(["--model", str(pruned), "--method", method, "--steps", "3", "--lr", lr,
                     "--output-dir", str(out[method]), *SMALL]) == 0
    return out


def record(directory):
    return json.loads((directory / HEAL_RECORD).read_text())


@pytest.mark.parametrize("method", ["lora", "masked"])
def test_the_export_keeps_exactly_the_pruned_models_zeros_tensor_by_tensor(pruned, healed, method):
    before, after = weights(pruned), weights(healed[method])
    tensors = json.loads((pruned / PRUNE_RECORD).read_text())["achieved"]["tensors"]
    achieved = record(healed[method])["achieved"]
    assert set(achieved["tensors"]) == set(tensors)
    for name, entry in tensors.items():
        param = entry["param"]
        assert torch.equal(after[param] == 0, before[param] == 0), name  # the same positions, not just the count
        assert achieved["tensors"][name]["zeros"] == entry["zeros"] and achieved["tensors"][name]["sparsity"] == \
            entry["sparsity"], name
    changed = [p for p in before if not torch.equal(before[p], after[p])]
    assert changed, "healing changed no weight"


def test_lora_merge_moved_every_pruned_weight_and_they_were_zeroed_again_masked_moved_none(healed):
    lora, masked = record(healed["lora"])["mask"], record(healed["masked"])["mask"]
    assert lora["moved_then_rezeroed"] == lora["held_at_zero"] > 0  # every adapted matrix: B A is dense
    assert masked["moved_then_rezeroed"] == 0 and masked["held_at_zero"] == lora["held_at_zero"]


def test_the_export_is_a_plain_hf_directory_with_no_adapter_left(healed):
    from transformers import AutoModelForCausalLM

    for directory in healed.values():
        names = {p.name for p in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", HEAL_RECORD, "loss-curve.png"} <= names
        assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in directory.iterdir())
        with safe_open(str(directory / "model.safetensors"), "pt") as file:
            assert not [k for k in file.keys() if "lora" in k or "base_layer" in k]
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        assert type(model).__name__ == "LlamaForCausalLM"


def test_the_record_holds_recipe_steps_curve_and_the_ppl_it_measured(pruned, healed):
    from sensray.data import eval_batches
    from sensray.metrics import evaluate
    from sensray.models import load_model, load_tokenizer
    from sensray.spec import DataSpec, ModelSpec

    data = DataSpec(corpus="bundled", seq_len=32, num_sequences=2, batch_size=2)
    for method, directory in healed.items():
        rec = record(directory)
        assert rec["format"] == "sensray-heal/1" and rec["steps"] == 3 and rec["plain_fine_tuning"] is False
        assert rec["recipe"]["method"] == method and rec["recipe"]["train"]["corpus"] == "bundled-train"
        assert rec["loss_curve"]["step"] == [1, 2, 3] and len(rec["loss_curve"]["loss"]) == 3
        assert (rec["eval"]["ppl_merged_unmasked"] is None) == (method == "masked")  # LoRA: before the re-mask
        assert rec["source"]["pruning_record"].endswith(PRUNE_RECORD)
        assert rec["pruning"] == json.loads((pruned / PRUNE_RECORD).read_text())  # carried forward
        for key, path in (("ppl_before", pruned), ("ppl_after", directory)):  # the numbers are sensray's own ppl
            spec = ModelSpec(name=str(path))
            assert rec["eval"][key] == evaluate(load_model(spec), eval_batches(data, load_tokenizer(spec))).ppl
    lora, masked = record(healed["lora"])["trainable"], record(healed["masked"])["trainable"]
    linear = [m for name, m in load_model(ModelSpec(name=str(pruned))).named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert lora["modules"] == len(linear) == 56
    assert lora["parameters"] == sum(8 * (m.in_features + m.out_features) for m in linear)  # r (in + out) each
    assert 0 < lora["share_of_model"] < 0.1 < masked["share_of_model"] == 1.0
    assert masked["free_parameters"] == masked["parameters"] - record(healed["masked"])["mask"]["held_at_zero"]


def test_healing_a_healed_model_keeps_the_original_mask(pruned, healed, tmp_path, capsys):
    code, _, err = heal(capsys, healed["lora"], tmp_path / "again", "masked", 2)
    assert code == 0, err
    assert "sensray-heal.json: 56 tensors" in err  # the mask came from the record carried forward
    before, after = weights(pruned), weights(tmp_path / "again")
    for entry in json.loads((pruned / PRUNE_RECORD).read_text())["achieved"]["tensors"].values():
        assert torch.equal(after[entry["param"]] == 0, before[entry["param"]] == 0)


def test_a_model_without_pruning_metadata_is_plainly_fine_tuned_and_says_so(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    code, out, err = heal(capsys, model_dir, tmp_path / "plain", "lora", 2, "--corpus", corpus)
    assert code == 0, err
    assert "plain fine-tuning" in err and "has no sensray-prune.json" in err
    rec = record(tmp_path / "plain")
    assert rec["plain_fine_tuning"] is True and rec["mask"]["held_at_zero"] == 0
    assert rec["mask"]["source"].startswith("none") and rec["pruning"] is None
    assert out.strip().splitlines()[-1] == str(tmp_path / "plain")


def test_resume_after_a_crash_continues_to_the_same_weights_bit_for_bit(pruned, tmp_path, capsys, monkeypatch):
    from sensray.heal import data

    args = ("--lr", "1e-3", "--set", "checkpoint_every=2")
    assert heal(capsys, pruned, tmp_path / "straight", "lora", 4, *args)[0] == 0
    real = data.batch_rows

    def crash_at_step_3(windows, batch_size, seed, step):
        if step == 3:
            raise KeyboardInterrupt  # as Ctrl-C (or a killed process) would, mid-training
        return real(windows, batch_size, seed, step)

    monkeypatch.setattr(data, "batch_rows", crash_at_step_3)
    code, _, err = heal(capsys, pruned, tmp_path / "crashed", "lora", 4, *args)
    assert code == 130 and "--resume" in err and not (tmp_path / "crashed").exists()
    assert (tmp_path / "crashed.heal-state" / "checkpoint").is_dir()
    monkeypatch.setattr(data, "batch_rows", real)
    code, _, err = heal(capsys, pruned, tmp_path / "crashed", "lora", 4, *args, "--resume")
    assert code == 0, err
    assert "resuming" in err and "at step 2 of 4" in err
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record(tmp_path / "straight")["loss_curve"] == record(tmp_path / "crashed")["loss_curve"]
    assert record(tmp_path / "crashed")["recipe"]["resumed"][0]["at_step"] == 2
    assert not (tmp_path / "crashed.heal-state").exists()  # the state goes once the export is written


def test_a_learning_rate_that_makes_the_loss_nan_stops_and_keeps_the_last_good_checkpoint(pruned, tmp_path, capsys):
    from sensray.heal.checkpoint import latest, load_curve

    out = tmp_path / "diverged"
    code, _, err = heal(capsys, pruned, out, "masked", 6, "--lr", "1e5", "--set", "checkpoint_every=1")
    assert code == 1 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the training loss became nan at step ") and "nothing was exported" in line
    stopped = int(line.split("at step ")[1].split(" ")[0])
    kept = load_curve(latest(out.with_name("diverged.heal-state"))).done
    assert kept == stopped - 2  # the newest checkpoint held the very weights whose loss was NaN: dropped
    assert f"last good checkpoint (step {kept})" in line and "--resume --lr" in line
    assert all(torch.isfinite(torch.tensor(load_curve(latest(out.with_name("diverged.heal-state"))).loss)))
    # --resume with a lower lr continues from the kept checkpoint and records the change. (Weights that went
    # through steps of lr 1e5 are wrecked though finite: whether they finish is theirs to say, not this test's.)
    code, _, err = heal(capsys, pruned, out, "masked", 6, "--lr", "1e-12", "--set", "checkpoint_every=1", "--resume")
    assert code in (0, 1) and f"at step {kept} of 6 (changed: {{'lr': [100000.0, 1e-12]}})" in err
    state = out.with_name("diverged.heal-state")
    resumed = json.loads((state / "recipe.json").read_text())["resumed"] if code else record(out)["recipe"]["resumed"]
    assert resumed[0]["at_step"] == kept and resumed[0]["changed"] == {"lr": [1e5, 1e-12]}


@pytest.mark.parametrize("args, flag", [
    (["--steps", "0"], "--steps"),
    (["--corpus", "bundled"], "--corpus"),
    (["--set", "lora.targets=[embed]"], "lora.targets[0]"),
    (["--set", "lora.targets=[blocks.99]"], "lora.targets[0]"),
    (["--workers", "3"], "train"),
    (["--set", "micro_batch_size=3"], "micro_batch_size"),
    (["--lr", "nan"], "--lr"),
    (["--resume"], "--resume"),
    (["--set", "mixed_precision=fp16", "--device", "cpu"], "--mixed-precision"),
])
def test_bad_arguments_exit_2_naming_the_argument_and_write_nothing(pruned, tmp_path, capsys, args, flag):
    from heal_support import main

    argv = ["--model", str(pruned), "--method", "lora", "--steps", "2", "--output-dir", str(tmp_path / "x"), *SMALL]
    assert main(argv + args) == 2  # a repeated option (--steps 0) takes the last value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}"), err
    assert list(tmp_path.iterdir()) == []


def test_the_eval_text_under_another_name_is_refused(pruned, tmp_path, capsys):
    from sensray.data import BUNDLED_CORPUS

    copy = tmp_path / "notes.txt"
    copy.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    code, _, err = heal(capsys, pruned, tmp_path / "x", "lora", 2, "--corpus", copy)
    assert code == 2 and "holds 100% of the eval text's paragraphs" in err and "--corpus" in err


def test_an_existing_output_or_an_interrupted_heal_is_never_overwritten(pruned, tmp_path, capsys):
    (tmp_path / "there").mkdir()
    assert heal(capsys, pruned, tmp_path / "there", "lora", 2)[0] == 2
    (tmp_path / "left.heal-state").mkdir()
    code, _, err = heal(capsys, pruned, tmp_path / "left", "lora", 2)
    assert code == 2 and "continue it with --resume" in err


def test_dry_run_says_what_would_run_and_writes_nothing(pruned, tmp_path, capsys):
    code, out, _ = heal(capsys, pruned, tmp_path / "x", "masked", 300, "--dry-run")
    assert code == 0 and list(tmp_path.iterdir()) == []
    assert "mask: sensray-prune.json: 56 tensors, 851,968 weights held at zero (50.00%)" in out
    assert "300 steps x 2 windows of 32 tokens of bundled-train" in out and "checkpoint every 30 steps" in out


def test_batches_are_epochs_of_seeded_permutations():
    from sensray.heal.data import batch_rows

    rows = torch.cat([batch_rows(10, 4, seed=3, step=s) for s in range(5)])  # 20 rows: two epochs of 10
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert torch.equal(rows, torch.cat([batch_rows(10, 4, seed=3, step=s) for s in range(5)]))
    assert not torch.equal(rows, torch.cat([batch_rows(10, 4, seed=4, step=s) for s in range(5)]))


def test_the_learning_rate_warms_up_then_decays():
    from sensray.heal.engine import lr_at
    from sensray.heal.recipe import parse_recipe

    def recipe(schedule):
        return parse_recipe({"model": {"name": "sensray-tiny"}, "method": "lora", "steps": 10, "lr": 1.0,
                             "warmup_steps": 2, "schedule": schedule, "output_dir": "x"})

    assert [lr_at(recipe("linear"), s) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_at(recipe("cosine"), 6) == pytest.approx(0.5) and lr_at(recipe("constant"), 9) == 1.0


def test_lora_targets_resolve_through_the_architecture_table():
    from sensray.heal.lora import lora_modules
    from sensray.testing import tiny_model

    for family, q in (("llama", "model.layers.1.self_attn.q_proj"), ("gpt_neox", "gpt_neox.layers.1.attention."
                                                                                "query_key_value")):
        modules = lora_modules(tiny_model(family), ["blocks.1.attn.q"])
        assert modules == [q]  # a fused view adapts its whole fused layer


def test_heals_with_different_precisions_run_one_after_another_in_one_process(pruned, tmp_path, capsys):
    """A study runs its heals in one process; accelerate's per-process state must not pin the first one's."""
    assert heal(capsys, pruned, tmp_path / "bf16", "lora", 1, "--mixed-precision", "bf16")[0] == 0
    code, _, err = heal(capsys, pruned, tmp_path / "fp32", "lora", 1, "--mixed-precision", "no")
    assert code == 0, err
    assert record(tmp_path / "bf16")["recipe"]["mixed_precision"] == "bf16"


@pytest.mark.parametrize("package, args, words", [
    ("peft", [], "error: --method: lora needs peft (a sensray dependency), which is not installed: pip install 'peft"),
    ("deepspeed", ["--deepspeed", "2"], "error: --deepspeed: DeepSpeed is not installed"),
])
def test_a_missing_optional_package_is_named_with_the_extra_that_installs_it(pruned, tmp_path, capsys, monkeypatch,
                                                                           package, args, words):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    code, _, err = heal(capsys, pruned, tmp_path / "x", "lora", 2, "--dry-run", *args)
    assert code == 2 and words in err and list(tmp_path.iterdir()) == []
