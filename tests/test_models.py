"""Model names, loading through transformers from local directories, tokens, meta models."""

import pytest
import torch

from sensray.errors import SensrayError
from sensray.models import ALIASES, hub_token, load_config, load_model, meta_model, resolve_name
from sensray.spec import ModelSpec
from sensray.testing import FAMILIES, tiny_model

SEED_MODELS = ("llama-2-7b", "llama-2-7b-chat", "gpt-neo-125m", "gpt-neo-1.3b", "gpt-j-6b", "opt-350m", "opt-1.3b",
               "bloom-560m", "bloom-1b1", "pythia-70m", "pythia-410m", "falcon-rw-1b", "mistral-7b")


def test_every_seed_model_has_an_alias():
    assert set(SEED_MODELS) <= set(ALIASES)
    assert resolve_name("pythia-70m") == "EleutherAI/pythia-70m"
    assert resolve_name("some/other-model") == "some/other-model"


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_on_a_local_directory(family, tmp_path):
    original = tiny_model(family)
    original.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(ModelSpec(name=str(tmp_path), device="cpu"))
    want, got = original.state_dict(), loaded.state_dict()
    assert list(got) == list(want)  # every tensor, none missing (zip below would hide it)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert not loaded.training


def test_dtype_is_honoured(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(name=str(tmp_path), dtype="bfloat16", device="cpu"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_meta_model_has_structure_but_no_data(tmp_path):
    tiny_model("gpt_neox").save_pretrained(tmp_path)
    model = meta_model(ModelSpec(name=str(tmp_path), dtype="float16"))
    params = list(model.parameters())
    assert all(p.is_meta for p in params) and {p.dtype for p in params} == {torch.float16}


def test_pickled_checkpoints_are_never_unpickled(tmp_path):
    """A .bin checkpoint holding anything but tensors is refused (torch.load weights_only=True), and
    the code in it never runs: unpickling it would create a file."""
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    state = dict(model.state_dict()) | {"evil": Payload()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(SensrayError, match=rf"^model\.name: cannot load '{tmp_path}'") as err:
        load_model(ModelSpec(name=str(tmp_path), device="cpu"))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SensrayError, match="model.name: cannot load config of"):
        load_config(ModelSpec(name=str(tmp_path / "nowhere")))


def test_hub_token_from_env_or_dotenv(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hub_token(tmp_path / ".env") is None
    (tmp_path / ".env").write_text("# secrets\nOTHER=1\nexport HF_TOKEN='hf_from_file'\n")
    assert hub_token(tmp_path / ".env") == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_token(tmp_path / ".env") == "hf_from_env"
