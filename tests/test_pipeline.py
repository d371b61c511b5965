"""The library's pipeline: named labels for one adapter, every task's top labels for a merged model in one call, at
the image size the adapters were trained at."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REAL_VIT
from helpers import randomise_task
from peft import get_peft_model
from PIL import Image
from transformers import pipeline

from memory_peft import MemoryTokenConfig, activate
from memory_peft.data import image_processor
from memory_peft.pipelines import MemoryImageClassificationPipeline
from memory_peft.tuner.errors import InputError

NAMES = ["cat", "dog", "ship"]


def expected_ranking(model, task, image, size, k):
    """The top-k (label, score) of the forward itself on the processor's pixels at ``size``."""
    pixels = image_processor(str(REAL_VIT), size)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores = model.forward_tasks(pixel_values=pixels, interpolate_pos_encoding=True).tasks[task].logits[0]
    top = scores.softmax(-1).topk(k)
    labels = model.peft_config[task].label_names or [f"LABEL_{i}" for i in range(scores.shape[-1])]
    return [(labels[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def ranking(result):
    return [(row["label"], row["score"]) for row in result]


def test_one_adapter_gives_named_labels_at_its_training_size(real_vit_cached, images):
    model = get_peft_model(
        copy.deepcopy(real_vit_cached),
        MemoryTokenConfig(m=2, num_labels=3, label_names=NAMES, image_size=56, init_std=0.5),
    )
    randomise_task(model, "default", 3)
    model.eval()
    image = Image.new("RGB", (70, 50), (200, 30, 60))
    result = MemoryImageClassificationPipeline(model)(image, top_k=2)
    expected = expected_ranking(model, "default", image, 56, 2)
    assert [label for label, _ in ranking(result)] == [label for label, _ in expected]
    torch.testing.assert_close([p for _, p in ranking(result)], [p for _, p in expected], atol=1e-5, rtol=0)
    at_224 = expected_ranking(model, "default", image, 224, 3)
    assert max(abs(a - b) for (_, a), (_, b) in zip(ranking(result), at_224)) > 1e-4  # the size matters
    factory = pipeline("memory-image-classification", model=model, image_processor=image_processor(str(REAL_VIT), 98))
    assert ranking(factory(image, top_k=2)) == ranking(result)  # the given processor, resized to the adapter's size


def test_merged_tasks_give_every_tasks_labels_from_one_call(real_vit_cached):
    model = get_peft_model(
        copy.deepcopy(real_vit_cached),
        MemoryTokenConfig(m=2, num_labels=3, label_names=NAMES, image_size=56, mode="masked"),
        adapter_name="animals",
    )
    model.add_adapter("digits", MemoryTokenConfig(m=1, num_labels=4, image_size=56, mode="masked"))
    randomise_task(model, "animals", 1)
    randomise_task(model, "digits", 2)
    activate(model.eval(), ["animals", "digits"])
    images = [Image.new("RGB", (56, 56), colour) for colour in ("red", "green", "blue")]
    results = MemoryImageClassificationPipeline(model, batch_size=2)(images)
    assert len(results) == 3 and all(list(r) == ["animals", "digits"] for r in results)
    for image, result in zip(images, results):
        for task in ("animals", "digits"):
            expected = expected_ranking(model, task, image, 56, 3 if task == "animals" else 4)
            assert [label for label, _ in ranking(result[task])] == [label for label, _ in expected]
    assert {row["label"] for row in results[0]["digits"]} == {"LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"}


def test_adapters_of_different_training_sizes_are_refused(real_vit_cached):
    model = get_peft_model(
        copy.deepcopy(real_vit_cached), MemoryTokenConfig(m=1, num_labels=3, image_size=56, mode="masked")
    )
    model.add_adapter("other", MemoryTokenConfig(m=1, num_labels=3, image_size=98, mode="masked"))
    activate(model, ["default", "other"])
    with pytest.raises(InputError, match=r"different image sizes \[56, 98\]"):
        MemoryImageClassificationPipeline(model)


def test_stock_pipeline_names_the_active_adapters_classes_and_the_base_config_comes_back(tmp_path):
    from conftest import tiny_vit
    from transformers import ViTImageProcessor

    vit = tiny_vit()
    before = (dict(vit.config.id2label), dict(vit.config.label2id), vit.config.problem_type)
    model = get_peft_model(
        vit, MemoryTokenConfig(m=2, num_labels=3, label_names=NAMES, mode="masked"), adapter_name="animals"
    )
    model.add_adapter("digits", MemoryTokenConfig(m=1, num_labels=5, mode="masked"))
    randomise_task(model, "animals", 1)
    randomise_task(model, "digits", 2)
    model.eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    image = Image.new("RGB", (20, 24), (200, 30, 60))
    pixels = processor(image, return_tensors="pt")["pixel_values"]

    def stock_and_forward(task, k):
        """The stock pipeline's (label, score) top k, and the active adapter's own forward's."""
        result = pipeline("image-classification", model=model, image_processor=processor)(image, top_k=k)
        with torch.no_grad():
            scores = model(pixel_values=pixels).logits[0].softmax(-1)
        top = scores.topk(min(k, len(scores)))
        names = model.peft_config[task].class_names()
        return ranking(result), [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]

    model.set_adapter("animals")
    stock, forward = stock_and_forward("animals", 3)  # the base config's two default names would fail at class 2
    assert [label for label, _ in stock] == [label for label, _ in forward]
    assert {name for name, _ in stock} == set(NAMES)
    torch.testing.assert_close([p for _, p in stock], [p for _, p in forward], atol=1e-6, rtol=0)
    model.set_adapter("digits")
    stock, forward = stock_and_forward("digits", 10)  # top_k capped at the active head's 5 classes
    assert len(stock) == 5 and [label for label, _ in stock] == [label for label, _ in forward]
    assert model.config.label2id == {f"LABEL_{i}": i for i in range(5)}
    assert model.config.problem_type == "single_label_classification"
    for state in ("several", "disabled", "unloaded"):  # no one head: the base config's own fields, unchanged
        if state == "several":
            activate(model, ["animals", "digits"])
            described = (model.config.id2label, model.config.label2id, model.config.problem_type)
        elif state == "disabled":
            model.set_adapter("animals")
            with model.disable_adapter():
                described = (model.config.id2label, model.config.label2id, model.config.problem_type)
            assert model.config.id2label == dict(enumerate(NAMES))  # back on leaving the context
        else:
            base = model.unload()
            described = (base.config.id2label, base.config.label2id, base.config.problem_type)
        assert described == before, state
