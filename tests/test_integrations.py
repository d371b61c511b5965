"""transformers.Trainer trains a memory adapter and checkpoints it; torch.compile gives the same logits."""

import math
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import tiny_vit
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

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=4, learning_rate=0.01,
                             save_steps=16, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, lr_scheduler_type="constant")
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
