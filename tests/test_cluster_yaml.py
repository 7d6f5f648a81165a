"""cluster.yaml is a real Ray cluster launcher config, and the 7B experiments it is for plan offline.

The config is checked against the JSON schema that ships inside the ray package (and Ray's own
validate_config), then for what sensray needs of it: a CPU head that holds no replica, GPU workers
big enough for a 7B model in bf16, this checkout installed, the weights fetched once per node before
Ray starts, and Ray started with HF_HUB_OFFLINE so that replicas never reach the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GPU_MEMORY_GB = {"g5.xlarge": 24, "g5.2xlarge": 24, "g5.4xlarge": 24, "g5.12xlarge": 24, "g5.48xlarge": 24,
                 "g6e.xlarge": 48, "g6e.12xlarge": 48, "p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80}
SEVEN_B_BF16_GB = 7e9 * 2 / 1e9


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema(config):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(json.loads(json.dumps(config))))  # as `ray up` does, before any AWS call


def test_head_is_cpu_only_and_workers_fit_a_7b_model_in_bf16(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")  # no replica on the head
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, worker in workers.items():
        instance = worker["node_config"]["InstanceType"]
        assert instance in GPU_MEMORY_GB, f"{name}: {instance} is not a known GPU instance type"
        assert GPU_MEMORY_GB[instance] > 1.5 * SEVEN_B_BF16_GB, f"{name}: {instance} is too small for 7B in bf16"
        assert worker["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100  # the HF cache
    assert config["max_workers"] >= max(t.get("max_workers", 0) for t in workers.values())


def test_nodes_install_sensray_and_prefetch_before_ray_starts_offline(config):
    assert config["file_mounts"]["~/sensray"] == "."
    head_setup, worker_setup = " ".join(config["head_setup_commands"]), " ".join(config["worker_setup_commands"])
    for setup in (head_setup, worker_setup):
        assert "pip install" in setup and "-e ~/sensray" in setup
        assert "sensray.executors.prefetch" in setup
        for experiment in ("experiments/llama2-7b-*.yaml", "experiments/mistral-7b-*.yaml"):
            assert experiment in setup
    assert "--config-only" in head_setup and "--config-only" not in worker_setup
    for start in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = " ".join(config[start])
        assert "HF_HUB_OFFLINE=1" in command and "ray start" in command
        assert "0.0.0.0" not in command  # the dashboard stays on the head's loopback (ray dashboard forwards it)


def test_every_prefetched_experiment_exists_and_asks_for_a_gpu():
    from sensray.spec import load_spec

    paths = sorted((REPO / "experiments").glob("llama2-7b-*.yaml")) + sorted(
        (REPO / "experiments").glob("mistral-7b-*.yaml"))
    kinds = {load_spec(p).perturbation for p in paths}
    assert kinds == {"bitflip", "ablation", "noise"} and len(paths) == 10
    for path in paths:
        spec = load_spec(path)
        assert spec.model.dtype == "bfloat16", path.name
        # A replica's share of a GPU follows its weights: one per 24 GB GPU in bf16, two in int8, four in nf4.
        assert spec.resources.gpus == {"none": 1, "int8": 0.5, "nf4": 0.25}[spec.model.quantization], path.name


SEVEN_B = {
    "llama-2-7b": dict(family="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "mistral-7b": dict(family="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=4096),
}
TRIALS = {"bitflip": 32 * 16 * 4, "ablation": 32 * 3, "noise": 7 * 7 * 3, "bitflip-int8": 32 * 4 * 4,
          "bitflip-nf4": 32 * 4 * 4}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*-7b-*.yaml")), ids=lambda p: p.name)
def test_seven_b_experiments_plan_against_the_models_structure(path):
    """The dry run needs the config from the Hub; build the same structure offline (meta device), quantized
    as the spec asks (bitsandbytes modules, as loading builds them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sensray.plan import make_plan
    from sensray.quantized.loading import quantize_meta
    from sensray.spec import load_spec
    from sensray.testing import tiny_config

    spec = load_spec(path)
    shape = dict(SEVEN_B[spec.model.name])
    config = tiny_config(shape.pop("family"), **shape, max_position_embeddings=4096)
    with torch.device("meta"):
        model = quantize_meta(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), spec.model)
    assert sum(p.numel() for p in model.parameters()) > 6.5e9
    plan = make_plan(spec, model)
    assert len(plan.trials) == TRIALS[path.stem.split("-7b-")[1]]


def test_prefetch_resolves_specs_and_skips_local_checkpoints(tmp_path):
    from sensray.executors.prefetch import fetch_model, targets

    wanted = targets([str(REPO / "experiments" / "llama2-7b-noise.yaml"), "mistral-7b"])
    assert wanted == [("llama-2-7b", None, "hf:wikitext/wikitext-2-raw-v1|test"), ("mistral-7b", None, None)]
    assert fetch_model(str(tmp_path)) == str(tmp_path)  # a local directory: nothing to download
