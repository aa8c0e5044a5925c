"""LiveEdit on the three tiny backbones: the editing contract, routing and the residual (DESIGN.md §3)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_image
from editors import load_editor
from editors.liveedit.routing import mixture_residual, soft_weights
from utils.records import Sample

PROMPTS = [f"what color is shape {i}? The answer is:" for i in range(8)]


def requests(n: int, offset: int = 0) -> list[Sample]:
    return [Sample(PROMPTS[i % 8] + " really" * (i % 3), f"answer {i}", make_image(100 + offset + i))
            for i in range(n)]


@pytest.fixture
def editor(vllm):
    torch.manual_seed(0)
    ed = load_editor("liveedit", vllm)
    yield ed
    ed.remove()  # the backbone is shared between tests: detach the hook


def batch_of(vllm, samples):
    return vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])


def force_routing(editor):
    """Make hard routing select every expert for every image row, whatever the weights.

    With zero value weights the visual features are the value bias: input and prototype give b,
    edit keys give 2b, so <b, 2b> > <b, b> and every expert beats the prototype. (A trained editor
    learns when to select; these tests check the mechanics for a known selection.)
    """
    with torch.no_grad():
        for ext, scale in ((editor.inpt_extractor, 1.0), (editor.edit_extractor, 2.0)):
            ext.ca_vision_info_ext.v_mlp.weight.zero_()
            ext.ca_vision_info_ext.v_mlp.bias.fill_(scale)


@torch.no_grad()
def test_no_edits_gives_bit_identical_logits(vllm, editor):
    batch = batch_of(vllm, requests(3))
    editor.remove()  # the backbone with no layer edit at all
    unedited = vllm(batch)
    torch.manual_seed(0)
    fresh = load_editor("liveedit", vllm)
    try:
        assert torch.equal(vllm(batch), unedited)
    finally:
        fresh.remove()


@torch.no_grad()
def test_edit_changes_routed_rows_and_restore_is_bit_identical(vllm, editor):
    force_routing(editor)
    samples = requests(4)
    batch = batch_of(vllm, samples)
    before = vllm(batch)
    editor.edit(samples)
    rows, _, _ = editor.route(editor.edit_layer_output(batch), batch)
    assert rows.tolist() == [0, 1, 2, 3]  # forced: every image row is routed
    after = vllm(batch)
    changed = [(after[i] != before[i]).any().item() for i in range(4)]
    assert changed == [True] * 4
    editor.restore()
    assert editor.num_edits == 0
    assert torch.equal(vllm(batch), before)


@torch.no_grad()
def test_text_only_rows_are_untouched(vllm, editor):
    force_routing(editor)
    editor.edit(requests(4))
    mixed = [Sample("nq question: what is the capital of zorvia?", "mippel", None)] + requests(2)
    batch = batch_of(vllm, mixed)
    edited = vllm(batch)
    editor.restore()
    unedited = vllm(batch)
    assert torch.equal(edited[0], unedited[0])


def test_soft_weights_are_in_open_unit_interval_and_sum_below_one():
    torch.manual_seed(0)
    sim = torch.randn(5, 7) * 3
    selected = torch.rand(5, 7) > 0.3
    selected[:, 0] = True
    c = soft_weights(sim, selected)
    assert ((c[selected] > 0) & (c[selected] < 1)).all()
    assert (c[~selected] == 0).all()
    assert (c.sum(1) < 1).all()
    assert torch.allclose(c[0][selected[0]], torch.softmax(sim[0][selected[0]], 0) * torch.sigmoid(sim[0][selected[0]]))


def test_residual_equals_naive_loop_over_experts():
    torch.manual_seed(0)
    b, l, d, m, r = 3, 5, 16, 6, 4
    x, up, down, c = torch.randn(b, l, d), torch.randn(m, r, d), torch.randn(m, r, d), torch.rand(b, m)
    naive = torch.zeros(b, l, d)
    for i in range(b):
        for t in range(l):
            for k in range(m):
                naive[i, t] += c[i, k] * torch.relu(up[k] @ x[i, t]) @ down[k]
    assert torch.allclose(mixture_residual(x, up, down, c), naive, atol=1e-5)


@torch.no_grad()
def test_batched_edit_equals_one_by_one(vllm, editor):
    samples = requests(5)
    editor.edit(samples)
    batched = {k: editor.repository.view(k).clone() for k in ("query_keys", "vision_keys", "up", "down")}
    editor.restore()
    for s in samples:
        editor.edit([s])
    for k, v in batched.items():
        assert torch.allclose(editor.repository.view(k), v, atol=1e-5), k


@torch.no_grad()
def test_routed_batch_of_8_equals_8_single_inferences(vllm, editor):
    force_routing(editor)
    editor.edit(requests(6))
    queries = requests(8, offset=0)[:4] + requests(4, offset=50)
    batch = batch_of(vllm, queries)
    together = vllm(batch)
    for i, s in enumerate(queries):
        single = batch_of(vllm, [s])
        assert torch.allclose(vllm(single)[0], together[i, :single.length], atol=1e-5)


@torch.no_grad()
def test_generate_applies_experts_to_every_new_token(vllm, editor):
    """With a KV cache, routing happens at prefill and the residual reaches every decoded token:
    cached greedy decoding equals decoding by re-running the whole sequence at each step."""
    import dataclasses

    force_routing(editor)
    samples = requests(3)
    editor.edit(samples)
    prompt, image = samples[0].prompt, samples[0].image
    cached = vllm.generate([prompt], [image], max_new_tokens=6)[0]
    batch = vllm.prepare([prompt], [image], None)
    ids = []
    for _ in range(6):  # no cache: a full forward of prompt + generated tokens at every step
        next_id = int(vllm(batch)[0, -1].argmax())
        if next_id == vllm.tokenizer.eos_token_id:
            break
        ids.append(next_id)
        grow = lambda t, v: torch.cat([t, t.new_full((1, 1), v)], dim=1)  # noqa: E731
        batch = dataclasses.replace(
            batch, inputs_embeds=torch.cat([batch.inputs_embeds, vllm.stack.embed_tokens(torch.tensor([[next_id]]))], 1),
            attention_mask=grow(batch.attention_mask, 1), position_ids=grow(batch.position_ids, batch.length),
            token_ids=grow(batch.token_ids, next_id), labels=grow(batch.labels, 0),
            label_mask=grow(batch.label_mask, False))
    assert cached == vllm.tokenizer.decode(ids, skip_special_tokens=True)
    edited_logits = vllm(batch)
    editor.restore()
    assert not torch.equal(vllm(batch), edited_logits)  # the experts were applied on the grown sequence


@torch.no_grad()
def test_repository_save_load_round_trip(vllm, editor, tmp_path):
    force_routing(editor)
    samples = requests(3)
    batch = batch_of(vllm, samples)
    editor.edit(samples)
    edited = vllm(batch)
    editor.save_edits(str(tmp_path))
    editor.restore()
    editor.load_edits(str(tmp_path))
    assert editor.num_edits == 3
    assert torch.equal(vllm(batch), edited)
    assert [r.prompt for r in editor.repository.requests] == [s.prompt for s in samples]
    editor.edit(requests(1, offset=9))  # editing continues after a load
    assert editor.num_edits == 4


def test_repository_grows_by_an_eighth_and_fits_a_large_add_exactly():
    from editors.liveedit.repository import ExpertRepository

    def fields(n, value):
        return dict(query_keys=torch.full((n, 2, 4), float(value)), vision_keys=torch.zeros(n, 2, 4),
                    up=torch.zeros(n, 2, 8), down=torch.zeros(n, 2, 8))

    repo = ExpertRepository(eqe_n=2, module_dim=4, rank=2, hidden=8, capacity=4)
    capacities = []
    for i in range(20):
        repo.add([Sample("p", "t", None)], **fields(1, i))
        capacities.append(repo.capacity)
    assert sorted(set(capacities)) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20]
    assert repo.view("query_keys")[:, 0, 0].tolist() == [float(i) for i in range(20)]
    repo.add([Sample("p", "t", None)] * 100, **fields(100, -1))  # beyond one growth step: exact fit
    assert repo.capacity == len(repo) == 120
    assert repo.view("query_keys")[:20, 0, 0].tolist() == [float(i) for i in range(20)]


@torch.no_grad()
def test_routed_logits_do_not_depend_on_the_residual_chunk_size(vllm, editor, monkeypatch):
    import editors.liveedit.features as features_module

    samples = requests(5)
    force_routing(editor)
    editor.edit(samples)
    batch = batch_of(vllm, samples)
    whole = vllm(batch)
    monkeypatch.setattr(features_module, "RESIDUAL_CHUNK_ELEMENTS", 1)  # one expert per chunk
    assert torch.allclose(vllm(batch), whole, atol=1e-5)


def test_similarity_with_keys_in_another_dtype_equals_the_full_cast(monkeypatch):
    import editors.liveedit.routing as routing

    torch.manual_seed(0)
    a, keys = torch.randn(3, 4, 8), torch.randn(50, 4, 8).to(torch.bfloat16)
    expected = routing.similarity(a, keys.float(), 0.5)  # [3, 50]
    monkeypatch.setattr(routing, "CAST_CHUNK_ELEMENTS", 7 * 4 * 8)  # 7 keys per chunk
    assert torch.allclose(routing.similarity(a, keys, 0.5), expected, atol=1e-6)


@torch.no_grad()
def test_repository_and_residual_follow_a_bfloat16_backbone():
    from editors.vllms import build_tiny

    vllm = build_tiny("tiny-blip2").to(torch.bfloat16)
    torch.manual_seed(0)
    editor = load_editor("liveedit", vllm)
    assert editor.repository.dtype == torch.bfloat16  # repository_dtype: auto
    samples = requests(3)
    force_routing(editor)
    batch = batch_of(vllm, samples)
    before = vllm(batch)
    editor.edit(samples)
    after = vllm(batch)
    assert after.dtype == torch.bfloat16 and torch.isfinite(after.float()).all()
    assert all((after[i] != before[i]).any() for i in range(3))
    editor.remove()


def test_gather_spans_of_one_row_equals_the_padded_batch_path():
    from editors.liveedit.routing import gather_spans

    h = torch.randn(3, 10, 4)
    spans = torch.tensor([[2, 7], [0, 3], [4, 10]])
    padded, mask = gather_spans(h, spans)  # [3, 6, 4]
    for i in range(3):
        row, row_mask = gather_spans(h[i:i + 1], spans[i:i + 1])
        n = int(spans[i, 1] - spans[i, 0])
        assert row_mask.all() and row_mask.shape == (1, n)
        assert torch.equal(row[0], padded[i, :n]) and torch.equal(mask[i, :n], row_mask[0])
        assert not mask[i, n:].any() and (padded[i, n:] == 0).all()


# ---- the training step (editors/liveedit/training.py) -------------------------------------------------

@pytest.fixture(scope="module")
def toy_records(tmp_path_factory):
    from utils.data import load_edit_dataset
    from toyworld.world import generate_toyworld

    world = tmp_path_factory.mktemp("liveedit_train") / "toyworld"
    generate_toyworld(world, n_train=4, n_eval=2, n_pretrain_scenes=2)
    return load_edit_dataset("TOY", world / "train.json", world)


def test_training_step_lowers_the_loss_and_only_editor_parameters_get_gradients(toy_records):
    import numpy as np

    from conftest import tiny_vllm
    from editors.liveedit.training import prepare_training_batch, training_step

    vllm = tiny_vllm("tiny-blip2")
    torch.manual_seed(0)
    editor = load_editor("liveedit", vllm)
    try:
        editor.set_train(True)
        optimizer, scheduler = editor.make_optimizer()
        batch = prepare_training_batch(editor, toy_records, np.random.default_rng(0))
        losses = []
        for step in range(20):
            optimizer.zero_grad(set_to_none=True)
            losses.append(training_step(editor, batch)["Loss"])
            if step == 0:
                assert all(p.grad is None for p in vllm.parameters())  # the backbone stays frozen
                params = [(n, p) for m in editor.trainable_modules().values() for n, p in m.named_parameters()]
                assert [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0] == []
            optimizer.step()
            scheduler.step()
        falls = sum(later < earlier for earlier, later in zip(losses, losses[1:]))
        assert losses[-1] < 0.9 * losses[0] and falls >= 15, losses  # 25.5 -> 21.4, falling at 19 of 19 steps
    finally:
        editor.set_train(False)
        editor.remove()


@torch.no_grad()
def test_training_logits_equal_hooked_inference_logits_for_a_selected_expert(vllm, editor):
    """The training path (`_edited_logits`: residual on cached h_le, layers l_e+1.. only) computes what
    the layer edit does in `vllm(batch)` when the row selects exactly the edit's expert."""
    from editors.liveedit.training import SampleGroup, _edited_logits

    force_routing(editor)
    sample = requests(1)[0]
    batch = batch_of(vllm, [sample])
    unedited = vllm(batch)[batch.label_mask]  # [n, V]
    hidden = editor.edit_layer_output(batch)  # [1, l, D]
    keys = editor.make_edit_keys(hidden, batch)
    trained = _edited_logits(editor, SampleGroup(batch, hidden), keys["query_keys"], keys["up"], keys["down"],
                             torch.ones(1, 1, dtype=torch.bool))  # [n, V]
    editor.edit([sample])
    rows, experts, weights = editor.route(hidden, batch)
    assert rows.tolist() == [0] and experts.tolist() == [0] and 0 < float(weights) < 1
    inferred = vllm(batch)[batch.label_mask].float()  # [n, V]
    assert not torch.allclose(inferred, unedited.float(), atol=1e-3)  # the expert does change the logits
    assert torch.allclose(trained, inferred, atol=1e-5)
