"""Multi-task serving at the cost limit, and training per setting, measured side by side in one run.

    python benchmarks/serving.py [--reps 5] [--batch 32 256] [--dtype bfloat16] [--compile none|default|reduce-overhead]

ViT-B/32-shaped random model (default ViTConfig, patch 32, 224 px, N = 49 patches), for each batch size:
1. inference with T merged masked tasks (m=5) relative to one plain base forward, next to T separate adapter
   forwards and one forward over the fully concatenated sequence with a mask (eager only); the limit is 1 + T/(N+1);
   a full-attention memory adapter (m=5) relative to the base forward;
2. a training step of every fine-tune setting: images per second, time and training memory relative to full
   fine-tuning (peak CUDA memory on a GPU; on a CPU the bytes autograd saves for backward plus gradients and
   optimizer state). In bf16/fp16 the step runs under autocast as `accelerate --mixed_precision` does, with the
   frozen weights cast once (`cast_frozen_weights`, as the training script does);
3. adapter and merged-artifact sizes on disk for T = 1, 10;
4. T = 10 tasks served every way: masked memory and task branches (k = 1, 2, 4) as one forward, peft's LoRA as T
   forwards, as one mixed-adapter batch, and merged into the weights for one task.
Beside each ratio: ATen ops per eager call (about one GPU kernel launch each). With --compile the base model and the
adapted models are compiled the same way (fullgraph), so that like is compared with like.
Timing: configurations interleaved within each repetition, ratios taken against the reference of the same
repetition, medians reported; repetitions whose reference ran > 1.5x its fastest (foreign load) are dropped.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import interleaved, median_ratios, timed, without_foreign_load  # noqa: E402

from memory_peft import MemoryTokenConfig, activate  # noqa: E402
from memory_peft.artifact import merge_adapters  # noqa: E402
from memory_peft.diagnostics import count_ops  # noqa: E402
from memory_peft.settings import apply_setting, cast_frozen_weights  # noqa: E402

TASK_COUNTS = (1, 2, 5, 10, 20)
TRAINED = ("full", "memory", "memory-masked", "head+cls", "head")


def compiled(model, mode: str):
    if mode == "none":
        return model
    return torch.compile(model, fullgraph=True, **({} if mode == "default" else {"mode": mode}))


def big_masked_forward(tuner, pixels, names):
    """The naive alternative: one sequence [c0; p; c_1..c_T; E_1..E_T] per layer with a (L, L) additive mask."""
    vit = tuner.model
    x = vit.embeddings(pixels)
    batch, n, _ = x.shape
    tokens = torch.stack([tuner.memory_class_token[t] for t in names]).to(x.dtype).expand(batch, -1, -1)
    x = torch.cat([x, tokens], 1)
    for layer in vit.layers:
        base = layer.base_layer
        memory = torch.cat([layer.memory_tokens[t] for t in names]).to(x.dtype)
        T, M, m = len(names), memory.shape[0], memory.shape[0] // len(names)
        length = n + T + M
        allowed = torch.zeros(length, length, dtype=torch.bool, device=x.device)
        allowed[:n, :n] = True
        for t in range(T):
            allowed[n + t, :n] = True
            allowed[n + t, n + t] = True
            allowed[n + t, n + T + t * m : n + T + (t + 1) * m] = True
        allowed[n + T :] = True
        z = base.layernorm_before(torch.cat([x, memory.expand(batch, -1, -1)], 1))
        att = base.attention
        q, k, v = (
            p(z).view(batch, length, -1, att.head_dim).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj)
        )
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, allowed)
        x = x + att.o_proj(out.transpose(1, 2).reshape(batch, length, -1)[:, : n + T])
        x = x + base.mlp(base.layernorm_after(x))
    return vit.layernorm(x)


READOUT = {  # readout tasks (issue 49), every layer: with memory m=5 and their class token, and pure probes
    "readout": dict(m=5, readout_layers="all"),
    "probe": dict(m=0, readout_layers="all", readout_class_token=False),
}


def masked_tasks_model(vit, count, device, readout: bool = False):
    """``count`` masked tasks (m=5) task0, task1, ...; with ``readout`` also ``count`` of each kind of READOUT."""
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=100, mode="masked"), adapter_name="task0")
    for t in range(1, count):
        model.add_adapter(f"task{t}", MemoryTokenConfig(m=5, num_labels=100, mode="masked"))
    for kind, fields in READOUT.items() if readout else ():
        for t in range(count):
            model.add_adapter(f"{kind}{t}", MemoryTokenConfig(num_labels=100, mode="masked", **fields))
    return model.to(device).eval()


def inference(args, batch, device, dtype):
    """{config: median ratio to the base forward}, {config: eager ops per call}, kept/total repetitions, base time."""
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False).eval()
    stock = copy.deepcopy(vit).to(device, dtype)
    full = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=5, num_labels=100, mode="full")).to(device, dtype)
    full.eval()
    merged = masked_tasks_model(copy.deepcopy(vit), max(args.tasks), device, readout=True).to(dtype)
    names = [f"task{t}" for t in range(max(args.tasks))]
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)

    # config -> (untimed set-up, timed forward, eager forward for the op count): choosing the active adapters walks
    # every module, which serving does once, not per batch, so it stays out of the timed region
    nothing = lambda: None  # noqa: E731
    run = {
        "base": compiled(stock, args.compile),
        "full": compiled(full, args.compile),
        "merged": compiled(merged, args.compile),
    }
    configs = {
        "base": (nothing, lambda: run["base"](pixels), lambda: stock(pixels)),
        "full m=5": (nothing, lambda: run["full"](pixel_values=pixels), lambda: full(pixel_values=pixels)),
    }
    for count in args.tasks:
        for kind in ("", *READOUT):
            configs[f"merged {kind} T={count}".replace("  ", " ")] = (
                lambda c=count, k=kind: activate(merged, [f"{k or 'task'}{t}" for t in range(c)]),
                lambda: run["merged"](pixel_values=pixels),
                lambda: merged(pixel_values=pixels),
            )
    if args.compile == "none":
        large = {
            k: get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=256, top_k=k, num_labels=100))
            .to(device, dtype)
            .eval()
            for k in (None, 16)
        }
        configs["full m=256 dense"] = (nothing, lambda: large[None](pixel_values=pixels), None)
        configs["full m=256 top-16"] = (nothing, lambda: large[16](pixel_values=pixels), None)
        for count in args.tasks:
            configs[f"big mask T={count}"] = (
                nothing,
                lambda c=count: big_masked_forward(merged.base_model, pixels, names[:c]),
                None,
            )
    ops = {}
    with torch.no_grad():
        for name, (setup, _, eager) in configs.items():
            if eager is not None:
                setup()
                ops[name] = sum(count_ops(eager).values())
        timing = {name: (setup, fn) for name, (setup, fn, _) in configs.items()}
        reps = interleaved(timing, args.reps, lambda fn: timed(fn, device), warmup=1 if args.compile == "none" else 3)
    kept = without_foreign_load(reps, "base")
    return median_ratios(kept, "base"), ops, len(kept), len(reps), statistics.median(r["base"] for r in kept)


BRANCHES = (1, 2, 4)  # branch depths measured at T tasks, each with memory m=5 and rank-8 q/v updates


def frontier(args, batch, device, dtype):
    """T tasks served every way a user can, relative to one base forward: masked memory (k=0) and task branches of
    depth k as one merged forward, peft's LoRA r=8 (q, v) as T forwards, as one forward of peft's mixed-adapter batch
    (each image repeated per task, ``adapter_names``) and merged into the weights for one task (T=1)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    tasks = args.frontier_tasks
    vit = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False).eval()
    stock = copy.deepcopy(vit).to(device, dtype)
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    names = [f"task{t}" for t in range(tasks)]
    memory = {}
    for k in (0, *BRANCHES):
        config = dict(m=5, num_labels=100, mode="masked", branch_layers=k, branch_rank=8 if k else 0)
        model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(**config), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, MemoryTokenConfig(**config))
        memory[k] = activate(model.to(device, dtype).eval(), names)
    readouts = {}  # readout heads (issue 49): m=5 + every layer, m=5 + the last 4 layers, pure probes of every layer
    for kind, fields in {**READOUT, "readout last 4": dict(m=5, readout_layers=[8, 9, 10, 11])}.items():
        config = dict(num_labels=100, mode="masked", **fields)
        model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(**config), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, MemoryTokenConfig(**config))
        readouts[kind] = activate(model.to(device, dtype).eval(), names)
    lora = get_peft_model(copy.deepcopy(vit), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name in names[1:]:
        lora.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora = lora.to(device, dtype).eval()
    merged_lora = copy.deepcopy(lora).merge_and_unload(adapter_names=["default"])
    repeated = pixels.repeat(tasks, 1, 1, 1)
    per_image = [name for name in ["default", *names[1:]] for _ in range(batch)]
    configs = {
        "base": lambda: stock(pixels),
        "lora, one adapter (unmerged)": lambda: lora(pixel_values=pixels),
        f"lora mixed batch T={tasks}": lambda: lora(pixel_values=repeated, adapter_names=per_image),
        "lora merged T=1": lambda: merged_lora(pixel_values=pixels),
        **{f"memory k={k} T={tasks}": (lambda model=model: model(pixel_values=pixels)) for k, model in memory.items()},
        **{f"{kind} T={tasks}": (lambda model=model: model(pixel_values=pixels)) for kind, model in readouts.items()},
    }
    with torch.no_grad():
        ops = {name: sum(count_ops(fn).values()) for name, fn in configs.items()}
        timing = {name: (lambda: None, fn) for name, fn in configs.items()}
        reps = interleaved(timing, args.reps, lambda fn: timed(fn, device), warmup=1)
    kept = without_foreign_load(reps, "base")
    return median_ratios(kept, "base"), ops, len(kept), len(reps)


def frontier_lines(args, batch, device, dtype) -> list[str]:
    ratio, ops, kept, total = frontier(args, batch, device, dtype)
    tasks, layers = args.frontier_tasks, 12
    costs = {k: ratio[f"memory k={k} T={tasks}"] for k in (0, *BRANCHES)}
    record = {
        "tasks": tasks,
        "batch": batch,
        "masked": costs[0],
        "branches": {str(k): costs[k] for k in BRANCHES},
        "lora_forwards": tasks * ratio["lora, one adapter (unmerged)"],
        "lora_mixed_batch": ratio[f"lora mixed batch T={tasks}"],
        "lora_merged_one_task": ratio["lora merged T=1"],
        **{kind.replace(" ", "_"): ratio[f"{kind} T={tasks}"] for kind in (*READOUT, "readout last 4")},
    }
    if args.frontier_json:  # what benchmarks/frontier.py plots accuracy against
        Path(args.frontier_json).write_text(json.dumps(record, indent=1) + "\n")
    rows = [
        ("masked memory m=5 (k=0), one forward", f"memory k=0 T={tasks}", 1 + tasks / 50),
        *(
            (f"task branches k={k} (m=5, r=8), one forward", f"memory k={k} T={tasks}", 1 + tasks * k / layers)
            for k in BRANCHES
        ),
        (f"LoRA r=8 (q, v), {tasks} forwards", None, tasks),
        (f"LoRA r=8 (q, v), mixed batch of {tasks} adapters", f"lora mixed batch T={tasks}", tasks),
        ("masked m=5 + readout of every layer, one forward", f"readout T={tasks}", 1 + tasks / 50),
        ("masked m=5 + readout of the last 4 layers, one forward", f"readout last 4 T={tasks}", 1 + tasks / 50),
        ("pure probes of every layer (m=0, no row), one forward", f"probe T={tasks}", 1.0),
    ]
    lines = [
        f"### {tasks} tasks from one model, batch {batch}: cost relative to one base forward ({kept} of {total} "
        f"repetitions kept)",
        "",
        "| how | cost | FLOP ratio | eager ops |",
        "|---|---|---|---|",
    ]
    for label, name, ideal in rows:
        cost = ratio[name] if name else tasks * ratio["lora, one adapter (unmerged)"]
        count = ops[name] if name else tasks * ops["lora, one adapter (unmerged)"]
        lines.append(f"| {label} | {cost:.2f} x | {ideal:.2f} x | {count} |")
    lines += [
        f"| LoRA merged into the weights, 1 task | {ratio['lora merged T=1']:.2f} x | 1.00 x | "
        f"{ops['lora merged T=1']} |",
        "",
        f"FLOP ratio: masked 1 + T/(N+1); branches 1 + T·k/L (L={layers}); LoRA T (T forwards = T x the measured "
        "one-adapter forward).",
        "",
    ]
    return lines


def host_overhead(args):
    """The same comparison on a ViT too small to compute anything (hidden 64): the time left is Python, dispatch and
    per-kernel overhead: the regime of a GPU running batch 32 of a ViT-B/32, where launches, not FLOPs, set the pace."""
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(patch_size=32, hidden_size=64, intermediate_size=128, num_attention_heads=2), add_pooling_layer=False
    ).eval()
    stock = copy.deepcopy(vit)
    merged = masked_tasks_model(copy.deepcopy(vit), 10, torch.device("cpu"))
    names = [f"task{t}" for t in range(10)]
    pixels = torch.randn(2, 3, 224, 224)

    def forwards(fn, calls=50):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    configs = {"base": (lambda: None, lambda: stock(pixels))}
    for count in (1, 10):
        configs[f"merged T={count}"] = (
            lambda c=count: activate(merged, names[:c]),
            lambda: merged(pixel_values=pixels),
        )
    with torch.no_grad():
        kept = without_foreign_load(interleaved(configs, args.reps, forwards), "base")
    return median_ratios(kept, "base"), statistics.median(r["base"] for r in kept)


def training_step(model, forward, pixels, labels, autocast_dtype):
    """One SGD step of ``model`` (run through ``forward``) on this batch, as a call that records what autograd saves
    for backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):  # activations kept for backward; weights exist anyway
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[(tensor.untyped_storage().data_ptr(), tensor.device)] = tensor.untyped_storage().nbytes()
        return tensor

    def step(forward=forward):
        saved.clear()
        with torch.autocast(pixels.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if pixels.device.type == "cpu":
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = forward(pixel_values=pixels, labels=labels).loss
            else:
                loss = forward(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.saved, step.params = saved, params
    step.eager = lambda: step(model)
    return step


def training_step_cost(step, device):
    """Seconds of one step, and training memory in bytes (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    seconds = timed(step, device)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() - base_memory
    else:
        grads_and_state = sum(2 * p.numel() * p.element_size() for p in step.params)  # grad + momentum
        memory = sum(step.saved.values()) + grads_and_state
    return seconds, memory


def training(args, batch, device, dtype):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False)
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    autocast_dtype = None if dtype == torch.float32 else dtype
    configs, ops = {}, {}
    for name in args.settings:
        model = apply_setting(copy.deepcopy(vit), name, 100, m=5).to(device).train()
        if autocast_dtype is not None:
            cast_frozen_weights(model, autocast_dtype)
        step = training_step(model, compiled(model, args.compile), pixels, labels, autocast_dtype)
        step.eager()  # momentum buffers exist from the second step on
        ops[name] = sum(count_ops(step.eager).values())
        configs[name] = (lambda: None, step)
    reference = "full" if "full" in configs else next(iter(configs))
    reps = interleaved(
        configs, args.reps, lambda step: training_step_cost(step, device), warmup=1 if args.compile == "none" else 3
    )
    kept = without_foreign_load(reps, reference, seconds=lambda cost: cost[0])
    time_ratio = median_ratios(kept, reference, seconds=lambda cost: cost[0])
    memory_ratio = median_ratios(kept, reference, seconds=lambda cost: cost[1])
    seconds = {k: statistics.median(r[k][0] for r in kept) for k in configs}
    memory = {k: statistics.median(r[k][1] for r in kept) for k in configs}
    return reference, time_ratio, memory_ratio, seconds, memory, ops, len(kept)


def sizes():
    vit = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for t in range(10):
            model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=5, num_labels=100, mode="masked"))
            model.save_pretrained(Path(tmp, f"task{t}"))
            paths[f"task{t}"] = Path(tmp, f"task{t}")
        out["adapter (T=1)"] = sum(f.stat().st_size for f in paths["task0"].iterdir())
        for count in (1, 10):
            merged = merge_adapters(dict(list(paths.items())[:count]), Path(tmp, f"merged{count}"))
            out[f"merged artifact T={count}"] = sum(f.stat().st_size for f in merged.rglob("*") if f.is_file())
    return out


def inference_lines(args, batch, device, dtype) -> list[str]:
    ratio, ops, kept, total, base_seconds = inference(args, batch, device, dtype)
    eager = args.compile == "none"
    lines = [
        f"### Inference, batch {batch}: base forward {1000 * base_seconds:.2f} ms (median); {kept} of {total} "
        f"repetitions kept; base {ops['base']} ops per eager call",
        "",
        "| T | merged (one forward) | limit 1+T/(N+1) | eager ops (+ per layer) |"
        + (" T separate adapter forwards | one big masked sequence |" if eager else ""),
        "|---|---|---|---|" + ("---|---|" if eager else ""),
    ]
    for count in args.tasks:
        name = f"merged T={count}"
        row = (
            f"| {count} | {ratio[name]:.3f} x | {1 + count / 50:.2f} x | {ops[name]} "
            f"({(ops[name] - ops['base']) / 12:+.2f}) |"
        )
        if eager:
            row += f" {count * ratio['merged T=1']:.2f} x | {ratio[f'big mask T={count}']:.3f} x |"
        lines.append(row)
    lines += [
        "",
        "Readout tasks (every layer's base class and mean patch tokens, standardised) in one forward: m=5 with the "
        "task's class token, and pure probes (m=0, no row of their own):",
        "",
        "| T | m=5 + readout | eager ops | pure probes | eager ops |",
        "|---|---|---|---|---|",
    ]
    for count in args.tasks:
        readout, probe = f"merged readout T={count}", f"merged probe T={count}"
        lines.append(f"| {count} | {ratio[readout]:.3f} x | {ops[readout]} | {ratio[probe]:.3f} x | {ops[probe]} |")
    lines += [
        "",
        f"Full-attention memory adapter (m=5) vs base forward: {ratio['full m=5']:.3f} x "
        f"({ops['full m=5']} ops, {(ops['full m=5'] - ops['base']) / 12:+.2f} per layer)",
        "",
    ]
    if eager:
        lines += [
            "(T separate forwards = T x the measured one-adapter forward.)",
            "",
            f"Large memory, full attention, m=256: dense {ratio['full m=256 dense']:.3f} x, top-K (k=16) "
            f"{ratio['full m=256 top-16']:.3f} x the base forward (top-K scores every entry to choose, so it "
            "saves no compute in this form; it changes what is read).",
            "",
        ]
    return lines


def training_lines(args, batch, device, dtype) -> list[str]:
    reference, time_ratio, memory_ratio, seconds, memory, ops, kept = training(args, batch, device, dtype)
    what = "peak CUDA memory" if device.type == "cuda" else "saved activations + grads + optimizer state"
    lines = [
        f"### Training step, batch {batch} ({'autocast ' + args.dtype if dtype != torch.float32 else 'fp32'}; "
        f"medians of {kept} of {args.reps} repetitions)",
        "",
        f"| setting | img/s | time vs {reference} | memory vs {reference} ({what}) | eager ops per step |",
        "|---|---|---|---|---|",
    ]
    for name in seconds:
        lines.append(
            f"| {name} | {batch / seconds[name]:.0f} | {time_ratio[name]:.3f} x | {memory_ratio[name]:.3f} x "
            f"({memory[name] / 2**20:.0f} MiB) | {ops[name]} |"
        )
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--training_batch", type=int, nargs="*", default=None, help="default: --batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"])
    p.add_argument("--tasks", type=int, nargs="+", default=list(TASK_COUNTS))
    p.add_argument("--settings", nargs="*", default=list(TRAINED), choices=TRAINED)
    p.add_argument("--frontier_tasks", type=int, default=10, help="T of the every-way-of-serving comparison")
    p.add_argument("--frontier_json", default=None, help="also write that comparison's ratios here (last batch size)")
    p.add_argument("--skip", nargs="*", default=[], choices=["inference", "frontier", "training", "overhead", "sizes"])
    p.add_argument("--out", default="benchmarks/results_serving.md")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"## Serving benchmark — {where}, {args.dtype}, compile {args.compile}, ViT-B/32 shape (N=49), m=5", ""]

    def emit(new_lines):
        lines.extend(new_lines)
        print("\n".join(new_lines), flush=True)

    print("\n".join(lines), flush=True)
    if "inference" not in args.skip:
        for batch in args.batch:
            emit(inference_lines(args, batch, device, dtype))
    if "frontier" not in args.skip:
        for batch in args.batch:
            emit(frontier_lines(args, batch, device, dtype))
    if device.type == "cpu" and "overhead" not in args.skip:
        overhead, base_seconds = host_overhead(args)
        emit(
            [
                f"Host overhead (tiny ViT, hidden 64, 12 layers, batch 2: no compute, only Python and kernel dispatch; "
                f"base forward {1000 * base_seconds:.1f} ms): merged T=1 {overhead['merged T=1']:.2f} x, merged T=10 "
                f"{overhead['merged T=10']:.2f} x the base forward. A GPU running batch 32 eagerly is in this regime.",
                "",
            ]
        )
    if "training" not in args.skip and args.settings:
        for batch in args.training_batch or args.batch:
            emit(training_lines(args, batch, device, dtype))
    if "sizes" not in args.skip:
        emit(["| on disk | bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in sizes().items()])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
