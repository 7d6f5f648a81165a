"""benchmarks/gpu_7b.py: its tiny CPU mode runs end to end, and its 7B arithmetic is right.

The script is written for one GPU (7B-shaped models in bf16); these tests run it where CI runs,
on the CPU, with two small shapes, and with polars and ray unimportable, as on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_7b.py"

# Run the script as `python3 benchmarks/gpu_7b.py --tiny` would, but with polars and ray made
# unimportable first (a None entry in sys.modules makes `import polars` raise ImportError).
LAUNCH = (
    "import runpy, sys; sys.modules['polars'] = None; sys.modules['ray'] = None; "
    f"sys.argv = [{str(SCRIPT)!r}, '--tiny']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
)


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
def test_tiny_mode_prints_the_tables_without_polars_or_ray():
    out = subprocess.run([sys.executable, "-c", LAUNCH], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
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
