"""Tests of influence.models: the two text models, the training loop, checkpoints and resume.

Everything is tiny (vocabulary 30, widths 8) so the file runs in seconds on two shared cores.
Numerical checks run in float64 against brute-force references (a loop of ``autograd.grad``,
reverse-over-reverse double backward, central finite differences).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import Dataset

from influence.exceptions import CacheMismatchError, CorruptedArtifactError, InvalidArgumentError
from influence.models import (
    CbowLanguageModel,
    CheckpointInfo,
    Proximity,
    Regularizer,
    TextClassifier,
    evaluate_accuracy,
    load_metadata,
    load_state,
    mean_loss,
    read_manifest,
    save_state,
    train,
    transfer_embedding,
    write_manifest,
)
from influence.task import ClassificationTask, LanguageModelingTask

VOCAB = 30


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n: int, length: int, seed: int = 0, min_len: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (n, length), generator=generator)
    lengths = torch.randint(min_len, length + 1, (n,), generator=generator)
    tokens[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens


def _classification_data(n: int = 40, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = _tokens(n, length, seed)
    # A learnable rule: label 1 when token 5 appears.
    return {"tokens": tokens, "label": (tokens == 5).any(dim=1).long()}


class DictDataset(Dataset):
    """Map-style dataset of examples without the batch dimension, like the pipeline's."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return next(iter(self.batch.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.batch.items()}


def _classifier(seed: int = 1) -> TextClassifier:
    torch.manual_seed(seed)
    return TextClassifier(VOCAB, embed_dim=8, hidden_dim=8)


def _cbow(seed: int = 1) -> CbowLanguageModel:
    torch.manual_seed(seed)
    return CbowLanguageModel(VOCAB, embed_dim=8, hidden_dim=8, window=2)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- models -----------------------------------------------------------------------------------


def test_shapes_and_module_names():
    tokens = _tokens(5, 7)
    classifier, cbow = _classifier(), _cbow()
    assert classifier(tokens).shape == (5, 2)
    assert cbow(tokens).shape == (5, 7, VOCAB)
    assert {n for n, _ in classifier.named_children()} == {"embedding", "encoder", "head"}
    assert {n for n, _ in cbow.named_children()} == {"embedding", "context", "output"}
    assert isinstance(classifier.embedding, torch.nn.Embedding)
    assert isinstance(classifier.head, torch.nn.Linear)
    with pytest.raises(InvalidArgumentError):
        classifier(tokens[0])


def test_padding_does_not_affect_outputs():
    tokens = _tokens(6, 8)
    longer = torch.cat([tokens, torch.zeros(6, 5, dtype=torch.long)], dim=1)
    classifier, cbow = _classifier(), _cbow()
    torch.testing.assert_close(classifier(longer), classifier(tokens), rtol=1e-6, atol=1e-6)
    mask = tokens != 0
    torch.testing.assert_close(cbow(longer)[:, :8][mask], cbow(tokens)[mask], rtol=1e-6, atol=1e-6)
    # The pad row of the embedding is never read.
    before_c, before_l = classifier(tokens), cbow(tokens)[mask]
    with torch.no_grad():
        classifier.embedding.weight[0].fill_(3.0)
        cbow.embedding.weight[0].fill_(3.0)
    torch.testing.assert_close(classifier(tokens), before_c)
    torch.testing.assert_close(cbow(tokens)[mask], before_l)


def test_cbow_prediction_ignores_the_word_itself_and_far_words():
    cbow = _cbow()
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    changed = tokens.clone()
    changed[0, 4] = 20
    before, after = cbow(tokens), cbow(changed)
    torch.testing.assert_close(after[0, 4], before[0, 4], rtol=0, atol=0)
    for t in (2, 3, 5, 6):  # neighbours within the window see the change
        assert not torch.allclose(after[0, t], before[0, t])
    for t in (0, 1, 7):  # beyond the window of 2
        torch.testing.assert_close(after[0, t], before[0, t], rtol=0, atol=0)


def test_transfer_embedding():
    cbow, classifier = _cbow(seed=3), _classifier(seed=4)
    transfer_embedding(cbow, classifier)
    assert torch.equal(classifier.embedding.weight, cbow.embedding.weight)
    with pytest.raises(InvalidArgumentError):
        transfer_embedding(cbow, TextClassifier(VOCAB + 1, embed_dim=8, hidden_dim=8))


def _functional(model):
    def loss(params, task, example):
        batch = {k: v.unsqueeze(0) for k, v in example.items()}
        return task.train_loss(lambda x: functional_call(model, params, (x,)), batch)[0]

    return loss


@pytest.mark.parametrize("kind", ["classifier", "cbow"])
def test_vmap_per_example_gradients_match_a_loop(kind):
    model = (_classifier() if kind == "classifier" else _cbow()).double()
    task = ClassificationTask() if kind == "classifier" else LanguageModelingTask(padding_idx=0)
    batch = _classification_data(n=5, length=7) if kind == "classifier" else {"tokens": _tokens(5, 7)}
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = _functional(model)
    batched = vmap(grad(loss), in_dims=(None, None, 0))(params, task, batch)
    for i in range(5):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        expected = torch.autograd.grad(task.train_loss(model, example)[0], list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), expected):
            torch.testing.assert_close(batched[name][i], g, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["classifier", "cbow"])
def test_hessian_vector_products_agree(kind):
    """Forward-over-reverse HVP = reverse-over-reverse = finite differences, with a regulariser."""
    model = (_classifier() if kind == "classifier" else _cbow()).double()
    task = ClassificationTask() if kind == "classifier" else LanguageModelingTask(padding_idx=0)
    batch = _classification_data(n=6, length=7) if kind == "classifier" else {"tokens": _tokens(6, 7)}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    reference = {"embedding.weight": params["embedding.weight"] + 0.1}
    regularizer = Regularizer(l2=0.01, proximity=Proximity(0.5, reference))

    def objective(p):
        data = task.train_loss(lambda x: functional_call(model, p, (x,)), batch).mean()
        return data + regularizer(p)

    generator = torch.Generator().manual_seed(0)
    v = {k: torch.randn(t.shape, generator=generator, dtype=t.dtype) for k, t in params.items()}
    _, forward_reverse = jvp(grad(objective), (params,), (v,))
    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    g = torch.autograd.grad(objective(leaves), list(leaves.values()), create_graph=True)
    reverse_reverse = torch.autograd.grad(
        sum((a * v[k]).sum() for a, k in zip(g, leaves)), list(leaves.values())
    )
    eps = 1e-5
    plus = grad(objective)({k: params[k] + eps * v[k] for k in params})
    minus = grad(objective)({k: params[k] - eps * v[k] for k in params})
    for name, rr in zip(leaves, reverse_reverse):
        torch.testing.assert_close(forward_reverse[name], rr, rtol=1e-8, atol=1e-10)
        finite = (plus[name] - minus[name]) / (2 * eps)
        torch.testing.assert_close(forward_reverse[name], finite, rtol=1e-5, atol=1e-7)


# -- penalties --------------------------------------------------------------------------------


def test_regularizer_value_and_names():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    ref = {"a": torch.tensor([0.0, 1.0])}
    reg = Regularizer(l2=0.5, proximity=Proximity(4.0, ref), l2_names=("a",))
    # (0.5 / 2) * (1 + 4) + (4 / 2) * (1 + 1); "b" is outside l2_names.
    torch.testing.assert_close(reg({"a": a, "b": b}), torch.tensor(1.25 + 4.0))
    assert Regularizer().is_zero and not reg.is_zero
    with pytest.raises(InvalidArgumentError):
        Proximity(-1.0, ref)
    with pytest.raises(InvalidArgumentError):
        Regularizer(l2=float("nan"))


# -- training ---------------------------------------------------------------------------------


def _train_classifier(model, **options):
    defaults = dict(epochs=3, batch_size=8, learning_rate=0.05, seed=0)
    defaults.update(options)
    data = defaults.pop("data", None) or _classification_data()
    return train(model, ClassificationTask(), data, **defaults)


def test_training_is_deterministic_and_learns():
    data = _classification_data()
    a, b, c = _classifier(), _classifier(), _classifier()
    result_a = _train_classifier(a, data=DictDataset(data), epochs=6)
    result_b = _train_classifier(b, data=data, epochs=6)
    _train_classifier(c, data=data, epochs=6, seed=1)
    assert _same_weights(a, b)
    assert result_a.losses == result_b.losses
    assert not _same_weights(a, c)
    assert result_a.steps == 6 * 5 and result_a.checkpoints == []
    assert result_a.losses[-1] < result_a.losses[0]
    assert evaluate_accuracy(a, data, batch_size=7) > 0.6
    with torch.no_grad():
        expected_accuracy = (a(data["tokens"]).argmax(1) == data["label"]).double().mean().item()
        expected_loss = ClassificationTask().train_loss(a, data).mean().item()
    assert evaluate_accuracy(a, DictDataset(data), batch_size=7) == pytest.approx(expected_accuracy)
    assert mean_loss(ClassificationTask(), a, data, batch_size=7) == pytest.approx(expected_loss, rel=1e-6)


def test_exclude_keeps_the_full_runs_batches_less_the_excluded_examples():
    """Brute force: plain SGD by hand over the whole run's seeded batches, the excluded rows dropped."""
    from influence.models.training import _permutation

    data = _classification_data()
    n = data["label"].shape[0]
    excluded = [0, 3, 4, 17, 30, 31, 38]
    model, by_hand = _classifier().double(), _classifier().double()
    _train_classifier(model, data=data, epochs=3, optimizer="sgd", exclude=excluded)
    params = dict(by_hand.named_parameters())
    kept = torch.ones(n, dtype=torch.bool)
    kept[excluded] = False
    for epoch in range(3):
        order = _permutation(n, 0, epoch)
        for start in range(0, n, 8):
            rows = order[start:start + 8]
            rows = rows[kept[rows]]
            if rows.numel() == 0:
                continue
            loss = ClassificationTask().train_loss(by_hand, {k: v[rows] for k, v in data.items()}).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p -= 0.05 * g
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, by_hand.state_dict()[name], rtol=1e-12, atol=1e-12)
    # excluding nothing is the ordinary run, bit for bit; excluding changes it
    a, b, c = _classifier(), _classifier(), _classifier()
    _train_classifier(a, data=data)
    _train_classifier(b, data=data, exclude=[])
    _train_classifier(c, data=data, exclude=[5])
    assert _same_weights(a, b) and not _same_weights(a, c)
    with pytest.raises(InvalidArgumentError, match="exclude"):
        _train_classifier(_classifier(), data=data, exclude=[1, 1])
    with pytest.raises(InvalidArgumentError, match="exclude"):
        _train_classifier(_classifier(), data=data, exclude=[n])


def test_language_model_trains_and_threads_are_restored():
    cbow = _cbow()
    tokens = _tokens(40, 8)
    torch.set_num_threads(2)
    try:
        result = train(cbow, LanguageModelingTask(padding_idx=0), DictDataset({"tokens": tokens}),
                       epochs=4, batch_size=10, learning_rate=0.05, seed=0, optimizer="sgd", num_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert result.steps == 16 and result.losses[-1] < result.losses[0]


def test_frozen_parameters_stay_unchanged():
    model = _classifier()
    embedding = model.embedding.weight.detach().clone()
    encoder = model.encoder.weight.detach().clone()
    result = _train_classifier(model, trainable=["encoder", "head"], l2=0.01)
    assert torch.equal(model.embedding.weight, embedding)
    assert not model.embedding.weight.requires_grad
    assert not torch.equal(model.encoder.weight, encoder)
    assert result.trainable == ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
    assert result.regularizer.l2_names == tuple(result.trainable)
    assert all(total > data for total, data in zip(result.losses, result.data_losses))


def test_proximity_pulls_towards_the_reference():
    reference_model = _classifier(seed=7)
    reference = {"embedding.weight": reference_model.embedding.weight.detach().clone()}

    def distance(alpha):
        model = _classifier(seed=7)
        with torch.no_grad():  # start away from the reference
            model.embedding.weight.add_(1.0)
        _train_classifier(model, proximity=Proximity(alpha, reference), epochs=4, learning_rate=0.01,
                          optimizer="sgd")
        return (model.embedding.weight - reference["embedding.weight"]).norm().item()

    start = (torch.ones_like(reference["embedding.weight"])).norm().item()
    strong, none = distance(50.0), distance(0.0)
    assert strong < 0.01 * start
    assert none > 0.5 * start


def test_invalid_arguments_raise():
    model = _classifier()
    with pytest.raises(InvalidArgumentError):
        _train_classifier(model, num_threads=0)
    with pytest.raises(InvalidArgumentError):
        _train_classifier(model, optimizer="lbfgs")
    with pytest.raises(InvalidArgumentError):
        _train_classifier(model, checkpoint_every=2)
    with pytest.raises(InvalidArgumentError):
        _train_classifier(model, batch_size=0)
    with pytest.raises(InvalidArgumentError):
        _train_classifier(model, trainable=["decoder"])
    with pytest.raises(InvalidArgumentError):
        _train_classifier(model, proximity=Proximity(1.0, {"head.weight": torch.zeros(3, 3)}))


# -- checkpoints and resume -------------------------------------------------------------------


def test_checkpoints_manifest_records_steps_and_learning_rates(tmp_path):
    model = _classifier()
    result = _train_classifier(model, checkpoint_dir=tmp_path, checkpoint_every=4, learning_rate=0.02)
    # 40 examples / 8 = 5 steps per epoch, 15 steps: every 4 steps plus the last one.
    assert [c.step for c in result.checkpoints] == [4, 8, 12, 15]
    assert all(c.learning_rate == 0.02 for c in result.checkpoints)
    assert read_manifest(tmp_path) == result.checkpoints
    final = load_state(result.checkpoints[-1].path)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    assert load_metadata(result.checkpoints[0].path)["step"] == "4"
    assert not (tmp_path / "resume.safetensors").exists()
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_after_interruption_is_bit_identical(tmp_path, optimizer):
    options = dict(checkpoint_every=3, optimizer=optimizer, l2=0.01, epochs=3)
    uninterrupted = _classifier()
    expected = _train_classifier(uninterrupted, checkpoint_dir=tmp_path / "a", **options)

    def kill_at_step_6(event):  # step 6 is in the middle of epoch 2
        if event["event"] == "checkpoint" and event["step"] == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        _train_classifier(_classifier(), checkpoint_dir=tmp_path / "b", log=kill_at_step_6, **options)
    assert (tmp_path / "b" / "resume.safetensors").exists()
    resumed_model = _classifier()
    resumed = _train_classifier(resumed_model, checkpoint_dir=tmp_path / "b", **options)
    assert resumed.resumed_from_step == 6
    assert _same_weights(resumed_model, uninterrupted)
    assert resumed.losses == expected.losses
    assert resumed.data_losses == expected.data_losses
    assert [c.step for c in resumed.checkpoints] == [c.step for c in expected.checkpoints]
    for a, b in zip(resumed.checkpoints, expected.checkpoints):
        sa, sb = load_state(a.path), load_state(b.path)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # A corrupted resume state is refused, naming the file.
    with pytest.raises(Interrupted):
        _train_classifier(_classifier(), checkpoint_dir=tmp_path / "c", log=kill_at_step_6, **options)
    (tmp_path / "c" / "resume.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptedArtifactError, match="resume.safetensors"):
        _train_classifier(_classifier(), checkpoint_dir=tmp_path / "c", **options)

    # A finished run is loaded, not retrained.
    loaded_model = _classifier()
    loaded = _train_classifier(loaded_model, checkpoint_dir=tmp_path / "b", **options)
    assert loaded.resumed_from_step == loaded.steps == 15
    assert loaded.losses == expected.losses and loaded.data_losses == expected.data_losses
    assert _same_weights(loaded_model, uninterrupted)


def test_other_arguments_are_refused_unless_overwrite(tmp_path):
    _train_classifier(_classifier(), checkpoint_dir=tmp_path, checkpoint_every=4)
    with pytest.raises(CacheMismatchError, match="learning_rate"):
        _train_classifier(_classifier(), checkpoint_dir=tmp_path, checkpoint_every=4, learning_rate=0.01)
    other_data = _classification_data(seed=5)
    with pytest.raises(CacheMismatchError, match="dataset"):
        _train_classifier(_classifier(), checkpoint_dir=tmp_path, checkpoint_every=4, data=other_data)
    fresh = _classifier()
    result = _train_classifier(fresh, checkpoint_dir=tmp_path, checkpoint_every=4, learning_rate=0.01,
                               overwrite=True)
    assert result.resumed_from_step == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["arguments"]["learning_rate"] == 0.01 and manifest["complete"]


def test_safetensors_round_trip_and_corruption(tmp_path):
    state = {"w": torch.randn(3, 4, dtype=torch.float64), "i": torch.arange(5), "s": torch.tensor(2.5)}
    state["view"] = state["w"][:, 1]  # non-contiguous, shares storage
    path = save_state(state, tmp_path / "sub" / "state.safetensors", {"note": "hello"})
    loaded = load_state(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)
    assert load_metadata(path) == {"note": "hello"}
    model = _classifier()
    save_state(model, tmp_path / "model.safetensors")
    other = _classifier(seed=9)
    other.load_state_dict(load_state(tmp_path / "model.safetensors"))
    assert _same_weights(model, other)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptedArtifactError, match="broken.safetensors"):
        load_state(broken)
    with pytest.raises(CorruptedArtifactError, match="missing.safetensors"):
        load_state(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidArgumentError):
        save_state(state, tmp_path / "x.safetensors", {"step": 3})


def test_manifest_round_trip(tmp_path):
    infos = [CheckpointInfo(tmp_path / "step-00000002.safetensors", 2, 0.1),
             CheckpointInfo(tmp_path / "step-00000004.safetensors", 4, 0.05)]
    write_manifest(tmp_path, infos, arguments={"seed": 0})
    assert read_manifest(tmp_path) == infos
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptedArtifactError, match="manifest.json"):
        read_manifest(tmp_path)


@pytest.mark.gpu
def test_training_on_cuda_matches_cpu_and_checkpoints_load_on_cpu(tmp_path):
    on_cpu, on_gpu = _classifier(), _classifier()
    options = dict(epochs=2, checkpoint_every=4, l2=0.01, optimizer="sgd",
                   proximity=Proximity.from_model(on_cpu, "embedding", 1.0))
    _train_classifier(on_cpu, checkpoint_dir=tmp_path / "cpu", **options)
    result = _train_classifier(on_gpu, device="cuda", checkpoint_dir=tmp_path / "gpu", **options)
    assert all(p.is_cuda for p in on_gpu.parameters())
    back = _classifier(seed=9)
    back.load_state_dict(load_state(result.checkpoints[-1].path))
    for name, value in on_cpu.state_dict().items():  # CUDA kernels may round differently
        torch.testing.assert_close(back.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_the_same_state_and_metadata_give_the_same_bytes():
    """safetensors writes its metadata from a hash map (an order that changes from call to call): the header is
    rewritten with sorted keys, so a checkpoint's sha256 (in its manifest, in the object store) is stable."""
    import hashlib

    import safetensors.torch

    from influence.models.checkpoints import load_metadata, state_bytes

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    metadata = {"step": "4", "learning_rate": "0.01", "note": "é"}
    digests = {hashlib.sha256(state_bytes(state, metadata)).hexdigest() for _ in range(40)}
    assert len(digests) == 1
    raw = state_bytes(state, metadata)
    loaded = safetensors.torch.load(raw)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    headers = {safetensors.torch.save(state, metadata=metadata)[8:100] for _ in range(40)}
    assert len(headers) > 1  # what safetensors alone does (the reason for the rewrite)
    path = Path(tempfile.mkdtemp()) / "state.safetensors"
    path.write_bytes(raw)
    assert load_metadata(path) == metadata
