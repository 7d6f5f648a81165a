"""benchmarks/gpu_7b.py: its tiny CPU mode runs end to end, and its 7B arithmetic is right.

The script is written for one GPU (7B-shaped models in bf16); these tests run it where CI runs,
on the CPU, with two small shapes, and with polars and ray unimportable, as on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_7b.py"

# At exit, write the distributions whose modules were loaded from site-packages to the file in argv[1].
RECORD = """
import atexit, importlib.metadata, json, sys

def record(out=sys.argv[1]):
    owners = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    names = {name.partition(".")[0] for name, m in list(sys.modules.items())
             if m is not None and "site-packages" in (getattr(m, "__file__", None) or "")}
    loaded = {d for name in names for d in owners.get(name, [])}
    open(out, "w").write(json.dumps(sorted(loaded)))

atexit.register(record)
"""
# Run the script as `python3 benchmarks/gpu_7b.py --tiny` would, but with polars and ray made
# unimportable first (a None entry in sys.modules makes `import polars` raise ImportError).
LAUNCH = RECORD + f"""
sys.modules["polars"] = None
sys.modules["ray"] = None
import runpy
sys.argv = [{str(SCRIPT)!r}, "--tiny"]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
# What transformers loads by itself to build a Llama here: its own dependencies, which the GPU
# machine's transformers brings in its own versions (this one, 5.24, pulls in trio, dill, ...).
BASELINE = RECORD + """
from transformers import AutoModelForCausalLM, LlamaConfig
AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))
"""

# The GPU machine's python3 packages (the device notes' list for nvidia-h200, read 2026-11-17), and the
# wheels that benchmarks/gpu_7b.py's docstring says to carry there. The script must need nothing else.
GPU_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
CARRIED = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"}


def normalized(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`: rows of stripped cells, the header first, the |---| line dropped."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = [cells]
                tables.append(current)
            elif not set("".join(cells)) <= set("-:"):
                current.append(cells)
        else:
            current = None
    return tables


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_7b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the script's whole CPU smoke run, in its own interpreter
def test_tiny_mode_prints_the_tables_without_polars_or_ray(tmp_path):
    loaded = tmp_path / "distributions.json"
    # 6 s on a quiet 2-core machine; the limit only guards against a hang (a machine shared with ten
    # other processes took minutes)
    out = subprocess.run([sys.executable, "-c", LAUNCH, str(loaded)], cwd=REPO, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    distributions = {normalized(d) for d in json.loads(loaded.read_text())} - {"sensray"}
    assert {"torch", "transformers", "pydantic"} <= distributions  # the record is of the run's imports
    base = tmp_path / "baseline.json"
    subprocess.run([sys.executable, "-c", BASELINE, str(base)], check=True, capture_output=True, timeout=600)
    ours = distributions - {normalized(d) for d in json.loads(base.read_text())}
    assert "pydantic" in ours  # what sensray and the script add on top of transformers
    assert ours <= GPU_IMAGE | CARRIED, f"not on the GPU machine: {ours - GPU_IMAGE - CARRIED}"
    text = out.stdout
    assert "a smoke run, not a GPU number" in text
    assert "command: `python3 benchmarks/gpu_7b.py --tiny`" in text
    assert "modules loaded: pydantic of ray, polars, pydantic" in text
    tables = markdown_tables(text)
    assert [t[0][:3] for t in tables] == [
        ["model", "way", "trials"], ["model", "params (B)", "GFLOP/forward"], ["model", "way", "apply ms"],
        ["model", "weights GiB", "reference GiB"],
    ]
    rate, steps = ({(row[0], row[1]): row for row in t[1:]} for t in (tables[0], tables[2]))
    compute, memory = ({row[0]: row for row in t[1:]} for t in (tables[1], tables[3]))
    shapes = ("tiny-llama", "tiny-mistral")
    assert set(rate) == set(steps) == {(s, w) for s in shapes for w in ("full", "reuse")}
    assert set(compute) == set(memory) == set(shapes)
    for shape in shapes:
        for way in ("full", "reuse"):
            row = rate[shape, way]
            assert row[2] == "4" and float(row[3]) > 0 and row[7] == "0"  # 4 trials (one per block), no errors
            assert 0 < float(steps[shape, way][6].rstrip("%")) < 100  # apply+restore+verify share of a trial
        assert rate[shape, "reuse"][6].startswith("4/4 ")  # reuse gave the full forward's metrics, bit for bit
        assert float(compute[shape][4]) > 0  # forward TFLOP/s
        assert "CHANGED" not in memory[shape][7]  # the weights' checksum after the trials equals the one at load
    assert "2,147,483,648 bytes = 2.00 GiB" in text


def test_flop_count_of_the_llama_2_7b_shape():
    script = load_script()
    import transformers
    from transformers import AutoModelForCausalLM

    name, kwargs = script.SHAPES["llama-2-7b"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, name)(**kwargs), dtype=torch.bfloat16)
    batches = [torch.empty(16, 512, dtype=torch.long, device="meta")]
    flops, matmul_params = script.flop_model(model, batches)
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q, k, v, o + gate, up, down
    assert matmul_params == 32 * block + 4096 * 32000  # + the output projection
    attn = 4 * 16 * 512**2 * 4096  # Q K^T and (scores) V, one block
    assert flops() == 2 * 8192 * (32 * block + 4096 * 32000) + 32 * attn
    assert flops(20) == 2 * 8192 * (12 * block + 4096 * 32000) + 12 * attn
    assert script.cache_gib("llama-2-7b", 16 * 512) == 2.0


def test_mistral_shape_has_grouped_kv_heads():
    script = load_script()
    import transformers
    from transformers import AutoModelForCausalLM

    name, kwargs = script.SHAPES["mistral-7b"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, name)(**kwargs), dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert params == 7_241_732_096  # Mistral-7B-v0.1's parameter count
    _, matmul_params = script.flop_model(model, [torch.empty(1, 8, dtype=torch.long, device="meta")])
    assert matmul_params == params - 32000 * 4096 - (2 * 32 + 1) * 4096  # all but the embedding and the norms
