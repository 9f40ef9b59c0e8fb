import numpy as np
import pytest
import torch

from seedtune.client.zo_step import projected_gradients
from seedtune.shared.task.config import ConfigError, ModelConfig
from seedtune.shared.protocol.digest import model_digest
from seedtune.shared.engine.directions import direction_numpy
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.models import Batch
from seedtune.shared.engine.selection import select_all, select_patterns, select_pruned
from seedtune.shared.engine.update import FeatureCache, ScoredView, TrainableView
from tests.helpers import LABELS, SENTENCES, run_python


def _selections(task):
    return {
        "all": select_all(task.module),
        "patterns": select_patterns(task.module, ["*norm*", "*head*"]) if task.kind == "encoder"
        else select_patterns(task.module, ["*norm*"]),
        "prune": select_pruned(task.module, task.synflow_output, 0.01),
    }


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["all", "patterns", "prune"])
def test_perturb_restore_is_bit_exact_over_many_cycles(tiny_task, mode):
    before = _snapshot(tiny_task.module)
    view = TrainableView(tiny_task.module, _selections(tiny_task)[mode])
    for seed in range(300):
        view.snapshot()
        view.perturb(seed, 1e-3)
        view.perturb(seed, -1e-3)
        view.restore()
    after = tiny_task.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_perturb_actually_moves_the_selected_entries(tiny_task):
    sel = _selections(tiny_task)["prune"]
    view = TrainableView(tiny_task.module, sel)
    before = _snapshot(tiny_task.module)
    view.snapshot()
    view.perturb(5, 1e-2)
    params = dict(tiny_task.module.named_parameters())
    name, idx = sel.names[0], sel.indices[0]
    moved = params[name].detach().view(-1)[idx] - before[name].view(-1)[idx]
    assert torch.allclose(moved.abs(), torch.full_like(moved, 1e-2), rtol=1e-3)
    view.restore()


@pytest.mark.parametrize("mode", ["all", "patterns", "prune"])
def test_an_update_changes_exactly_the_selected_entries(tiny_task, mode):
    sel = _selections(tiny_task)[mode]
    before = _snapshot(tiny_task.module)
    TrainableView(tiny_task.module, sel).apply(seed=42, coeff=1e-2)
    params = dict(tiny_task.module.named_parameters())
    expected_changed = 0
    for name, p in params.items():
        changed = (p.detach() != before[name]).view(-1)
        if name in sel.names:
            i = sel.names.index(name)
            mask = torch.zeros_like(changed)
            mask[sel.indices[i] if sel.indices[i] is not None else slice(None)] = True
            assert not changed[~mask].any(), f"{name}: an unselected entry changed"
            assert changed[mask].all(), f"{name}: a selected entry did not change"
            expected_changed += int(mask.sum())
        else:
            assert not changed.any(), f"{name} is not selected but changed"
    assert expected_changed == sel.size


LEDGER_SCRIPT = """
import numpy as np
from seedtune.shared.task.config import ModelConfig
from seedtune.shared.protocol.digest import model_digest
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.engine.selection import select_pruned
from seedtune.client.zo_step import projected_gradients
from seedtune.shared.engine.update import ScoredView, TrainableView
task = load_task_model(ModelConfig(name="tiny-decoder"))
sel = select_pruned(task.module, task.synflow_output, 0.05)
rng = np.random.default_rng(2024)
seeds = rng.integers(0, 2**63, size=1000, dtype=np.uint64)
coeffs = (rng.standard_normal(1000) * 1e-3).astype(np.float32)
view = TrainableView(task.module, sel)
for s, c in zip(seeds, coeffs):
    view.apply(int(s), float(c))
print(sel.digest(), model_digest(task.module))
"""


def test_a_ledger_of_1000_updates_replays_identically_in_two_processes():
    first, second = run_python(LEDGER_SCRIPT), run_python(LEDGER_SCRIPT)
    assert first == second
    base = model_digest(load_task_model(ModelConfig(name="tiny-decoder")).module)
    assert first.split()[1] != base  # the updates did change the model


def test_numpy_replay_is_bit_identical_to_torch(tiny_decoder):
    task = tiny_decoder
    sel = select_pruned(task.module, task.synflow_output, 0.05)
    params = dict(task.module.named_parameters())
    flat_np = {n: params[n].detach().numpy().copy().reshape(-1) for n in sel.names}
    rng = np.random.default_rng(7)
    ledger = [(int(s), float(c)) for s, c in zip(rng.integers(0, 2**63, 200), rng.standard_normal(200) * 1e-2)]
    view = TrainableView(task.module, sel)
    for seed, coeff in ledger:
        view.apply(seed, coeff)
        for name, idx, offset, count in sel.segments():
            flat = flat_np[name]
            where = slice(None) if idx is None else idx.numpy()
            values = flat[where]
            values += np.float32(coeff) * direction_numpy(seed, offset, count)
            flat[where] = values
    for name in sel.names:
        assert np.array_equal(params[name].detach().numpy().reshape(-1), flat_np[name]), name


def _numpy_replay(task, sel, moves):
    """The trainable values after ``moves`` by the numpy formula, from the model's current weights."""
    params = dict(task.module.named_parameters())
    flat_np = {n: params[n].detach().numpy().copy().reshape(-1) for n in sel.names}
    for seed, coeff in moves:
        for name, idx, offset, count in sel.segments():
            where = slice(None) if idx is None else idx.numpy()
            values = flat_np[name][where]
            values += np.float32(coeff) * direction_numpy(seed, offset, count)
            flat_np[name][where] = values
    return flat_np


@pytest.mark.parametrize("mode", ["all", "prune"])
def test_apply_all_is_one_apply_after_another_across_chunks(tiny_decoder, mode, monkeypatch):
    """A round's entries applied at once (each pruned chunk gathered once) give the bits of applying them one
    by one, and of the numpy formula, also when tensors span several chunks."""
    from seedtune.shared.engine import update

    monkeypatch.setattr(update, "CHUNK", 4096)  # the embedding spans dozens of chunks, small tensors share one
    sel = {"all": select_all, "prune": lambda m: select_pruned(m, tiny_decoder.synflow_output, 0.3)}[mode](
        tiny_decoder.module)
    assert max(sel.counts) > 3 * 4096
    rng = np.random.default_rng(3)
    moves = [(int(s), float(np.float32(c))) for s, c in zip(rng.integers(0, 2**63, 12), rng.standard_normal(12))]
    expected = _numpy_replay(tiny_decoder, sel, moves)
    before = _snapshot(tiny_decoder.module)
    view = TrainableView(tiny_decoder.module, sel)
    for seed, coeff in moves:
        view.apply(seed, coeff)
    one_by_one = _snapshot(tiny_decoder.module)
    tiny_decoder.module.load_state_dict(before)
    view = TrainableView(tiny_decoder.module, sel)  # the view's master is the truth: a fresh one reads the weights
    view.apply_all(moves)
    params = dict(tiny_decoder.module.named_parameters())
    for name in sel.names:
        assert torch.equal(params[name].detach(), one_by_one[name]), name
        assert np.array_equal(params[name].detach().numpy().reshape(-1), expected[name]), name
    tiny_decoder.module.load_state_dict(before)


def test_an_index_set_covering_every_entry_is_written_as_the_whole_tensor(tiny_decoder):
    """SynFlow at fraction 1.0 keeps every index of every tensor: the view writes those tensors in place, with
    the same bits as the whole-tensor set."""
    full = select_pruned(tiny_decoder.module, tiny_decoder.synflow_output, 1.0)
    whole = select_all(tiny_decoder.module)
    assert full.size == whole.size and all(idx is not None for idx in full.indices)
    view = TrainableView(tiny_decoder.module, full)
    assert all(idx is None for idx in view._indices)
    before = _snapshot(tiny_decoder.module)
    view.snapshot()
    view.perturb(9, 1e-2)
    perturbed = _snapshot(tiny_decoder.module)
    view.restore()
    assert all(torch.equal(before[k], v) for k, v in tiny_decoder.module.state_dict().items())
    view.apply(9, 1e-2)
    applied = _snapshot(tiny_decoder.module)
    tiny_decoder.module.load_state_dict(before)
    other = TrainableView(tiny_decoder.module, whole)
    other.snapshot()
    other.perturb(9, 1e-2)
    assert all(torch.equal(perturbed[k], v) for k, v in tiny_decoder.module.state_dict().items())
    other.restore()
    other.apply(9, 1e-2)
    assert all(torch.equal(applied[k], v) for k, v in tiny_decoder.module.state_dict().items())
    tiny_decoder.module.load_state_dict(before)


def test_proximal_pull_moves_towards_the_anchor(tiny_decoder):
    sel = select_patterns(tiny_decoder.module, ["*norm*"])
    view = TrainableView(tiny_decoder.module, sel)
    anchor = view.values()
    view.apply(3, 0.5)
    distance = lambda: sum(float((v - a).norm()) for v, a in zip(view.values(), anchor))  # noqa: E731
    d0 = distance()
    view.pull_towards(anchor, 0.25)
    assert distance() == pytest.approx(0.75 * d0, rel=1e-5)


def test_view_rejects_a_set_for_another_model(tiny_task):
    other = load_task_model(ModelConfig(name="tiny-decoder" if tiny_task.kind == "encoder" else "tiny-encoder"))
    with pytest.raises(ValueError, match="lacks|shape"):
        TrainableView(tiny_task.module, select_all(other.module))


@pytest.mark.parametrize("patterns, depth", [(["*layers.1.mlp*"], 1), (["*layers.1.*", "*.norm.weight"], 1),
                                             (["*norm*"], 0), (["*layers.1.*", "*embed_tokens*"], 0)])
def test_frozen_prefix_depth_follows_the_lowest_trainable_layer(tiny_decoder, patterns, depth):
    view = ScoredView(tiny_decoder, select_patterns(tiny_decoder.module, patterns))
    assert view.depth == depth


def test_encoders_split_above_their_embeddings():
    encoder = load_task_model(ModelConfig(name="tiny-encoder"))
    assert ScoredView(encoder, select_patterns(encoder.module, ["*layer.1.*"])).depth == 1
    assert ScoredView(encoder, select_patterns(encoder.module, ["*layer.1.*", "head.*"])).depth == 1
    assert ScoredView(encoder, select_patterns(encoder.module, ["*layer.1.*", "*embeddings*"])).depth == 0


def test_a_split_that_does_not_reproduce_the_forward_is_not_used(tiny_decoder, monkeypatch, caplog):
    forward_from = type(tiny_decoder.module).forward_from
    monkeypatch.setattr(type(tiny_decoder.module), "forward_from",
                        lambda self, hidden, mask, depth: forward_from(self, hidden * 1.01, mask, depth))
    assert ScoredView(tiny_decoder, select_patterns(tiny_decoder.module, ["*layers.1.mlp*"])).depth == 0
    assert "do not reproduce the full forward" in caplog.text


UPPER = ["*layers.1.mlp*", "*layer.1.output*"]  # the tiny decoder's and the tiny encoder's top layer, in part


def _records(n: int = 24) -> tuple[list[list[int]], np.ndarray]:
    rng = np.random.default_rng(0)
    return [list(rng.integers(1000, 2000, size=int(k))) for k in rng.integers(3, 20, size=n)], \
        rng.integers(0, 2, size=n)


def test_a_step_with_the_frozen_prefix_reused_gives_the_full_forward_estimates(tiny_task):
    """The lower layers run once (per batch, or per record once prepared) change the cost of a step, not its
    numbers: same g_i as running every layer twice, weights restored bit for bit, the per-step batch dropped."""
    selection = select_patterns(tiny_task.module, UPPER)
    cached, full, once = (ScoredView(tiny_task, selection) for _ in range(3))
    full.depth = 0
    assert cached.depth == 1
    ids, labels = _records()
    once.prepare(ids, visits=1.0)
    assert once.prefixes is not None and len(once.prefixes.store) == len({tuple(x) for x in ids})
    before = _snapshot(tiny_task.module)
    g_full, loss_full = projected_gradients(full, ids, labels, seed=7, mu=1e-2, microbatch=5)
    for view in (cached, once):
        g, loss = projected_gradients(view, ids, labels, seed=7, mu=1e-2, microbatch=5)
        assert len(view._prefixes) == 0
        np.testing.assert_allclose(g, g_full, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(loss, loss_full, rtol=1e-6)
    assert np.abs(g_full).max() > 0  # the set matters to the loss: equality is not vacuous
    after = _snapshot(tiny_task.module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cached_and_uncached_prefix_losses_are_bit_identical(tiny_task):
    """A record's lower-layer output is the same bits from the cache as computed afresh (a cache that keeps
    nothing), so a step's per-example losses at a perturbed point are too; and they are the full model's to
    float rounding."""
    selection = select_patterns(tiny_task.module, UPPER)
    ids, labels = _records(12)
    cached = ScoredView(tiny_task, selection)
    cached.prepare(ids, visits=2.0)
    fresh = FeatureCache(tiny_task, 0, cached.depth)
    assert cached.prefixes is not None and cached.prefixes.bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(cached.prefixes.rows(ids), fresh.rows(ids))) and fresh.bytes == 0
    batch = tiny_task.collate(ids, labels)
    cached.snapshot()
    cached.perturb(12345, 0.5)
    try:
        got = cached.per_example_loss(ids, labels)
        uncached = tiny_task.per_example_loss(batch, fresh.padded(ids, batch.input_ids.shape[1]), cached.depth)
        assert np.array_equal(got, uncached.numpy())
        np.testing.assert_allclose(got, tiny_task.per_example_loss(batch).numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, cached.per_example_loss(ids, labels[::-1].copy()))  # the labels matter
    finally:
        cached.restore()


def test_prefixes_are_kept_only_where_they_pay_and_fit(tiny_task):
    selection = select_patterns(tiny_task.module, UPPER)
    ids, labels = _records(12)
    rare = ScoredView(tiny_task, selection)
    rare.prepare(ids, visits=0.5)  # drawn less than once each: the per-batch prefix costs less
    small = ScoredView(tiny_task, selection, feature_cache_mb=0)
    small.prepare(ids, visits=10.0)  # does not fit
    assert rare.prefixes is None and small.prefixes is None
    shared = ScoredView(tiny_task, selection)  # one view, two simulated nodes' records
    shared.prepare(ids[:6], visits=2.0)
    shared.snapshot()
    try:  # a batch holding records not stored takes the batch's own prefix (same losses to rounding)
        mixed = shared.per_example_loss(ids, labels)
        np.testing.assert_allclose(mixed, tiny_task.per_example_loss(tiny_task.collate(ids, labels)).numpy(),
                                   rtol=1e-5, atol=1e-6)
    finally:
        shared.restore()
    shared.prepare(ids[6:], visits=2.0)
    assert shared.prefixes is not None and len(shared.prefixes.store) == len({tuple(x) for x in ids})


def test_a_split_that_raises_is_not_used(tiny_task, monkeypatch, caplog):
    """A body whose halves do not compose (ELECTRA projects its embeddings before the first layer, so its upper
    layers reject the hidden states) runs whole, with a warning, rather than failing to start."""
    def broken(self, hidden, mask, depth):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(type(tiny_task.module), "forward_from", broken)
    assert ScoredView(tiny_task, select_patterns(tiny_task.module, UPPER)).depth == 0
    assert "cannot run the first 1 layers apart" in caplog.text


# ------------------------------------------------------------------------ the head's feature cache
def _alone_losses(task, ids, labels):
    """Each record's loss from the full model, the record alone in its batch."""
    return np.array([task.per_example_loss(task.collate([x], labels[i:i + 1])).numpy()[0]
                     for i, x in enumerate(ids)], dtype=np.float32)


def test_the_head_set_is_the_classifier_head_and_only_it(tiny_task):
    head = tiny_task.head_set()
    if tiny_task.kind == "encoder":
        assert head.names == ("head.weight", "head.bias") and head.size == 2 * 32 + 2
    else:  # the two label rows of the tied embedding
        assert head.size == 2 * 32 and tiny_task.head_reads_inputs() == set(tiny_task.module.label_ids.tolist())
    view = ScoredView(tiny_task, head)
    assert view.cache is not None and view.depth == 0
    assert ScoredView(tiny_task, select_patterns(tiny_task.module, ["*layers.1.*", "*layer.1.*"])).cache is None


def test_cached_and_uncached_head_losses_are_bit_identical(tiny_task):
    """The feature cache changes no bit: per-example losses at a perturbed head equal those with no cache (a
    budget of 0 MB), and the full model's on each record alone to float rounding (the head runs row by row);
    a record holding a label word (whose embedding is a head row of a tied decoder) is recomputed at the
    perturbed head, never cached."""
    sentences = SENTENCES + ["a positive , negative one"]  # the decoder's label words
    ids = tiny_task.encode(sentences)
    labels = np.arange(len(ids)) % 2
    head = tiny_task.head_set()
    cached, bare = ScoredView(tiny_task, head), ScoredView(tiny_task, head, feature_cache_mb=0)
    for view in (cached, bare):
        view.per_example_loss(ids, labels)  # fills the cache
        view.snapshot()
        view.perturb(12345, 0.5)
    try:
        got = cached.per_example_loss(ids, labels)
        assert np.array_equal(got, cached.per_example_loss(ids, labels))  # within the step, kept batch
        assert np.array_equal(got, bare.per_example_loss(ids, labels))
        np.testing.assert_allclose(got, _alone_losses(tiny_task, ids, labels), rtol=1e-5, atol=1e-6)
    finally:
        cached.restore()
        bare.restore()
    assert bare.cache.bytes == 0 and cached.cache.bytes > 0
    live = len(tiny_task.head_reads_inputs()) > 0
    assert len(cached.cache.store) == len(ids) - (1 if live else 0)
    np.testing.assert_allclose(cached.per_example_loss(ids, labels), _alone_losses(tiny_task, ids, labels),
                               rtol=1e-5, atol=1e-6)


def _cached_head_losses_are_the_uncached_ones(task, ids, labels) -> None:
    """At a perturbed head, the losses with every record's features cached equal those without a cache bit for
    bit, and each record's loss computed alone; every record was cached."""
    head = task.head_set()
    cached, bare = ScoredView(task, head), ScoredView(task, head, feature_cache_mb=0)
    for view in (cached, bare):
        view.per_example_loss(ids, labels)
        view.snapshot()
        view.perturb(12345, 0.5)
    try:
        assert np.array_equal(cached.per_example_loss(ids, labels), bare.per_example_loss(ids, labels))
        np.testing.assert_allclose(cached.per_example_loss(ids, labels), _alone_losses(task, ids, labels),
                                   rtol=1e-5, atol=1e-6)
    finally:
        cached.restore()
        bare.restore()
    assert len(cached.cache.store) == len(ids)


@pytest.mark.parametrize("kind", ["linear", "unit"])
def test_a_decoders_own_head_starts_as_its_label_rows_and_its_features_are_cached(kind):
    """model.decoder_head = "linear": a head of the decoder's own on the last hidden state, starting from the label
    words' output rows (the same zero-shot scores), untied from the input embedding: every record's features are
    cached, a record holding a label word included (with the tied rows it is recomputed at every perturbation),
    and the cached losses equal the uncached ones bit for bit. "unit" reads the state at unit norm (the probe's
    features): the same zero-shot predictions, other scores."""
    rows = load_task_model(ModelConfig(name="tiny-decoder"))
    own = load_task_model(ModelConfig(name="tiny-decoder", decoder_head=kind))
    ids = own.encode(SENTENCES + ["a positive , negative one"])  # the label words
    labels = np.arange(len(ids)) % 2
    batch = own.collate(ids, labels)
    if kind == "linear":
        assert torch.equal(own.logits(batch), rows.logits(batch))
    else:
        assert torch.equal(own.logits(batch).argmax(-1), rows.logits(batch).argmax(-1))
        assert not torch.allclose(own.logits(batch), rows.logits(batch))
        torch.testing.assert_close(own.features(batch).norm(dim=-1), torch.ones(len(ids)))
    head = own.head_set()
    assert head.names == ("head.weight",) and head.size == 2 * 32 and own.head_reads_inputs() == frozenset()
    assert rows.head_reads_inputs() and own.frozen_depth(["head.weight"]) == 2  # both layers lie below the head
    _cached_head_losses_are_the_uncached_ones(own, ids, labels)


def test_a_centred_head_reads_its_layer_less_the_templates_own_state_and_its_features_are_cached():
    """model.decoder_head = "centred", model.head_layer = 1: the head reads the first of the tiny decoder's two
    layers at the last position, less the state of the template with an empty text (so that record's features are
    zero), at unit norm; the second layer never runs (moving it moves no score); the cached losses equal the
    uncached ones bit for bit and each record's loss computed alone."""
    own = load_task_model(ModelConfig(name="tiny-decoder", decoder_head="centred", head_layer=1))
    ids = own.encode(SENTENCES)
    labels = np.arange(len(ids)) % 2
    batch = own.collate(ids, labels)
    torch.testing.assert_close(own.features(batch).norm(dim=-1), torch.ones(len(ids)))
    empty = own.collate(own.encode([""]), np.zeros(1, dtype=np.int64))
    assert torch.equal(own.features(empty), torch.zeros(1, own.module.hidden_size))
    top = own.module.lm.model.layers[1].mlp.down_proj.weight
    norm = own.module.lm.model.norm.weight  # the final norm, also above layer 1: scaled unevenly, it moves nothing
    before = own.logits(batch)
    with torch.no_grad():
        top.add_(1.0)
        norm.mul_(torch.linspace(0.5, 2.0, norm.numel()))
    assert torch.equal(own.logits(batch), before)
    top_layer = next(n for n, p in own.module.named_parameters() if p is top)
    assert own.frozen_depth(["head.weight"]) == 1 and own.frozen_depth([top_layer]) == 1
    with pytest.raises(ConfigError, match=r"model\.head_layer: the head reads layer 1 to 2 \(0: the last\); got 3"):
        load_task_model(ModelConfig(name="tiny-decoder", decoder_head="centred", head_layer=3))
    with pytest.raises(ConfigError, match=r"choose a decoder's head; tiny-encoder is an encoder"):
        load_task_model(ModelConfig(name="tiny-encoder", decoder_head="centred", head_layer=1))
    _cached_head_losses_are_the_uncached_ones(own, ids, labels)


def test_head_losses_do_not_depend_on_the_rest_of_the_batch(tiny_task):
    """Each record's features are a function of that record alone, so one more record in the batch moves no
    other record's loss (the sensitivity argument's assumption, which padded batches meet only at float level)."""
    ids = tiny_task.encode(SENTENCES)
    labels = LABELS
    view = ScoredView(tiny_task, tiny_task.head_set(), feature_cache_mb=0)
    full = view.per_example_loss(ids, labels)
    assert np.array_equal(view.per_example_loss(ids[:3], labels[:3]), full[:3])
    order = [5, 2, 0, 4, 1, 3]
    assert np.array_equal(view.per_example_loss([ids[i] for i in order], labels[order]), full[order])


def test_a_step_over_a_hadamard_frame_is_dp_sgd_on_the_head(tiny_task):
    """The head stage's claim: with K = n >= d Hadamard directions (one sign key), the released K scalars and the
    update -(lr / sqrt(K)) sum_k scalar_k z_k are DP-SGD's step on the head: each example's gradient clipped to
    L2 norm C (the same C, not C sqrt(K)), summed, divided by the expected batch, times lr. Checked against the
    closed-form per-example gradient of the softmax head, (p - e_y) features^T, clipping some examples."""
    from seedtune.client.trainer import private_step, PrivacyPlan
    from seedtune.shared.privacy.accounting import PrivacyAccountant
    from seedtune.shared.engine.directions import seed_stream, step_seeds
    from seedtune.shared.privacy.noise import SecureRandom

    task, head = tiny_task, tiny_task.head_set()
    view = ScoredView(task, head, "hadamard")
    ids, labels = task.encode(SENTENCES), np.asarray(LABELS)
    weight, bias = (None if t is None else t.detach().double() for t in task.head_weights())
    features = torch.cat([task.features(task.collate([x], labels[i:i + 1])) for i, x in enumerate(ids)]).double()
    p = torch.softmax(features @ weight.T + (0 if bias is None else bias), dim=1)
    residual = p - torch.nn.functional.one_hot(torch.as_tensor(labels), p.shape[1]).double()
    grads = (residual[:, :, None] * features[:, None, :]).reshape(len(ids), -1)  # rows then (encoder) the bias
    if bias is not None:
        grads = torch.cat([grads, residual], dim=1)
    else:  # the decoder's label rows, in the head set's (sorted row) order
        order = torch.argsort(task.module.label_ids.cpu())
        grads = residual[:, order, None].mul(features[:, None, :]).reshape(len(ids), -1)
    norms = grads.norm(dim=1)
    clip = float(norms.sort().values[2:4].mean())  # half the examples are clipped, none at the bound
    expected = -0.5 * (grads * torch.clamp(clip / norms, max=1.0)[:, None]).sum(0) / len(ids)
    n = 1 << (head.size - 1).bit_length()
    before = torch.cat([v.double().flatten() for v in view.values()])
    plan = PrivacyPlan(sample_rate=1.0, noise=None, steps=1)  # every example: the batch is known
    result, _ = private_step(view, ids, labels, 1, step_seeds("hadamard", seed_stream(3), n), 0.5, 1e-3, plan,
                             SecureRandom(), clip, 8, None, PrivacyAccountant())
    moved = torch.cat([v.double().flatten() for v in view.values()]) - before
    assert result.clipped == int((norms > clip).sum()) > 0
    torch.testing.assert_close(moved, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))


def test_frame_estimates_are_the_passes_two_point_estimates_each_example_alone(tiny_task):
    """ScoredView's shortcut for a head over a Hadamard frame (one transform per example instead of K passes)
    gives each seed's two-point estimate from real perturbed passes, and an example's estimates do not depend on
    the rest of its batch (the same in a batch of one); it declines where it does not apply."""
    from seedtune.shared.engine.directions import seed_stream, step_seeds

    task = tiny_task
    view = ScoredView(task, task.head_set(), "hadamard")
    rng = np.random.default_rng(2)
    words = [int(i) for i in rng.integers(1000, 2000, size=400) if int(i) not in task.head_reads_inputs()]
    ids = [words[5 * i : 5 * i + 3 + i % 3] for i in range(10)]
    labels = rng.integers(0, 2, size=10)
    seeds = step_seeds("hadamard", seed_stream(4), 128)
    g, centre = view.frame_estimates(ids, labels, seeds, 1e-3)
    assert g.shape == (10, 128)
    np.testing.assert_allclose(centre, view.per_example_loss(ids, labels), rtol=1e-5)
    wide, _ = view.frame_estimates(ids, labels, seeds, 1e-2)  # the passes' float32 rounding is ~1e-7 / mu
    for k in (0, 1, 77, 127):
        two_point, _ = projected_gradients(view, ids, labels, seed=seeds[k], mu=1e-2, microbatch=10)
        np.testing.assert_allclose(wide[:, k], two_point, atol=1e-3 * np.abs(two_point).max())
    alone = np.concatenate([view.frame_estimates([x], labels[i:i + 1], seeds, 1e-3)[0] for i, x in enumerate(ids)])
    assert np.array_equal(alone, g)
    assert ScoredView(task, task.head_set(), "rademacher").frame_estimates(ids, labels, seeds, 1e-3) is None
    mixed = [seeds[0], step_seeds("hadamard", seed_stream(5), 1)[0]]  # two sign keys: not one frame
    assert view.frame_estimates(ids, labels, mixed, 1e-3) is None
    if task.head_reads_inputs():  # a tied decoder's record holding a label word: its features move with the head
        held = [ids[0] + [next(iter(task.head_reads_inputs()))]] + ids[1:]
        assert view.frame_estimates(held, labels, seeds, 1e-3) is None


def test_frame_runs_cut_whole_frames_and_a_frame_is_added_as_its_sum(tiny_task):
    """A frame is a run under one sign key with rising rows: two steps that drew the same key still split at the
    row reset, and lone or other-kind moves stay single. apply_all adds a frame as one float32 sum, within float32
    rounding of one apply after another, and a view fed round by round ends on the same bits as one fed the
    whole history (the trainer and replay)."""
    from seedtune.shared.engine.update import frame_runs

    a, b = 7 << 32, 9 << 32
    moves = [(a | 0, 0.1), (a | 1, 0.2), (a | 2, 0.3), (a | 0, 0.4), (a | 1, 0.5), (b | 0, 0.6), (5, 0.7), (b | 3, 1.0)]
    assert frame_runs(moves, 100) == [(0, 3, True), (3, 5, True), (5, 6, False), (6, 7, False), (7, 8, False)]
    assert frame_runs(moves[:3], 1 << 23) == [(0, 1, False), (1, 2, False), (2, 3, False)]
    head = tiny_task.head_set()
    rounds = [[((k + 1) << 32 | row, float(c)) for row, c in enumerate(np.random.default_rng(k).normal(size=128))]
              for k in range(3)]
    one_by_one, by_round, whole = (ScoredView(tiny_task, head, "hadamard") for _ in range(3))  # own masters
    start = whole.values()
    for moves in rounds:
        for seed, coeff in moves:
            one_by_one.apply(seed, coeff)
        by_round.apply_all(moves)
    whole.apply_all([m for moves in rounds for m in moves])
    assert all(torch.equal(x, y) for x, y in zip(by_round.values(), whole.values()))
    for x, y in zip(by_round.values(), one_by_one.values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)
    assert not any(torch.equal(x, y) for x, y in zip(by_round.values(), start))


def test_bench_step_measures_the_head_stage_against_a_whole_forward(capsys):
    """bench_step --head: the head view over a full Hadamard frame (128 directions on the tiny encoder's 66-entry
    head) timed against the whole model's forward on the same batch, one JSON row."""
    import json

    from seedtune.simulations.bench_step import main

    assert main(["--json", "--models", "tiny-encoder", "--head", "--batch-size", "8", "--seq-len", "16",
                 "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["head_stage"] and row["trainable_entries"] == 66 and row["forward_s"] > 0 and row["zo_step_s"] > 0


def test_a_records_features_are_one_computation_of_that_record_alone_however_they_are_reached(tiny_task,
                                                                                              monkeypatch):
    """FeatureCache: a record's features come from a batch of fixed shape (GROUP rows of its own length) where
    this machine's forward keeps such rows apart (checked once per length, on synthetic rows), else from the
    record alone. Filled up front, computed when a batch needs them, or computed afresh with no room to keep
    them: the same bits, whatever records they were computed with. A forward whose rows interact is detected
    and each record computed alone; a row-wise forward is batched (fewer forwards)."""
    from seedtune.shared.engine.update import FeatureCache

    task = tiny_task
    rng = np.random.default_rng(3)
    words = [int(i) for i in rng.integers(1000, 2000, size=3000) if int(i) not in task.head_reads_inputs()]
    ids = [tuple(words[7 * i : 7 * i + 4 + i % 3]) for i in range(100)]  # lengths 4, 5, 6: groups and remainders
    filled = FeatureCache(task, 64)
    filled.fill(ids)
    assert set(filled.grouped) == {4, 5, 6} and len(filled.store) == len(ids)
    lazy, kept_nothing = FeatureCache(task, 64), FeatureCache(task, 0)
    for batch in (ids[::3], ids[1::2], ids[::-1], ids[5:9]):
        expected = torch.stack([filled.store[k] for k in batch])
        assert torch.equal(lazy.features(batch), expected) and torch.equal(kept_nothing.features(batch), expected)
    assert not kept_nothing.store

    real = task.features
    alone = {k: real(task.collate([k], np.zeros(1, dtype=np.int64)))[0] for k in ids}
    calls = []

    def row_wise(batch):  # each row computed on its own: batching cannot change a bit
        calls.append(len(batch.labels))
        return torch.cat([real(Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.labels[i:i + 1]))
                          for i in range(len(batch.labels))])

    monkeypatch.setattr(task, "features", row_wise)
    grouped = FeatureCache(task, 64)
    grouped.fill(ids)
    assert grouped.grouped == {4: True, 5: True, 6: True} and set(calls) == {FeatureCache.GROUP}
    assert all(torch.equal(grouped.store[k], v) for k, v in alone.items())

    def mixing(batch):  # every row moved by the batch's mean: a record's features would depend on its batch-mates
        out = real(batch)
        return out + 1e-3 * out.mean(0, keepdim=True) if len(batch.labels) > 1 else out

    monkeypatch.setattr(task, "features", mixing)
    mixed = FeatureCache(task, 64)
    mixed.fill(ids)
    assert mixed.grouped == {4: False, 5: False, 6: False} and all(torch.equal(mixed.store[k], v) for k, v in alone.items())
