"""benchmarks/training_cost.py: every row takes a real step, and its adapter size is what save_pretrained writes."""

import sys

import pytest
from conftest import ROOT, SHARED

ROWS = ["memory-masked m=5 (images)", "memory-masked m=5 (cache)", "masked branch k=2 r=8 (cache)", "LoRA r=8 (q, v)"]


def test_rows_step_and_their_adapters_weigh_what_save_pretrained_writes(tmp_path):
    if not (SHARED / "models" / "vit-small-patch14-dinov2").is_dir():
        pytest.skip("bundled backbone not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import training_cost
    from common import lora_model

    output = tmp_path / "table.md"
    facts = training_cost.main(
        ["--reps", "1", "--batch_size", "2", "--image_size", "28", "--rows", *ROWS, "--output", str(output)]
    )
    assert list(facts) == ROWS
    assert facts["LoRA r=8 (q, v)"]["ratio"] == 1.0 and all(f["ms"] > 0 for f in facts.values())
    # ViT-S/14 (D=384, 12 layers), 10 classes: memory 12 x 5 x 384, class token 384, head 384 x 10 + 10
    assert facts["memory-masked m=5 (cache)"]["trainable"] == facts["memory-masked m=5 (images)"]["trainable"] == 27_274
    assert facts["masked branch k=2 r=8 (cache)"]["trainable"] == 27_274 + 2 * 2 * 2 * 8 * 384  # q, v: A and B
    args = training_cost.parse_args([])
    data = {"num_labels": 10, "label_names": [str(i) for i in range(10)]}
    lora = lora_model(args.backbone, data, seed=0)
    lora.save_pretrained(tmp_path / "lora")
    saved = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    assert abs(facts["LoRA r=8 (q, v)"]["bytes"] - saved) < 4096  # the same tensors; only the header's names differ
    for fact in facts.values():
        assert 4 * fact["trainable"] < fact["bytes"] < 4 * fact["trainable"] + 16_384  # fp32 tensors and a header
    assert output.read_text().startswith("| row | ms per training step | vs LoRA r=8 (q, v) |")
