import pytest
import torch

from seedtune.shared.task.config import ModelConfig
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.engine.selection import (select_all, select_patterns, select_pruned, stage_fraction,
                                              synflow_scores, top_fraction)
from tests.helpers import run_python


def test_pruning_keeps_the_requested_fraction_and_leaves_weights_untouched(tiny_task):
    before = {k: v.clone() for k, v in tiny_task.module.state_dict().items()}
    sel = select_pruned(tiny_task.module, tiny_task.synflow_output, 0.01)
    total = sum(p.numel() for p in tiny_task.module.parameters())
    assert sel.size == round(0.01 * total)
    assert sel.fraction_of(tiny_task.module) == pytest.approx(0.01, rel=1e-3)
    after = tiny_task.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # SynFlow's abs() was undone bit for bit
    for idx in sel.indices:
        assert idx is not None and torch.all(idx[1:] > idx[:-1])  # sorted, unique


def test_pruning_prefers_high_scores(tiny_decoder):
    scores = synflow_scores(tiny_decoder.module, tiny_decoder.synflow_output)
    order = [n for n, _ in tiny_decoder.module.named_parameters()]
    sel = top_fraction(scores, 0.02, order)
    flat = torch.cat([scores[n].reshape(-1) for n in order])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    offsets = dict(zip(order, torch.tensor([0] + [scores[n].numel() for n in order]).cumsum(0).tolist()))
    for name, idx in zip(sel.names, sel.indices):
        chosen[offsets[name] + idx] = True
    assert int(chosen.sum()) == sel.size
    assert flat[~chosen].max() <= flat[chosen].min()  # nothing dropped outscores anything kept
    assert any(float(s.max()) > 0 for s in scores.values())


def test_mask_digest_is_reproducible_in_another_process(tiny_decoder):
    here = select_pruned(tiny_decoder.module, tiny_decoder.synflow_output, 0.01).digest()
    code = ("from seedtune.shared.task.config import ModelConfig; "
            "from seedtune.shared.task.loading import load_task_model; "
            "from seedtune.shared.engine.selection import select_pruned; "
            "t = load_task_model(ModelConfig(name='tiny-decoder')); "
            "print(select_pruned(t.module, t.synflow_output, 0.01).digest())")
    assert run_python(code) == here
    assert select_pruned(tiny_decoder.module, tiny_decoder.synflow_output, 0.02).digest() != here


def test_patterns_and_their_errors(tiny_decoder):
    sel = select_patterns(tiny_decoder.module, ["*norm*"])
    assert sel.names and all("norm" in n for n in sel.names) and all(i is None for i in sel.indices)
    with pytest.raises(ValueError, match=r"no parameter name matches patterns \['\*nothing\*'\]"):
        select_patterns(tiny_decoder.module, ["*nothing*"])
    restricted = select_pruned(tiny_decoder.module, tiny_decoder.synflow_output, 0.5, ["*mlp*"])
    assert all("mlp" in n for n in restricted.names)


def test_incremental_sets_grow_and_contain_the_previous(tiny_decoder):
    order = [n for n, _ in tiny_decoder.module.named_parameters()]
    small = select_pruned(tiny_decoder.module, tiny_decoder.synflow_output, stage_fraction(0.01, "incremental", 0))
    big = select_pruned(tiny_decoder.module, tiny_decoder.synflow_output, stage_fraction(0.01, "incremental", 2))
    merged = big.union(small, order)
    assert merged.size >= big.size > small.size
    for name, idx in zip(small.names, small.indices):
        grown = merged.indices[merged.names.index(name)]
        assert torch.isin(idx, grown).all()
    assert stage_fraction(0.01, "static", 5) == stage_fraction(0.01, "dynamic", 5) == 0.01
    with pytest.raises(ValueError, match="strategy"):
        stage_fraction(0.01, "random", 0)


def test_select_all_counts_tied_weights_once():
    task = load_task_model(ModelConfig(name="tiny-decoder"))
    sel = select_all(task.module)
    assert sel.size == sum(p.numel() for p in task.module.parameters())
    with pytest.raises(ValueError, match="fraction"):
        top_fraction({"w": torch.ones(3)}, 0.0, ["w"])


def test_top_fraction_keeps_the_highest_scores_with_ties_broken_by_position():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        scores = {f"p{i}": torch.randint(0, 4, (int(torch.randint(1, 40, (), generator=gen)),), generator=gen).float()
                  for i in range(3)}  # many ties
        if trial % 2:
            scores = {n: torch.rand(s.shape, generator=gen) for n, s in scores.items()}
        flat = torch.cat(list(scores.values()))
        for fraction in (0.05, 0.3, 1.0):
            keep = max(1, round(fraction * flat.numel()))
            reference = torch.sort(torch.argsort(-flat, stable=True)[:keep]).values  # the definition, in full
            sel = top_fraction(scores, fraction, list(scores))
            offsets = dict(zip(scores, torch.cumsum(torch.tensor([0] + [s.numel() for s in scores.values()]), 0)))
            got = torch.cat([idx + offsets[n] for n, idx in zip(sel.names, sel.indices)])
            assert torch.equal(got, reference)
