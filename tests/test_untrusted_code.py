"""A spec file alone never runs code (issue 10, part 4, class 6): a model's own code needs
--trust-remote-code, a `module:Class` searcher --allow-searcher-import. Each test checks that the
code does not run without the flag (a marker file stays absent) and, as the control, that it does
with it.
"""

from __future__ import annotations

import importlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
from sweep_support import SMALL, fails, one_error, spec_writer, sweep

from sensray.models import BUNDLED_MODEL


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture
def spec(tmp_path):
    return spec_writer(tmp_path, tmp_path / "results")


def remote_code_model(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped model, its config pointing at modeling code that writes a marker file when it runs."""
    model, marker = tmp_path / "custom-model", tmp_path / "code-ran"
    shutil.copytree(BUNDLED_MODEL, model)
    (model / "configuration_marker.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        from transformers import LlamaConfig
        Path({str(marker)!r}).write_text("ran")
        class MarkerConfig(LlamaConfig):
            pass
        """))
    (model / "modeling_marker.py").write_text(textwrap.dedent("""\
        from transformers import LlamaForCausalLM
        from .configuration_marker import MarkerConfig
        class MarkerForCausalLM(LlamaForCausalLM):
            config_class = MarkerConfig
        """))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_marker.MarkerConfig",
                          "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_trust_remote_code_in_a_spec_needs_the_flag(spec, tmp_path, capsys, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # keep ~/.cache clean
    model, marker = remote_code_model(tmp_path)
    path = spec(SMALL + f"model: {{{{name: {model}, trust_remote_code: true}}}}\n")
    for args in (["--dry-run"], ["--executor", "local"]):
        fails(capsys, 2, path, *args, words=("model.trust_remote_code: true runs Python code", "--trust-remote-code"))
    assert not marker.exists()
    sweep(capsys, path, "--dry-run", "--trust-remote-code")
    assert marker.exists()  # the control: with the flag, the model's code does run


def test_a_searcher_module_in_a_spec_needs_the_flag(spec, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    marker = tmp_path / "import-ran"
    (tmp_path / "evil_searcher.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                               "class Searcher:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    search = "search: {{algorithm: 'evil_searcher:Searcher', num_trials: 4}}\n"
    path = spec(SMALL.replace("num_samples: 2\n", "") + search)
    for args in (["--dry-run"], ["--executor", "local"]):
        fails(capsys, 2, path, *args, words=("search.algorithm: 'evil_searcher:Searcher' imports the module",
                                             "--allow-searcher-import"))
    assert not marker.exists()
    fails(capsys, 2, path, "--dry-run", "--allow-searcher-import", words=("is not a ray.tune.search.Searcher",))
    assert marker.exists()  # the control: with the flag, the module is imported
    built_in = spec(SMALL.replace("num_samples: 2\n", "") + search.replace("'evil_searcher:Searcher'", "worst-case"))
    assert sweep(capsys, built_in, "--dry-run")[0] == 0  # a built-in searcher needs no flag


def test_generate_honours_a_runs_trust_remote_code_only_with_the_flag(tmp_path, capsys):
    from sensray.generate import main as generate

    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(SMALL.format(out=tmp_path) + "model: {trust_remote_code: true}\n")
    assert generate(["--run", str(run)]) == 2
    line = one_error(capsys.readouterr().err)
    assert "model.trust_remote_code" in line and "--trust-remote-code" in line


@pytest.mark.parametrize("module", ["sensray.generate", "sensray.prune", "sensray.superweights.cli"])
def test_every_model_loading_command_has_the_flag(module):
    parser = importlib.import_module(module).build_parser()
    assert "--trust-remote-code" in parser.format_help()
