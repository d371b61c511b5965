"""transformers.Trainer trains a memory adapter and checkpoints it; torch.compile gives the same logits."""

import math
import shutil

import pytest
import torch
from conftest import tiny_vit
from peft import PeftModel, get_peft_model

from memory_peft import MemoryTokenConfig


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=16, labels=3):
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % labels
        self.pixels = torch.randn(n, 3, 16, 16, generator=generator)
        self.pixels[:, 0] += 1.5 * self.labels[:, None, None]  # learnable: the class shows in the red channel

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def test_trainer_trains_and_checkpoints_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked", num_labels=3))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = RandomImages()

    def dataset_loss():
        with torch.no_grad():
            return model(pixel_values=data.pixels, labels=data.labels).loss.item()

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        save_steps=16,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert result.global_step == 16 and len(losses) == 16
    assert losses[0] == pytest.approx(math.log(3), abs=1e-4)  # zero-initialised head: uniform prediction
    assert dataset_loss() < 0.9 * math.log(3)  # it learned
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    checkpoint = tmp_path / "checkpoint-16"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    pixels = RandomImages().pixels[:5]
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny_vit(), checkpoint).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_torch_compile_gives_the_same_logits():
    """~35 s on 2 CPU cores, mostly compilation."""
    from memory_peft import activate

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=3, mode="masked", num_labels=4, init_std=0.5))
    model.add_adapter("second", MemoryTokenConfig(m=2, mode="masked", num_labels=5, init_std=0.5))
    activate(model.eval(), ["default", "second"])
    pixels = RandomImages().pixels[:4]
    with torch.no_grad():
        eager = model(pixel_values=pixels)
        compiled = torch.compile(model)(pixel_values=pixels)
    for task in ("default", "second"):
        torch.testing.assert_close(compiled.tasks[task].logits, eager.tasks[task].logits, atol=1e-5, rtol=1e-5)


def test_trainer_evaluates_restores_the_best_adapter_and_resumes_exactly(tmp_path):
    """A ViTModel's forward takes no labels, and Trainer picks its label names from the base model's class: with
    ``label_names=["labels"]`` (README) evaluation reports the model's own loss and metrics, ``load_best_model_at_end``
    brings back the chosen checkpoint's adapter, and a run resumed from a checkpoint ends with the same weights."""
    import numpy as np
    from transformers import Trainer, TrainingArguments

    train, held_out = RandomImages(), RandomImages(n=9)

    def trainer(folder, **extra):
        model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked", num_labels=3))
        args = TrainingArguments(
            output_dir=str(folder),
            max_steps=8,
            per_device_train_batch_size=4,
            learning_rate=0.05,
            save_steps=4,
            report_to=[],
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            lr_scheduler_type="constant",
            label_names=["labels"],
            **extra,
        )
        return Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        )

    def own_loss_and_accuracy(model):
        with torch.no_grad():
            output = model.eval()(pixel_values=held_out.pixels, labels=held_out.labels)
        return output.loss.item(), (output.logits.argmax(-1) == held_out.labels).float().mean().item()

    # the worse checkpoint counts as best (greater loss "is better"), so restoring it is visible
    best = trainer(
        tmp_path / "best",
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    best.train()
    evaluations = [log for log in best.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evaluations] == [4, 8] and evaluations[0]["eval_loss"] > evaluations[1]["eval_loss"]
    assert best.state.best_model_checkpoint == str(tmp_path / "best" / "checkpoint-4")
    restored = PeftModel.from_pretrained(tiny_vit(), tmp_path / "best" / "checkpoint-4")
    loss, accuracy = own_loss_and_accuracy(best.model)
    assert (loss, accuracy) == own_loss_and_accuracy(restored)
    metrics = best.evaluate()
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5) and metrics["eval_accuracy"] == pytest.approx(accuracy)

    straight = trainer(tmp_path / "resume")
    straight.train()
    resumed = trainer(tmp_path / "resume")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resume" / "checkpoint-4"))
    trained = {name: p for name, p in straight.model.named_parameters() if p.requires_grad}
    assert len(trained) == 5  # 2 layers' memory, the class token, the head's weight and bias
    for name, parameter in resumed.model.named_parameters():
        if name in trained:
            assert torch.equal(parameter, trained[name]), name
