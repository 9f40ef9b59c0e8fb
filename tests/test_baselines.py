"""First-order baselines (Opacus ghost clipping, LoRA, plain finetuning), the Flower FedAvg baseline and the
utility benchmark, on tiny random models."""

from __future__ import annotations

import json
from dataclasses import replace
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seedtune.client.baselines.dpsgd import FirstOrderLearner, train_first_order
from seedtune.shared.privacy.accounting import (PrivacyAccountant, StepRun, calibrate_noise_multiplier, noise_epsilon,
                                                pld_epsilon)
from seedtune.shared.task.config import DataConfig, ModelConfig
from seedtune.shared.task.first_order import FirstOrderConfig, poisson_rate, prepare_trainable, trainable_state
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.privacy.noise import Noise, SecureRandom
from tests.helpers import LABELS, SENTENCES


def _config(name: str = "tiny-decoder", **extra) -> FirstOrderConfig:
    base = dict(model=ModelConfig(name=name), data=DataConfig(train_size=300, test_size=32), steps=4,
                batch_size=16, lr=1e-2, noise_multiplier=1.0, threads=1)
    return FirstOrderConfig(**{**base, **extra}).validate()


def _learner(name: str, config: FirstOrderConfig, lora: int = 0) -> FirstOrderLearner:
    task = load_task_model(ModelConfig(name=name))
    prepare_trainable(task, lora, 16.0)
    ids = task.encode(SENTENCES * 4)
    return FirstOrderLearner(task, ids, np.tile(LABELS, 4), config, config.steps)


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_ghost_clipping_changes_the_trainable_weights_only(name):
    learner = _learner(name, _config(name, batch_size=8))
    before = {k: v.clone() for k, v in learner.task.module.state_dict().items()}
    frozen = {k for k, p in learner.task.module.named_parameters() if not p.requires_grad}
    assert frozen and all("embed" in k for k in frozen)  # the embedding tables, nothing else
    for _ in range(3):
        learner.step()
    after = learner.task.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not changed & frozen


def test_dpsgd_noise_comes_from_the_csprng_not_a_seeded_torch_generator(monkeypatch):
    """Two learners on the same batch, with torch seeded alike, still get different noise."""
    monkeypatch.setattr(SecureRandom, "poisson_sample", lambda self, population, rate: np.arange(8))
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        learner = _learner("tiny-encoder", _config("tiny-encoder", batch_size=8))
        learner.step()
        grads.append(torch.cat([p.grad.flatten() for p in learner.optimizer.params]))
    assert not torch.equal(grads[0], grads[1])


def test_dpsgd_poisson_batches_come_from_the_csprng(monkeypatch):
    """Issue 32: Opacus' sampler drew the batches from a torch generator (a Mersenne Twister, whose outputs give
    its state away); every batch is now a SecureRandom Poisson sample at the accounted rate."""
    drawn = []
    real = SecureRandom.poisson_sample

    def spy(self, population, rate):
        drawn.append((population, rate, real(self, population, rate)))
        return drawn[-1][2]

    monkeypatch.setattr(SecureRandom, "poisson_sample", spy)
    learner = _learner("tiny-encoder", _config("tiny-encoder", batch_size=8))
    for _ in range(3):
        learner.step()
    assert len(drawn) == 3 and all(rate == learner.sample_rate for _, rate, _ in drawn)
    assert {population for population, _, _ in drawn} == {len(learner.ids)}


def test_ghost_clipping_sums_per_example_clipped_gradients(tiny_decoder):
    """Opacus' two-pass ghost clipping on our model equals clipping brute-force per-example gradients
    (LlamaRMSNorm included), so the privacy analysis' sensitivity C holds for what we train."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    task = tiny_decoder
    prepare_trainable(task, 0, 16.0)
    params = [p for p in task.module.parameters() if p.requires_grad]
    batch = task.collate(task.encode(SENTENCES), LABELS)
    clip = 0.05
    expected = [torch.zeros_like(p) for p in params]
    task.module.train()
    for i in range(len(LABELS)):
        logits = task.module(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1])
        grads = torch.autograd.grad(F.cross_entropy(logits, batch.labels[i:i + 1]), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        assert norm > clip  # every example is clipped, so the test sees the clipping
        for e, g in zip(expected, grads):
            e += g * min(1.0, clip / (float(norm) + 1e-6))
    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=6)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, _ = engine.make_private(
        module=task.module, optimizer=torch.optim.SGD(params, lr=0.0), criterion=torch.nn.CrossEntropyLoss(),
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode="ghost")
    criterion(model(batch.input_ids, batch.attention_mask), batch.labels).backward()
    for e, p in zip(expected, params):  # the clipped sum; the optimizer divides by the expected batch at step()
        torch.testing.assert_close(p.grad, e, rtol=1e-3, atol=1e-7)


def test_reported_epsilon_is_our_pld_accountant_and_calibration_round_trips():
    rate = poisson_rate(300, 16)
    assert rate == 1 / 19  # Opacus' Poisson rate: one over the plain loader's batch count
    sigma = calibrate_noise_multiplier(3.0, 1e-5, rate, 4)
    summary = train_first_order(_config(noise_multiplier=0.0, epsilon=3.0))
    assert summary["noise_multiplier"] == pytest.approx(sigma)
    assert summary["sample_rate"] == rate
    accountant = PrivacyAccountant()
    accountant.record(Noise.gaussian(sigma), rate, 4)
    assert summary["epsilon"] == pytest.approx(accountant.epsilon(1e-5))
    assert summary["epsilon"] == noise_epsilon((StepRun(Noise.gaussian(sigma), rate, 4),), 1e-5)
    assert 2.9 < summary["epsilon"] <= 3.0 + 1e-9
    assert summary["opacus_rdp_epsilon"] >= summary["epsilon"]  # Opacus' RDP: looser, a cross-check only
    import dp_accounting
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(sigma)), 4)
    assert pld_epsilon(event, 1e-5) == pytest.approx(summary["epsilon"], rel=1e-6)


def test_non_private_mode_finetunes_without_epsilon():
    summary = train_first_order(_config("tiny-encoder", private=False))
    assert summary["method"] == "finetune" and summary["epsilon"] is None and summary["noise_multiplier"] == 0.0
    assert summary["opacus_rdp_epsilon"] is None and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["train_s"] > 0 and summary["trainable_params"] > 0


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_lora_variant_trains_only_lora_parameters(name):
    learner = _learner(name, _config(name, batch_size=8, lora_rank=4), lora=4)
    module = learner.task.module
    trainable = {k for k, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for _ in range(3):
        learner.step()
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert set(trainable_state(module)) == trainable


def test_fedavg_on_flower_runs_two_rounds_and_reports_bytes(tmp_path):
    from seedtune.shared.task.first_order import FedAvgConfig
    from seedtune.simulations.fedavg import run_fedavg

    config = FedAvgConfig(learner=_config("tiny-encoder", data=DataConfig(train_size=200, test_size=32),
                                          batch_size=8), rounds=2, local_steps=2, num_clients=2,
                          out_dir=str(tmp_path))
    pythonpath, path = os.environ.get("PYTHONPATH"), list(sys.path)
    summary = run_fedavg(config)
    # Flower's Ray backend sets PYTHONPATH to the driver's sys.path: a caller's later subprocesses must not
    # inherit it (issue 36: a fresh venv then imported this checkout instead of the wheel under test). The rest
    # of the environment: tests/conftest.py's check after every test.
    assert os.environ.get("PYTHONPATH") == pythonpath and sys.path == path
    assert summary["rounds"] == 2 and summary["clients"] == 2 and len(summary["rounds_log"]) == 2
    assert all(r["replies"] == 2 for r in summary["rounds_log"])
    # The uplink carries every trainable float32 (plus a small envelope): what DP-ZO's scalars replace.
    assert 4 * summary["trainable_params"] < summary["bytes_up_per_client_round"] < \
        4 * summary["trainable_params"] + 64 * 1024
    expected = noise_epsilon((StepRun(Noise.gaussian(1.0), poisson_rate(100, 8), 4),), 1e-5)
    assert summary["epsilon_max"] == pytest.approx(expected)


@pytest.mark.slow  # a multi-minute integration run on CI (four subprocess rows); run with -m slow
def test_bench_utility_quick_rows_are_well_formed(tmp_path, capsys):
    from seedtune.simulations.bench_utility import ROW_FIELDS, main

    out = tmp_path / "utility"
    assert main(["--json", "--mode", "quick", "--models", "tiny-encoder", "--out", str(out), "--jobs", "2",
                 "--methods", "zero-shot", "dpzo", "dpsgd", "fed-dpzo", "--epsilons", "3"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(printed) == 4
    for row in rows:
        assert set(ROW_FIELDS) <= set(row), set(ROW_FIELDS) - set(row)
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["peak_rss_mb"] > 0
        if row["method"] in ("dpzo", "dpsgd"):
            assert row["epsilon_spent"] <= row["epsilon_target"] + 1e-9 and row["s_per_step"] > 0
        if row["method"] == "fed-dpzo":
            assert 0 < row["bytes_per_client_round"] <= 16 * row["steps"] + 1024
    assert {r["method"] for r in rows} == {"zero-shot", "dpzo", "dpsgd", "fed-dpzo"}
    assert all(r["train_peak_rss_mb"] <= r["peak_rss_mb"] for r in rows if r["method"] in ("dpzo", "dpsgd"))
    kept = sorted(p.name for p in (out / "rows.d").glob("*.json"))  # each row also on its own (for --resume)
    assert kept == sorted(f"{r['model']}-{r['method']}-{r['epsilon_target']}-{r['steps']}.json" for r in rows)
    table = (out / "table.md").read_text()
    assert table.count("| tiny-encoder |") == len(rows) and "| tiny-encoder | dpzo |" in table
    assert "DP-ZO peak RSS / DP-SGD peak RSS" in table and "uplink per client per round" not in table
    assert (out / "plot.png").stat().st_size > 1000


def test_bench_utility_never_rewrites_rows_it_was_not_asked_to(tmp_path, capsys):
    """Issue 34: `bench_utility --mode quick` wrote to results/utility by default and deleted the committed rows
    there before running. Now its default is a new runs/ folder, and a folder holding rows is refused unless
    --resume, --report-only or --overwrite says what to do with them."""
    from seedtune.simulations.bench_utility import main

    out = tmp_path / "utility"
    (out / "rows.d").mkdir(parents=True)
    (out / "rows.jsonl").write_text('{"kept": true}\n')
    (out / "rows.d" / "x.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        main(["--mode", "quick", "--models", "tiny-encoder", "--methods", "zero-shot", "--out", str(out)])
    assert stop.value.code == 2 and "already holds rows" in capsys.readouterr().err
    assert (out / "rows.jsonl").read_text() == '{"kept": true}\n' and (out / "rows.d" / "x.json").exists()


def test_a_probe_row_of_other_draws_is_another_row():
    """A resumed bench with another --probe-draws must run its rows, not keep the old ones: the mean of ten
    draws is not the one draw a kept row holds (one-draw rows keep their old key, so old row files resume)."""
    from seedtune.simulations.bench_utility import RowSpec, row_key

    one = RowSpec("minilm", "dp-probe", 3.0, 1000, "full", 2, task="trec")
    assert one.key == row_key("trec", "minilm", "dp-probe", 3.0, 1000) == "minilm/dp-probe/3.0/1000/trec"
    assert replace(one, draws=10).key == "minilm/dp-probe/3.0/1000/trec/x10" != one.key


# --------------------------------------------------------------------------------------- linear probes
def test_head_scores_of_the_features_are_the_logits(tiny_task):
    """A linear probe and a step that trains only the head read ``features``: their scores are the model's own."""
    batch = tiny_task.collate(tiny_task.encode(SENTENCES[:6]), LABELS[:6])
    features = tiny_task.features(batch)
    assert features.dtype == torch.float32 and features.shape[0] == 6
    assert torch.equal(tiny_task.head_scores(features), tiny_task.logits(batch))
    in_order = tiny_task.all_features(tiny_task.encode(SENTENCES[:6]), batch_size=4)
    torch.testing.assert_close(in_order, features, rtol=1e-5, atol=1e-5)  # other batches: other padding


def test_probe_clips_each_examples_exact_gradient():
    """The closed-form clipped sum equals autograd's per-example gradients, each clipped to C, summed: the
    norm ``|p - e_y| |x|`` of the outer product is exact, so no example escapes the clip."""
    from seedtune.client.baselines.probe import clipped_gradient_sum, probe_inputs

    gen = torch.Generator().manual_seed(0)
    inputs = probe_inputs(torch.randn(12, 7, generator=gen))
    labels = torch.randint(0, 3, (12,), generator=gen)
    weight = 3 * torch.randn(3, 8, generator=gen)
    for clip in (0.05, 0.5, None):
        expected = torch.zeros_like(weight)
        for x, y in zip(inputs, labels):
            w = weight.clone().requires_grad_(True)
            F.cross_entropy((x @ w.T)[None], y[None]).backward()
            g = w.grad
            expected += g if clip is None else g * min(1.0, clip / float(g.norm()))
        torch.testing.assert_close(clipped_gradient_sum(weight, inputs, labels, clip), expected, rtol=1e-5,
                                   atol=1e-6)
    assert torch.equal(clipped_gradient_sum(weight, inputs[:0], labels[:0], 1.0), torch.zeros_like(weight))


def test_dp_probe_noise_and_batches_come_from_the_csprng(monkeypatch):
    """Seeding every generator a user might seed changes nothing: the noise and the Poisson batches are the
    CSPRNG's (a ChaCha20 keystream keyed from os.urandom), so two runs from the same seeds differ."""
    from seedtune.client.baselines.probe import ProbeLearner, probe_inputs

    inputs = probe_inputs(torch.randn(50, 5))
    labels = np.arange(50) % 2
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        learner = ProbeLearner(inputs, labels, 2, _config("tiny-encoder", probe=True, optimizer="sgd",
                                                         batch_size=10))
        learner.step()
        weights.append(learner.weight.detach().clone())
    assert not torch.equal(weights[0], weights[1])
    drawn: list[int] = []
    real = SecureRandom._bytes
    monkeypatch.setattr(SecureRandom, "_bytes", lambda self, n: drawn.append(n) or real(self, n))
    learner.step()
    assert sum(drawn) >= 8 * (50 + learner.weight.numel())  # a uniform per record, a normal per head entry


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_dp_probe_reports_our_pld_epsilon_and_the_plain_probe_learns(name):
    from seedtune.client.baselines.probe import train_probe

    summary = train_probe(_config(name, probe=True, noise_multiplier=0.0, epsilon=3.0, steps=6))
    rate = poisson_rate(300, 16)
    sigma = calibrate_noise_multiplier(3.0, 1e-5, rate, 6)
    assert summary["method"] == "dp-probe" and summary["noise_multiplier"] == pytest.approx(sigma)
    assert summary["epsilon"] == noise_epsilon((StepRun(Noise.gaussian(sigma), rate, 6),), 1e-5)
    assert summary["epsilon"] <= 3.0 + 1e-9 and summary["rdp_epsilon"] >= summary["epsilon"]
    width = 32 + 1  # the tiny models' hidden size, and the bias
    assert summary["trainable_params"] == 2 * width and 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0.0 <= summary["zero_shot_accuracy"] <= 1.0 and summary["cpu_s"] > 0
    plain = train_probe(_config(name, probe=True, private=False, steps=3))
    assert plain["method"] == "probe" and plain["epsilon"] is None and plain["noise_multiplier"] == 0.0


def test_probe_draws_train_fresh_heads_on_the_same_features_and_report_their_mean(monkeypatch):
    """train_probe(draws=N): N heads on features computed once (one all_features call per split), each with its own
    CSPRNG draws; the row's accuracy is their mean. draws < 1 is refused by name."""
    from seedtune.client.baselines import probe
    from seedtune.shared.task.config import ConfigError
    from seedtune.shared.task.models import TextClassifier

    calls, learners = [], []
    features, learner = TextClassifier.all_features, probe.ProbeLearner
    monkeypatch.setattr(TextClassifier, "all_features",
                        lambda self, *a, **k: calls.append(a[-1]) or features(self, *a, **k))
    monkeypatch.setattr(probe, "ProbeLearner", lambda *a: learners.append(learner(*a)) or learners[-1])
    summary = probe.train_probe(_config("tiny-encoder", probe=True, epsilon=3.0, steps=4), draws=3)
    assert calls == ["training features", "test features"] and len(learners) == 3
    assert not torch.equal(learners[0].weight, learners[1].weight)  # fresh noise and batches, not one draw thrice
    assert summary["test_accuracy"] == pytest.approx(np.mean(summary["test_accuracies"]))
    with pytest.raises(ConfigError, match="draws must be >= 1, got 0"):
        probe.train_probe(_config("tiny-encoder", probe=True, epsilon=3.0, steps=4), draws=0)


def test_a_probe_with_lora_is_refused_by_name():
    from seedtune.shared.task.config import ConfigError

    with pytest.raises(ConfigError, match="lora_rank must be 0 for a linear probe"):
        _config(probe=True, lora_rank=4)
