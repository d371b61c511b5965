"""A new user's first day: no silent defaults or ignored input in the library, and the stock transformers pipeline
either gives the adapter's answer or refuses in one line. The network-down paths: test_network_down.py."""

import copy
import warnings
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, tiny_vit
from helpers import randomise_task
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from memory_peft import MemoryTokenConfig, activate
from memory_peft.tuner.errors import InputError

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8
)


def tiny_classifier(**config) -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**TINY, **config)).eval()


# --- the number of classes -----------------------------------------------------------------------------------------
def test_a_bare_backbone_asks_for_the_number_of_classes():
    with pytest.raises(
        InputError,
        match=r"Adapter 'default' needs its number of classes: pass "
        r"MemoryTokenConfig\(num_labels=\.\.\.\) or label_names",
    ):
        get_peft_model(tiny_vit(), MemoryTokenConfig(m=2))


def test_label_names_imply_the_number_of_classes():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, label_names=["cat", "dog", "ship"]))
    assert model.peft_config["default"].num_labels == 3
    assert model(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 3)
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "ship"}


def test_a_classification_model_gives_its_class_count_and_names():
    names = [f"class {i}" for i in range(10)]
    base = tiny_classifier(num_labels=10, id2label=dict(enumerate(names)))
    model = get_peft_model(base, MemoryTokenConfig(m=2, mode="masked"))
    assert model.peft_config["default"].num_labels == 10 and model.peft_config["default"].label_names == names
    assert model(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 10)
    # a second adapter reads the model's own head, not the first adapter's (which the config now describes)
    model.add_adapter("other", MemoryTokenConfig(m=2, mode="masked"))
    assert model.peft_config["other"].num_labels == 10
    unnamed = get_peft_model(tiny_classifier(num_labels=4), MemoryTokenConfig(m=2))
    assert unnamed.peft_config["default"].num_labels == 4
    assert unnamed.peft_config["default"].label_names is None  # LABEL_0... are placeholders, not the task's names


def test_a_class_count_that_contradicts_the_models_head_is_an_error(tmp_path):
    with pytest.raises(InputError, match=r"num_labels=3, but the base model's classification head has 10"):
        get_peft_model(tiny_classifier(num_labels=10), MemoryTokenConfig(m=2, num_labels=3))
    # an adapter saved earlier brings its own head: it loads onto a classifier of another count (its head is used)
    from peft import PeftModel

    trained = get_peft_model(tiny_classifier(num_labels=4), MemoryTokenConfig(m=2))
    trained.save_pretrained(tmp_path / "four")
    loaded = PeftModel.from_pretrained(tiny_classifier(num_labels=10), tmp_path / "four")
    assert loaded(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 4)
    with pytest.raises(InputError, match=r"label_names has 2 names for num_labels=3"):
        MemoryTokenConfig(m=2, num_labels=3, label_names=["a", "b"])


# --- labels and top-K ----------------------------------------------------------------------------------------------
def test_labels_for_adapters_that_are_not_active_are_an_error():
    pixels, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=2, mode="masked"))
    with pytest.raises(
        InputError,
        match=r"labels for \['cifar'\], which are not active adapters: the active ones "
        r"are \['default'\]",
    ):
        model(pixel_values=pixels, labels={"cifar": y})
    assert model(pixel_values=pixels, labels={"default": y}).loss is not None
    model.add_adapter("fashion", MemoryTokenConfig(m=2, num_labels=2, mode="masked"))
    activate(model, ["default", "fashion"])
    with pytest.raises(InputError, match=r"labels for \['fashon'\].*active ones are \['default', 'fashion'\]"):
        model(pixel_values=pixels, labels={"default": y, "fashon": y})


@pytest.mark.parametrize("m, top_k", [(5, 5), (5, 7), (0, 1)])
def test_top_k_that_would_keep_every_memory_entry_is_refused(m, top_k):
    with pytest.raises(InputError, match=rf"top_k={top_k} with m={m}: each query would read all {m} memory entries"):
        MemoryTokenConfig(m=m, num_labels=2, top_k=top_k)
    assert MemoryTokenConfig(m=5, num_labels=2, top_k=4).top_k == 4


# --- image sizes and transformers' stock "image-classification" pipeline ------------------------------------------
def trained_at(size: int, seed: int = 0, mode: str = "masked", num_labels: int = 5):
    model = get_peft_model(
        tiny_vit(), MemoryTokenConfig(m=2, num_labels=num_labels, mode=mode, image_size=size, init_std=0.5)
    )
    randomise_task(model, "default", seed)
    return model.eval()


def images(count: int = 3):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(20, 20, 3, generator=generator) * 255).byte().numpy()) for _ in range(count)]


@contextmanager
def size_warnings():
    """The input-size warnings raised inside the block (other libraries' warnings aside)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said = []
        yield said
    said += [w for w in caught if "were trained at" in str(w.message)]


def test_the_stock_pipeline_runs_an_adapter_at_the_size_its_processor_gives():
    from transformers import pipeline

    model = trained_at(24)  # the base config says 16 px; the adapter was trained at 24 px
    processor = ViTImageProcessor(size={"height": 24, "width": 24})
    classify = pipeline("image-classification", model=model, image_processor=processor)
    with size_warnings() as said:
        answers = classify(images(), top_k=5)
    assert not said  # at the training size
    pixels = processor(images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels, interpolate_pos_encoding=True).logits.softmax(-1)
    for answer, scores in zip(answers, expected):
        assert [a["label"] for a in answer] == [f"LABEL_{int(i)}" for i in scores.argsort(descending=True)]
        torch.testing.assert_close(
            torch.tensor([a["score"] for a in answer]), scores.sort(descending=True).values, atol=1e-5, rtol=0
        )
    with pytest.raises(InputError, match=r"differs from the backbone's 16x16: pass interpolate_pos_encoding=True"):
        model(pixel_values=pixels, interpolate_pos_encoding=False)  # asked not to interpolate: not overridden


def test_another_input_size_than_the_training_size_warns_once_per_model_and_size():
    model = trained_at(24)
    with pytest.warns(UserWarning, match=r"Images of 16x16 px, but adapter\(s\) \['default'\] were trained at 24 px"):
        model(pixel_values=torch.randn(1, 3, 16, 16))
    with size_warnings() as said:
        model(pixel_values=torch.randn(1, 3, 16, 16))  # said once for this size
        model(pixel_values=torch.randn(1, 3, 24, 24))  # the training size
    assert not said
    with pytest.warns(UserWarning, match=r"Images of 32x32 px"):
        model(pixel_values=torch.randn(1, 3, 32, 32))
    with size_warnings() as said:
        get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=2)).eval()(pixel_values=torch.randn(1, 3, 32, 32))
    assert not said  # no recorded training size: nothing to compare with


def test_several_tasks_in_the_stock_pipeline_fail_as_transformers_fails_and_the_docs_name_the_memory_pipeline():
    from transformers import pipeline

    model = trained_at(16)
    model.add_adapter("other", MemoryTokenConfig(m=2, num_labels=3, mode="masked", image_size=16))
    activate(model, ["default", "other"])
    classify = pipeline(
        "image-classification", model=model, image_processor=ViTImageProcessor(size={"height": 16, "width": 16})
    )
    with pytest.raises(KeyError) as error:  # a single-task consumer reads one "logits": there is one per task
        classify(images(1))
    assert str(error.value) == "'logits'"
    troubleshooting = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert "KeyError: 'logits'" in troubleshooting and 'pipeline("memory-image-classification"' in troubleshooting
    # the memory pipeline serves the same model, every task from one forward
    from memory_peft.pipelines import MemoryImageClassificationPipeline

    served = MemoryImageClassificationPipeline(copy.deepcopy(model), image_processor=ViTImageProcessor())
    answer = served(images(1)[0])
    assert set(answer) == {"default", "other"} and len(answer["other"]) == 3
