"""GPU-first hot paths, checked on the CPU: one graph per forward, few ops per layer, no state that crosses calls.

The CUDA-graph failure (a tensor made inside one captured call, kept in a Python cache and read by the next) has a CPU
shape: two compiled calls with different inputs whose results are both kept, and module state that a forward fills.
"""

import copy
import shutil

import pytest
import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTModel

from memory_peft import MemoryTokenConfig, MultiTaskImageClassifierOutput, activate
from memory_peft.diagnostics import count_ops, graph_breaks
from memory_peft.settings import apply_setting

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"
)


def tiny_vit(layers=2, seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        patch_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_hidden_layers=layers,
        image_size=64,
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def merged(vit, count, num_labels=(10,)):
    model = None
    for t in range(count):
        config = MemoryTokenConfig(m=5 - t % 3, num_labels=num_labels[t % len(num_labels)], mode="masked", init_std=0.5)
        model = get_peft_model(vit, config, adapter_name=f"t{t}") if model is None else model
        if t:
            model.add_adapter(f"t{t}", config)
    with torch.no_grad():
        for name in model.base_model.memory_class_token:
            model.base_model.memory_class_token[name].add_(torch.randn(64))
            torch.nn.init.normal_(model.base_model.memory_head[name].weight)
    return activate(model.eval(), [f"t{t}" for t in range(count)])


def tensors_held(model) -> set:
    """ids of every tensor reachable from the modules' plain attributes (parameters and buffers aside)."""
    found = set()

    def visit(value, depth=0):
        if isinstance(value, torch.Tensor):
            found.add(id(value))
        elif isinstance(value, (tuple, list)) and depth < 4:
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict) and depth < 4:
            for item in value.values():
                visit(item, depth + 1)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return found


def logits_of(outputs):
    if isinstance(outputs, MultiTaskImageClassifierOutput):
        return {name: out.logits for name, out in outputs.tasks.items()}
    return {"": outputs.logits}


@pytest.mark.parametrize("count", [1, 3])
def test_merged_inference_is_one_graph(count):
    model = merged(tiny_vit(), count)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        breaks, reasons = graph_breaks(lambda p: model(pixel_values=p), pixels)
    assert breaks == 0, reasons


def test_full_attention_inference_is_one_graph():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=5, num_labels=10, top_k=3)).eval()
    with torch.no_grad():
        breaks, reasons = graph_breaks(lambda p: model(pixel_values=p), torch.randn(2, 3, 64, 64))
    assert breaks == 0, reasons


@pytest.mark.parametrize("setting", ["memory-masked", "memory", "full", "head+cls"])
def test_training_forward_is_one_graph(setting):
    model = apply_setting(tiny_vit(), setting, 10, m=5).train()
    breaks, reasons = graph_breaks(
        lambda p, y: model(pixel_values=p, labels=y).loss, torch.randn(2, 3, 64, 64), torch.tensor([1, 9])
    )
    assert breaks == 0, reasons


@pytest.mark.parametrize("count", [1, 10])
def test_merged_forward_adds_three_ops_per_layer_and_a_few_per_forward(count):
    """Stock 12-layer ViT vs the same with `count` merged masked tasks: per layer the row, key and value
    concatenations; per forward the class tokens, the mask and the heads (at most 6)."""
    vit = tiny_vit(layers=12)
    stock = copy.deepcopy(vit)
    model = merged(vit, count, num_labels=(10,))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(pixel_values=pixels)
        extra = sum(count_ops(lambda: model(pixel_values=pixels)).values())
        extra -= sum(count_ops(lambda: stock(pixels)).values())
        ops = count_ops(lambda: model(pixel_values=pixels))
    assert extra <= 3 * 12 + 6, extra
    # no other GEMM than the stock ones (6 per layer), plus the heads (one batched GEMM for several)
    assert ops["addmm.default"] == 6 * 12 + (1 if count == 1 else 0)
    assert ops["baddbmm.default"] == (0 if count == 1 else 1)


def test_a_forward_leaves_no_tensor_behind():
    model = merged(tiny_vit(), 3)
    before = tensors_held(model)
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 64, 64))
    model.train()
    model(pixel_values=torch.randn(2, 3, 64, 64), labels={f"t{t}": torch.tensor([0, 1]) for t in range(3)})
    assert tensors_held(model) <= before


def compiled_equals_eager(model, calls, backend, mode=None):
    """Compile with fullgraph; each call's results kept until all ran, then compared with eager."""
    compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=True)
    results = [compiled(**kwargs) for kwargs in calls]
    for kwargs, result in zip(calls, results):
        expected = model(**kwargs)
        for name, logits in logits_of(expected).items():
            torch.testing.assert_close(logits_of(result)[name], logits, atol=1e-5, rtol=1e-5)
    return results


@needs_compiler
def test_compiled_serving_equals_eager_across_calls():
    """~30 s on 2 CPU cores, mostly compilation."""
    torch._dynamo.reset()
    model = merged(tiny_vit(), 3, num_labels=(4, 7))
    calls = [dict(pixel_values=torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
    with torch.no_grad():
        first, second = compiled_equals_eager(model, calls, "inductor")
    assert not torch.allclose(first.tasks["t0"].logits, second.tasks["t0"].logits)


@pytest.mark.parametrize("setting", ["memory-masked", "memory"])
def test_compiled_training_step_gives_eager_gradients(setting):
    torch._dynamo.reset()
    model = apply_setting(tiny_vit(), setting, 10, m=5).train()
    with torch.no_grad():
        model.base_model.memory_class_token["default"].add_(torch.randn(64))
        torch.nn.init.normal_(model.base_model.memory_head["default"].weight)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for name, forward in (("eager", model), ("compiled", compiled)):
        for seed in (1, 2):
            pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            forward(pixel_values=pixels, labels=torch.tensor([seed, 9])).loss.backward()
        grads[name] = [p.grad.clone() for p in trainable]
        model.zero_grad(set_to_none=True)
    assert len(trainable) == 2 + 3  # memory in both layers, class token, head weight and bias
    for eager, compiled_grad in zip(grads["eager"], grads["compiled"]):
        torch.testing.assert_close(compiled_grad, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("setting", ["memory-masked", "memory"])
def test_cuda_graphs_serve_and_train(setting):
    torch._dynamo.reset()
    vit = tiny_vit().cuda()
    model = (
        merged(vit, 3)
        if setting == "memory-masked"
        else get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=2)).eval()
    )
    calls = [dict(pixel_values=torch.randn(2, 3, 64, 64, device="cuda")) for _ in range(3)]
    with torch.no_grad():
        compiled_equals_eager(model, calls, "inductor", mode="reduce-overhead")
    torch._dynamo.reset()
    trained = apply_setting(tiny_vit(), setting, 10, m=5).cuda().train()
    compiled = torch.compile(trained, mode="reduce-overhead", fullgraph=True)
    losses = []
    for _ in range(3):
        loss = compiled(
            pixel_values=torch.randn(2, 3, 64, 64, device="cuda"), labels=torch.tensor([1, 2], device="cuda")
        ).loss
        loss.backward()
        losses.append(loss.detach().clone())
    assert all(torch.isfinite(loss) for loss in losses)


def test_one_graph_serves_every_new_peft_model_of_a_layout_each_with_its_own_weights():
    """A sweep compiles a fresh PeftModel per run: each used to compile again (its forward was guarded by identity),
    and with fullgraph=True the ninth in a process failed at dynamo's recompile limit (8)."""
    from torch._dynamo.utils import counters

    vit = tiny_vit()
    pixels, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    torch._dynamo.reset()
    counters.clear()
    losses = []
    try:
        for seed in range(10):
            torch.manual_seed(seed)
            model = apply_setting(copy.deepcopy(vit), "memory-masked", num_labels=3, m=2, init_std=0.5).train()
            torch.nn.init.normal_(model.base_model.memory_head["default"].weight)  # heads start at zero
            trainable = [p for p in model.parameters() if p.requires_grad]
            compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True)(
                pixel_values=pixels, labels=labels
            ).loss
            compiled_grads = torch.autograd.grad(compiled_loss, trainable)
            eager_loss = model(pixel_values=pixels, labels=labels).loss
            torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=1e-6)
            for compiled_grad, eager_grad in zip(compiled_grads, torch.autograd.grad(eager_loss, trainable)):
                torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-6, rtol=1e-6)
            losses.append(float(eager_loss))
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert len(set(losses)) == len(losses)  # ten different models, each run with its own weights
