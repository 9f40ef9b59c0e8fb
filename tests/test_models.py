import pytest
import torch

from seedtune.shared.task.config import DataConfig, ModelConfig, RunConfig
from seedtune.shared.task.loading import ModelLoadError, load_task_model
from seedtune.shared.task.tasks import load_split
from tests.helpers import LABELS, SENTENCES


def test_per_example_losses_do_not_depend_on_batching(tiny_task):
    ids = tiny_task.encode(SENTENCES)
    together = tiny_task.per_example_loss(tiny_task.collate(ids, LABELS))
    alone = torch.cat([tiny_task.per_example_loss(tiny_task.collate([x], LABELS[i : i + 1]))
                       for i, x in enumerate(ids)])
    assert together.shape == (len(SENTENCES),) and torch.isfinite(together).all()
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # padding never leaks into a result


def test_accuracy_is_computed_over_all_examples(tiny_task):
    ids = tiny_task.encode(SENTENCES)
    preds = tiny_task.logits(tiny_task.collate(ids, LABELS)).argmax(-1).numpy()
    assert tiny_task.accuracy(ids, LABELS, batch_size=4) == pytest.approx(float((preds == LABELS).mean()))
    with pytest.raises(ValueError, match="empty"):
        tiny_task.accuracy([], LABELS[:0])


def test_decoder_prompt_keeps_its_tail_when_truncated(tiny_decoder):
    tiny_decoder.max_length = 12
    ids = tiny_decoder.encode(["word " * 50])[0]
    tail = tiny_decoder.tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 12 and ids[-len(tail):] == tail


def test_synflow_output_depends_on_weights_only(tiny_task):
    a, b = tiny_task.synflow_output(), tiny_task.synflow_output()
    assert torch.isfinite(a) and a.item() == b.item()


def test_unknown_model_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="packaged model"):
        load_task_model(ModelConfig(name=str(tmp_path / "no-such-model")))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_packaged_models_beat_chance_zero_shot(name):
    task = load_task_model(ModelConfig(name=name))
    test = load_split(RunConfig(data=DataConfig(test_size=200)), "test")
    assert task.accuracy(task.encode(test.records), test.labels) > 0.6
