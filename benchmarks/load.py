"""The Inference Endpoints handler under load: throughput and p50/p95 latency at 1, 4 and 8 concurrent clients, and
whether one batched forward of concurrent requests would serve them faster.

    python benchmarks/load.py [--requests 64] [--out benchmarks/results_load_cpu.md]

Bundled ViT-S/14, two merged masked tasks (random memory, m=5) at 98 px, the test images of the bundled CIFAR-10 as
PNG bytes (what a client sends). Each client sends its requests one after another; the clients run as threads
calling the handler, as Inference Endpoints' server calls it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_peft.assets import default_backbone, default_dataset  # noqa: E402
from memory_peft.endpoint import MemoryEndpointHandler  # noqa: E402
from memory_peft.files import write_text_atomically  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402


def two_task_artifact(folder: Path) -> Path:
    from peft import get_peft_model

    from memory_peft import MemoryTokenConfig
    from memory_peft.artifact import merge_adapters

    for seed, task in enumerate(("cifar", "fashion")):
        torch.manual_seed(seed)
        config = MemoryTokenConfig(m=5, mode="masked", num_labels=10, image_size=98)
        get_peft_model(load_backbone(default_backbone()), config).save_pretrained(folder / task)
    return merge_adapters({t: folder / t for t in ("cifar", "fashion")}, folder / "merged")


def run(handler, payloads: list[bytes], clients: int) -> tuple[float, list[float]]:
    """-> (requests per second, each request's latency in ms)."""

    def one(payload):
        started = time.perf_counter()
        answer = handler({"inputs": payload, "parameters": {"top_k": 3}})
        assert "error" not in answer, answer
        return 1000 * (time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(one, payloads))
    return len(payloads) / (time.perf_counter() - started), latencies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results_load_cpu.md")
    args = p.parse_args(argv)
    test = datasets.load_dataset(default_dataset("cifar10"), split=f"test[:{args.requests}]")
    payloads = []
    for example in test:
        buffer = io.BytesIO()
        example["img" if "img" in example else "image"].save(buffer, format="PNG")
        payloads.append(buffer.getvalue())
    with tempfile.TemporaryDirectory() as folder:
        handler = MemoryEndpointHandler(str(two_task_artifact(Path(folder))))
        run(handler, payloads[:8], 1)  # warm-up
        lines = [
            f"# benchmarks/load.py, {torch.get_num_threads()} torch threads, {args.requests} requests per row, "
            f"bundled ViT-S/14, two merged masked tasks at 98 px",
            "",
            "| concurrent clients | requests/s | p50 latency (ms) | p95 latency (ms) |",
            "|---|---|---|---|",
        ]
        for clients in (1, 4, 8):
            throughput, latencies = run(handler, payloads, clients)
            p50, p95 = statistics.quantiles(latencies, n=20)[9], statistics.quantiles(latencies, n=20)[18]
            lines.append(f"| {clients} | {throughput:.1f} | {p50:.0f} | {p95:.0f} |")
            print(lines[-1], flush=True)
        # one forward for 8 requests: the pipeline batched (what a batching server would do) against 8 single calls
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in payloads[:8]]
        pipeline = handler.pipeline
        timings = {}
        for name, call in (
            ("8 requests, one forward each", lambda: [pipeline(image, top_k=3) for image in images]),
            ("8 requests in one batched forward", lambda: pipeline(images, top_k=3, batch_size=8)),
        ):
            call()
            best = min(_timed(call) for _ in range(5))
            timings[name] = best
            print(f"{name}: {1000 * best:.0f} ms", flush=True)
        single, batched = timings.values()
        lines += [
            "",
            f"Batching: 8 images through one forward took {1000 * batched:.0f} ms against {1000 * single:.0f} ms "
            f"for 8 forwards of one ({single / batched:.2f} x), best of 5, one thread of calls.",
        ]
    write_text_atomically(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
