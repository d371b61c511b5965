"""One output type per call: the stock ImageClassifierOutput for one adapter, a MultiTaskImageClassifierOutput for
several (return_dict honoured), hidden states and attention probabilities including the memory columns."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from helpers import TINY_PIXELS, assert_close_fp32, assert_identical, masked_model, randomise_task
from peft import get_peft_model
from transformers.modeling_outputs import ImageClassifierOutput

from memory_peft import MemoryTokenConfig, MultiTaskImageClassifierOutput, activate

PIXELS = TINY_PIXELS.double()
BASE_ROWS = 5  # tiny_vit: class token + 2 x 2 patches


def two_tasks():
    return activate(masked_model(tiny_vit(), [("a", 3, None), ("b", 2, [1])]).double(), ["a", "b"])


def test_one_adapter_gives_the_stock_output_and_its_tuple():
    model = masked_model(tiny_vit(), [("a", 3, None)]).double()
    labels = torch.tensor([0, 1, 4])
    output = model(pixel_values=PIXELS, labels=labels)
    assert type(output) is ImageClassifierOutput
    loss, logits = model(pixel_values=PIXELS, labels=labels, return_dict=False)
    assert_identical(logits, output.logits)
    assert_identical(loss, torch.nn.functional.cross_entropy(output.logits, labels))
    tasks = model.forward_tasks(pixel_values=PIXELS)  # the multi-task form for code that serves any number of tasks
    assert type(tasks) is MultiTaskImageClassifierOutput and list(tasks.tasks) == ["a"]
    assert_identical(tasks.tasks["a"].logits, output.logits)


def test_several_adapters_give_one_output_per_task_and_the_summed_loss():
    model = two_tasks()
    labels = {"a": torch.tensor([0, 1, 4]), "b": torch.tensor([2, 2, 3])}
    output = model(pixel_values=PIXELS, labels=labels)
    assert type(output) is MultiTaskImageClassifierOutput and list(output.tasks) == ["a", "b"]
    losses = [torch.nn.functional.cross_entropy(output.tasks[t].logits, labels[t]) for t in "ab"]
    assert_identical(output.tasks["a"].loss, losses[0])
    assert_identical(output.loss, losses[0] + losses[1])
    only_b = model(pixel_values=PIXELS, labels={"b": labels["b"]})
    assert only_b.tasks["a"].loss is None
    assert_identical(only_b.loss, losses[1])
    assert model(pixel_values=PIXELS).loss is None
    loss, (logits_a, logits_b) = model(pixel_values=PIXELS, labels=labels, return_dict=False)
    assert_identical(loss, output.loss)
    assert_identical(logits_b, output.tasks["b"].logits)
    with pytest.raises(KeyError, match=r"output.tasks\['a'\]"):
        output["a"]


def test_hidden_states_hold_the_base_models_rows_then_one_row_per_task():
    model = two_tasks()
    output = model(pixel_values=PIXELS, output_hidden_states=True)
    with model.disable_adapter():
        base = model(pixel_values=PIXELS, output_hidden_states=True)
    assert len(output.hidden_states) == len(base.hidden_states) == 3  # embeddings + 2 layers
    for ours, stock in zip(output.hidden_states, base.hidden_states):
        assert ours.shape == (3, BASE_ROWS + 2, 32)
        assert_identical(ours[:, :BASE_ROWS], stock)  # masking: the base rows are the base model's
    _, features = model.base_model.encode(PIXELS, ["a", "b"])
    assert_identical(model.base_model.model.layernorm(output.hidden_states[-1][:, BASE_ROWS:]), features)
    # training mode runs the base rows apart unless hidden states are asked for: same rows either way
    model.train()
    trained = model(pixel_values=PIXELS, output_hidden_states=True)
    assert_identical(trained.hidden_states[-1], output.hidden_states[-1])
    assert_identical(trained.tasks["b"].logits, output.tasks["b"].logits)


def test_attentions_show_what_each_row_reads_including_memory():
    model = two_tasks()
    output = model(pixel_values=PIXELS, output_attentions=True)
    plain = model(pixel_values=PIXELS)  # sdpa, the configured implementation
    model.base_model.model.set_attn_implementation("eager")  # the stock model returns probabilities with eager
    with model.disable_adapter():
        base = model(pixel_values=PIXELS, output_attentions=True)
    n, columns = BASE_ROWS, [BASE_ROWS + 2 + 3, BASE_ROWS + 2 + 3 + 2]  # b has memory in layer 1 only
    for layer, probabilities in enumerate(output.attentions):
        assert probabilities.shape == (3, 4, n + 2, columns[layer])
        assert_close_fp32(probabilities.sum(-1), torch.ones(3, 4, n + 2, dtype=torch.float64))
        assert_close_fp32(probabilities[:, :, :n, :n], base.attentions[layer])  # base rows read base columns only
        assert probabilities[:, :, :n, n:].abs().max() == 0
        task_a, task_b = probabilities[:, :, n], probabilities[:, :, n + 1]
        assert task_a[..., n + 1].abs().max() == 0 and task_b[..., n].abs().max() == 0  # not the other class token
        assert task_a[..., n + 2 : n + 5].sum(-1).min() > 0  # a reads its memory
        if layer == 1:
            assert task_a[..., n + 5 :].abs().max() == 0 and task_b[..., n + 2 : n + 5].abs().max() == 0
            assert task_b[..., n + 5 :].sum(-1).min() > 0
    # the probabilities' forward (eager) predicts as the configured implementation does
    assert_close_fp32(output.tasks["b"].logits, plain.tasks["b"].logits)


def test_full_attention_probabilities_equal_the_plain_softmax_over_tokens_and_memory():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=3, num_labels=5, mode="full", init_std=0.5))
    randomise_task(model, "default", 1)
    output = model.double().eval()(pixel_values=PIXELS, output_attentions=True, output_hidden_states=True)
    assert [tuple(p.shape) for p in output.attentions] == [(3, 4, BASE_ROWS, BASE_ROWS + 3)] * 2
    for layer, (x, probabilities) in enumerate(zip(output.hidden_states, output.attentions)):
        wrapped = model.base_model.model.layers[layer]
        stock, memory = wrapped.base_layer, wrapped.memory_tokens["default"].double()
        normed = stock.layernorm_before(torch.cat([x, memory.expand(3, -1, -1)], 1))
        q = stock.attention.q_proj(normed[:, :BASE_ROWS]).view(3, BASE_ROWS, 4, 8).transpose(1, 2)
        k = stock.attention.k_proj(normed).view(3, BASE_ROWS + 3, 4, 8).transpose(1, 2)
        expected = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
        assert_close_fp32(probabilities, expected)
