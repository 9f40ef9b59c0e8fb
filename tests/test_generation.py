"""Generation tasks on decoders: the target-token loss, greedy decoding, BLEU/ROUGE-L/perplexity, the trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from seedtune.shared.task.config import ConfigError, ModelConfig, TaskConfig, load_config
from seedtune.shared.task.decoder import DecoderGenerator, LineEnd
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.tasks import Split, generation_metrics, load_split

E2E = "configs/e2e.toml"


@pytest.fixture(scope="module")
def generator():
    config = load_config([E2E], {"model.name": "tiny-decoder", "model.max_length": 48})
    return load_task_model(config.model, config.task)


def _split(n=6):
    records = [(f"name[Place {i}], food[{['Thai', 'Italian'][i % 2]}]",) for i in range(n)]
    targets = [f"Place {i} serves {['Thai', 'Italian'][i % 2]} food." + " It is nice." * (i % 3) for i in range(n)]
    return Split(records, np.zeros(n, dtype=np.int64), targets=targets)


def test_the_loss_is_the_mean_nll_of_the_target_tokens_whatever_the_batch_or_chunk(generator, monkeypatch):
    ids, prompt_lengths = generator.examples(_split())
    batch = generator.collate(ids, prompt_lengths)
    loss = generator.per_example_loss(batch)
    with torch.no_grad():
        logits = generator.module.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    reference = torch.stack([
        -torch.log_softmax(logits[i, p - 1:len(x) - 1], -1)[torch.arange(len(x) - p), torch.tensor(x[p:])].mean()
        for i, (x, p) in enumerate(zip(ids, prompt_lengths))])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    alone = torch.cat([generator.per_example_loss(generator.collate([x], prompt_lengths[i:i + 1]))
                       for i, x in enumerate(ids)])
    torch.testing.assert_close(loss, alone, rtol=1e-4, atol=1e-5)  # padding never leaks into a result
    monkeypatch.setattr(DecoderGenerator, "CHUNK", 7)  # a few target positions per vocabulary projection
    torch.testing.assert_close(generator.per_example_loss(batch), loss, rtol=1e-6, atol=1e-6)


def test_examples_end_the_target_with_eos_and_keep_the_prompt_tail_within_max_length(generator):
    long = Split([("name[" + "Very Long Place " * 30 + "]",)], np.zeros(1, dtype=np.int64),
                 targets=["A description " * 40])
    short = _split(1)
    ids, lengths = generator.examples(short)
    prompt = generator.encode(short.records)[0]
    assert ids[0][:lengths[0]] == prompt and ids[0][-1] == generator.eos_token_id
    (cut,), (cut_length,) = generator.examples(long)
    tail = generator.tokenizer(generator.prompter.tail, add_special_tokens=False)["input_ids"]
    assert len(cut) == generator.max_length and cut[cut_length - len(tail):cut_length] == tail
    assert cut_length >= generator.max_length // 2  # the target takes at most half


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(generator):
    prompts = generator.encode(_split(5).records)
    together = generator.generate(prompts, max_new_tokens=6, batch_size=5)
    alone = [generator.generate([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone and all(isinstance(t, str) for t in together)


def test_a_continuation_stops_once_a_newline_follows_text_and_keeps_that_first_line(generator):
    # token kinds (text, newline, text then newline): 0 blank, 1 "word", 2 "\n", 3 "word\n"
    stop = LineEnd(torch.tensor([[False, False, False], [True, False, False], [False, True, False],
                                 [True, True, True]]), width=2)
    prompt = [1, 1]  # the prompt's own text and newlines never count
    rows = torch.tensor([prompt + [1, 0, 2], prompt + [2, 0, 1], prompt + [0, 3, 0], prompt + [2, 2, 2]])
    assert stop(rows).tolist() == [True, False, True, False]  # a leading blank line is skipped, not the end
    kinds = LineEnd.token_kinds(generator.tokenizer)
    assert kinds.shape == (len(generator.tokenizer), 3) and kinds[:, 0].any()


def test_the_generation_loss_reuses_the_layers_below_the_trainable_set(generator):
    from seedtune.shared.engine.selection import select_patterns
    from seedtune.shared.engine.update import ScoredView

    view = ScoredView(generator, select_patterns(generator.module, ["*layers.1.mlp*"]))
    assert view.depth == 1  # the tiny decoder's layer 0 runs once per batch
    ids, prompt_lengths = generator.examples(_split())
    full = generator.per_example_loss(generator.collate(ids, prompt_lengths)).numpy()
    view.snapshot()
    try:
        np.testing.assert_allclose(view.per_example_loss(ids, prompt_lengths), full, rtol=1e-6, atol=1e-6)
        assert len(view._prefixes) == 1
    finally:
        view.restore()


def test_generation_metrics():
    refs = [["the cat sat on the mat", "a cat was on the mat"], ["dogs bark loudly at night"]]
    perfect = generation_metrics(["the cat sat on the mat", "dogs bark loudly at night"], refs, 2.0, 4)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["perplexity"] == pytest.approx(math.exp(0.5)) and perfect["references"] == 3
    worse = generation_metrics(["a mat", "cats meow"], refs, 2.0, 4)
    assert worse["bleu"] < 10 and 0 < worse["rouge_l"] < 50


def test_the_test_subset_keeps_every_reference_of_the_prompts_it_draws():
    split = Split([("a",), ("a",), ("b",), ("c",), ("c",), ("c",)], np.zeros(6, dtype=np.int64),
                  targets=list("uvwxyz"))
    sub = split.prompt_subset(2, seed=1)
    counts = {r: sub.records.count(r) for r in set(sub.records)}
    assert len(counts) == 2 and all(counts[r] == split.records.count(r) for r in counts)


def test_generation_config_errors_are_named():
    with pytest.raises(ConfigError, match="task.target_field must name the target column"):
        TaskConfig(kind="generation", labels=[], label_words=[], label_prompts=[]).validate()
    with pytest.raises(ConfigError, match="task.labels applies to classification"):
        TaskConfig(kind="generation", target_field="ref").validate()
    config = load_config([E2E])
    with pytest.raises(ConfigError, match="needs a decoder"):
        load_task_model(ModelConfig(name="tiny-encoder"), config.task)
    with pytest.raises(ConfigError, match="'dirichlet' skews labels"):
        load_config([E2E], {"federation.partition": "dirichlet"})
    from seedtune.shared.task.tasks import DataError

    bad = load_config([E2E], {"task.target_field": "reference"})
    with pytest.raises(DataError, match=r"no column 'reference' \(task.target_field\)"):
        load_split(bad, "test")


def test_seedtune_train_on_a_generation_task_reports_bleu_rouge_perplexity_and_replays(tmp_path):
    from seedtune.client.trainer import train
    from seedtune.server.replay import replay

    config = load_config([E2E], {"model.name": "tiny-decoder", "model.max_length": 48, "data.train_size": 300,
                                 "data.test_size": 4, "task.max_new_tokens": 4, "schedule.stage_steps": [3],
                                 "zo.batch_size": 8, "out_dir": str(tmp_path / "run")})
    summary = train(config, progress=False)
    for key in ("test_bleu", "test_rouge_l", "test_perplexity", "zero_shot_bleu", "zero_shot_perplexity"):
        assert math.isfinite(summary[key]), key
    assert summary["test_prompts"] == 4 and summary["test_perplexity"] != summary["zero_shot_perplexity"]
    assert summary["labels"] == [] and 2.9 < summary["epsilon"] <= 3.0
    assert replay(summary["ledger"], None)["model_digest"] == summary["model_digest"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["task"] == "e2e"


def test_onnx_export_refuses_a_generation_task(tmp_path):
    from seedtune.shared.task.onnx_format import OnnxModelError
    from seedtune.shared.engine.replica import Replica

    config = load_config([E2E], {"model.name": "tiny-decoder"})
    from seedtune.server.onnx_export import export_onnx

    with pytest.raises(OnnxModelError, match="generation task"):
        export_onnx(Replica(config), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_federation_trains_a_generation_task(tmp_path):
    from seedtune.server.federation import FederatedServer
    from seedtune.simulations.inprocess import InProcessGrid

    config = load_config([E2E], {"model.name": "tiny-decoder", "model.max_length": 48, "data.train_size": 200,
                                 "data.test_size": 3, "task.max_new_tokens": 3, "federation.rounds": 1,
                                 "federation.local_steps": 2, "federation.sample_rate": 0.2, "eval.every": 0,
                                 "privacy.noise_multiplier": 1.5, "out_dir": str(tmp_path / "run"), "threads": 1})
    summary = FederatedServer(config, InProcessGrid(2), tmp_path / "run").run()
    assert summary["ledger_entries"] == 2 and summary["clients_agree"]
    assert math.isfinite(summary["test_bleu"]) and math.isfinite(summary["zero_shot_test_perplexity"])
