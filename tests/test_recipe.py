"""The recipe (memory_peft.recipe): one LR by default, the heads' own LR when asked, SGD or AdamW, refusals."""

import pytest
import torch
from conftest import tiny_vit
from helpers import TINY_PIXELS
from peft import get_peft_model
from torch import nn

from memory_peft import MemoryTokenConfig
from memory_peft.recipe import paper_recipe
from memory_peft.tuner.errors import InputError


def memory_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked", num_labels=3)).double()
    nn.init.normal_(model.base_model.memory_head["default"].weight, std=0.5)  # a head that passes gradient
    return model


def one_step(model, lr, head_lr):
    trainable, optimizer, scheduler = paper_recipe(model, lr, warmup_steps=0, total_steps=10, head_lr=head_lr)
    model(pixel_values=TINY_PIXELS.double(), labels=torch.tensor([0, 1, 2])).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}, scheduler


def test_one_lr_unless_the_head_gets_its_own():
    steps, scheduler = one_step(memory_model(), 0.01, None)
    assert scheduler.get_last_lr() == [0.01]
    same, _ = one_step(memory_model(), 0.01, 0.01)
    for name in steps:  # head_lr equal to lr: the same first step, exactly
        assert torch.equal(steps[name], same[name])
    scaled, scheduler = one_step(memory_model(), 0.01, 1.0)
    assert scheduler.get_last_lr() == [0.01, 1.0]
    for name, step in steps.items():  # first SGD step = -lr * gradient: the head's is 100 x, the rest unchanged
        expected = step * 100 if "memory_head" in name else step
        assert torch.allclose(scaled[name], expected, rtol=1e-9, atol=1e-15), name  # steps read as differences
    assert any("memory_head" in name for name in steps) and any("memory_tokens" in name for name in steps)


def test_head_lr_without_a_task_head_is_refused():
    with pytest.raises(InputError, match="no trainable task head"):
        paper_recipe(nn.Linear(4, 2), 0.01, 0, 10, head_lr=1.0)
    with pytest.raises(InputError, match=r"no trainable class token \(memory_class_token\).*Leave class_token_lr out"):
        paper_recipe(nn.Linear(4, 2), 0.01, 0, 10, class_token_lr=0.001)


def test_the_class_token_gets_its_own_lr_beside_the_head_and_the_rest():
    """class_token_lr: the class token's first SGD step scales with it, the head's with head_lr, the memory's with lr;
    one group per LR, every trained parameter in exactly one."""
    model = memory_model()
    trainable, optimizer, scheduler = paper_recipe(model, 0.01, 0, 10, head_lr=1.0, class_token_lr=0.001)
    assert scheduler.get_last_lr() == [0.01, 1.0, 0.001]
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainable)
    model(pixel_values=TINY_PIXELS.double(), labels=torch.tensor([0, 1, 2])).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = 1.0 if "memory_head" in name else 0.001 if "memory_class_token" in name else 0.01
            torch.testing.assert_close(p.detach() - before[name], -lr * grads[name], rtol=1e-9, atol=1e-15)
    assert any("memory_class_token" in name for name in grads) and any("memory_tokens" in name for name in grads)


def test_adamw_takes_steps_of_the_lr_whatever_the_gradient_scale():
    """AdamW's first step is lr * sign(gradient) (bias-corrected moments, epsilon aside) on every trained entry with a
    gradient: its steps do not scale with the gradient as SGD's do, which is why it wants its own LR grid."""
    model = memory_model()
    trainable, optimizer, _ = paper_recipe(model, 0.01, warmup_steps=0, total_steps=10, optimizer="adamw")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.0
    model(pixel_values=TINY_PIXELS.double(), labels=torch.tensor([0, 1, 2])).loss.backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            start, grad = before[name]
            moved = (p.detach() - start)[grad.abs() > 1e-6]
            torch.testing.assert_close(moved, -0.01 * grad[grad.abs() > 1e-6].sign(), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"Unknown optimizer 'adam'; choose one of \('sgd', 'adamw'\)"):
        paper_recipe(model, 0.01, 0, 10, optimizer="adam")


def test_the_training_script_takes_the_optimizer_and_its_default_lr():
    from memory_peft.recipe import DEFAULT_LR
    from memory_peft.training import parse_args

    assert (parse_args([]).optimizer, parse_args([]).lr) == ("adamw", DEFAULT_LR["adamw"]) == ("adamw", 0.003)
    assert parse_args(["--optimizer", "sgd"]).lr == DEFAULT_LR["sgd"]
    assert (parse_args(["--optimizer", "adamw"]).lr, parse_args(["--optimizer", "adamw", "--lr", "0.02"]).lr) == (
        DEFAULT_LR["adamw"],
        0.02,
    )


def test_an_sgd_sized_lr_with_adamw_warns_in_one_line_and_sgd_does_not():
    import warnings

    from memory_peft.training import parse_args

    def warnings_of(argv):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parse_args(argv)
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    [message] = warnings_of(["--lr", "0.1"])  # AdamW, the default, at the paper's SGD LR
    assert message.startswith("--lr 0.1 with AdamW (the default optimizer) is an SGD-sized LR")
    assert message.endswith("For the paper's SGD pass --optimizer sgd.") and "\n" not in message
    assert warnings_of(["--optimizer", "sgd", "--lr", "0.1"]) == []
    assert warnings_of(["--lr", "0.01"]) == []
