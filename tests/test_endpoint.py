"""The Inference Endpoints handler a merged artifact carries: loaded as Inference Endpoints loads it (handler.py from
the repository root), called on real images of the bundled datasets, it gives the labels examples/predict.py gives;
bad requests get one-line error payloads."""

import base64
import importlib.util
import sys

import pytest
from conftest import ROOT, SHARED
from helpers import BUNDLED_TASKS, merged_bundled_artifact

from memory_peft.artifact import merge_adapters
from memory_peft.endpoint import HANDLER_FILE, REQUIREMENTS_FILE

DATASETS = BUNDLED_TASKS


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return merged_bundled_artifact(tmp_path_factory.mktemp("endpoint"))


@pytest.fixture(scope="module")
def handler(artifact):
    spec = importlib.util.spec_from_file_location("handler", artifact / HANDLER_FILE)  # as Inference Endpoints does
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(artifact))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import datasets

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for dataset in DATASETS.values():
        split = datasets.load_dataset(str(SHARED / "data" / dataset))["test"]
        column = "img" if "img" in split.column_names else "image"
        for i in range(2):
            paths.append(folder / f"{dataset}_{i}.png")
            split[i][column].save(paths[-1])
    return paths


def test_merge_writes_the_handler_and_its_requirements(artifact, tmp_path):
    assert "class EndpointHandler(MemoryEndpointHandler)" in (artifact / HANDLER_FILE).read_text()
    assert (artifact / REQUIREMENTS_FILE).read_text().startswith("memory-peft>=")
    assert "Inference Endpoints" in (artifact / "README.md").read_text()
    bare = merge_adapters({"cifar": artifact / "cifar"}, tmp_path / "bare", handler=False)
    assert not (bare / HANDLER_FILE).exists() and not (bare / REQUIREMENTS_FILE).exists()


def test_handler_gives_the_labels_predict_gives_on_real_images(handler, artifact, images):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "examples"))
    import predict

    expected = predict.main(["--artifact", str(artifact), "--images", *map(str, images), "--top", "3"])
    for path in images:
        image, top = Image.open(path), expected[str(path)]
        raw = path.read_bytes()
        answers = [
            handler({"inputs": image, "parameters": {"top_k": 3}}),
            handler({"inputs": raw, "parameters": {"top_k": 3}}),
            handler({"inputs": base64.b64encode(raw).decode(), "parameters": {"top_k": 3}}),
        ]
        for answer in answers:
            assert list(answer) == list(DATASETS)
            for task, ranked in answer.items():
                assert [r["label"] for r in ranked] == [label for label, _ in top[task]]
                assert [r["score"] for r in ranked] == pytest.approx([p for _, p in top[task]], abs=1e-5)
    batch = handler({"inputs": [Image.open(p) for p in images[:2]], "parameters": {"tasks": ["fashion"], "top_k": 1}})
    assert [list(result) for result in batch] == [["fashion"], ["fashion"]]
    assert batch[0]["fashion"][0]["label"] == expected[str(images[0])]["fashion"][0][0]


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"inputs": "not an image"}, "neither a file path nor base64"),
        ({"inputs": base64.b64encode(b"plain text").decode()}, "not an image PIL can read"),
        ({"parameters": {"top_k": 2}}, 'must be a JSON object {"inputs"'),
        ({"inputs": None}, "must be an image"),
        ({"inputs": [], "parameters": {}}, "empty list"),
        ({"inputs": "IMAGE", "parameters": {"top_k": 0}}, '"top_k" must be an integer >= 1'),
        ({"inputs": "IMAGE", "parameters": {"tasks": ["birds"]}}, "Unknown task(s) ['birds']"),
        ({"inputs": "IMAGE", "parameters": {"topk": 2}}, "Unknown parameter(s) ['topk']"),
    ],
)
def test_bad_requests_get_one_line_errors(handler, images, request_, message):
    if request_.get("inputs") == "IMAGE":
        request_ = {**request_, "inputs": base64.b64encode(images[0].read_bytes()).decode()}
    answer = handler(request_)
    assert set(answer) == {"error"} and message in answer["error"] and "\n" not in answer["error"]


def test_the_handler_serves_a_plain_adapter_folder_too(artifact, images):
    from PIL import Image

    from memory_peft.endpoint import MemoryEndpointHandler

    single = MemoryEndpointHandler(str(artifact / "cifar"))
    answer = single({"inputs": Image.open(images[0]), "parameters": {"top_k": 2}})
    assert list(answer) == ["default"] and len(answer["default"]) == 2


def _under_load(call, requests, clients: int = 8):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(call, requests))


def assert_same_answers(concurrent, alone):
    for got, expected in zip(concurrent, alone, strict=True):
        assert list(got) == list(expected)
        for task in expected:
            assert [r["label"] for r in got[task]] == [r["label"] for r in expected[task]]
            assert [r["score"] for r in got[task]] == pytest.approx([r["score"] for r in expected[task]], abs=1e-5)


def test_the_handler_gives_the_same_answers_to_8_concurrent_clients_as_one_at_a_time(handler, images):
    from PIL import Image

    requests = [{"inputs": Image.open(images[i % len(images)]), "parameters": {"top_k": 1 + i % 3}} for i in range(16)]
    alone = [handler(request) for request in requests]
    assert_same_answers(_under_load(handler, requests), alone)
    # a list of images in one request: one batched forward, each image's answer as alone
    batched = handler({"inputs": [r["inputs"] for r in requests[:4]], "parameters": {"top_k": 3}})
    assert_same_answers(batched, [handler({"inputs": r["inputs"], "parameters": {"top_k": 3}}) for r in requests[:4]])


def test_the_demos_predict_gives_the_same_answers_to_8_concurrent_clients(artifact, images):
    from PIL import Image

    from memory_peft.demo import Demo

    demo = Demo(str(artifact))
    requests = [(Image.open(images[i % len(images)]), 1 + i % 3) for i in range(8)]
    alone = [demo.predict(image, top_k, repeats=1)[0] for image, top_k in requests]
    # its timing runs the base model with the adapters disabled: never while another client's tasks run
    assert_same_answers(_under_load(lambda r: demo.predict(*r, repeats=1)[0], requests), alone)
