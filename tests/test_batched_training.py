"""Batched counterfactual retraining equals one ``train(exclude=...)`` per removal set (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from influence.data.datasets import TextClassificationDataset
from influence.exceptions import InvalidArgumentError
from influence.models.batched_training import train_without
from influence.models.text import TextClassifier
from influence.models.training import _permutation, train
from influence.regularizers import Proximity
from influence.task import ClassificationTask

N, VOCAB, LENGTH, BATCH = 120, 40, 8, 16


@pytest.fixture(scope="module")
def setting():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (N, LENGTH), generator=g)
    labels = (tokens[:, :3].sum(1) % 2).long()
    data = TextClassificationDataset(tokens, labels, [f"x{i}" for i in range(N)])
    torch.manual_seed(0)
    model = TextClassifier(VOCAB, embed_dim=6, hidden_dim=5).double()
    first_batch = _permutation(N, 3, 0)[:BATCH].tolist()  # a removal that empties a whole batch (its step is skipped)
    removals = [[], [0, 5, 17], list(range(0, N, 4)), first_batch, [N - 1]]
    return data, model, removals


def one_at_a_time(model, data, removed, **options):
    copied = copy.deepcopy(model)
    result = train(copied, ClassificationTask(), data, exclude=removed, **options)
    return copied.state_dict(), result.steps


@pytest.mark.parametrize(("optimizer", "extra"), [
    ("adam", {"l2": 1e-3, "l2_names": ["encoder", "head"], "proximity": "embedding"}),
    ("sgd", {"trainable": ["encoder", "head"], "l2": 1e-2}),
])
def test_batched_retraining_equals_one_run_per_removal(setting, optimizer, extra):
    data, model, removals = setting
    options = {"epochs": 2, "batch_size": BATCH, "learning_rate": 0.05, "seed": 3, "optimizer": optimizer, **extra}
    if options.get("proximity") == "embedding":
        options["proximity"] = Proximity(0.1, {"embedding.weight": model.embedding.weight.detach().clone() + 0.01})
    before = copy.deepcopy(model.state_dict())
    batched = train_without(model, ClassificationTask(), data, removals, group_size=2, **options)
    for name, value in model.state_dict().items():  # the model is left as it was
        assert torch.equal(value, before[name])
    assert len(batched.states) == len(removals)
    for removed, state, steps in zip(removals, batched.states, batched.steps):
        expected, expected_steps = one_at_a_time(model, data, removed, **options)
        assert steps == expected_steps
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-11, msg=f"{name} of removal {removed[:4]}")
    assert batched.steps[3] == batched.steps[0] - 1  # the emptied batch was skipped, as train() skips it


def test_members_differ_from_each_other(setting):
    data, model, removals = setting
    batched = train_without(model, ClassificationTask(), data, removals[:2], epochs=1, batch_size=BATCH,
                            learning_rate=0.05, seed=3)
    assert not torch.equal(batched.states[0]["head.weight"], batched.states[1]["head.weight"])


class Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TextClassifier(VOCAB, embed_dim=4, hidden_dim=3).double()
        self.drop = nn.Dropout(0.5)

    def forward(self, tokens):
        return self.drop(self.inner(tokens))


def test_invalid_arguments(setting):
    data, model, _ = setting
    options = {"epochs": 1, "batch_size": BATCH, "learning_rate": 0.05, "seed": 0}
    task = ClassificationTask()
    with pytest.raises(InvalidArgumentError, match="removals"):
        train_without(model, task, data, [], **options)
    with pytest.raises(InvalidArgumentError, match=r"removals\[1\]"):
        train_without(model, task, data, [[0], [N]], **options)
    with pytest.raises(InvalidArgumentError, match="distinct"):
        train_without(model, task, data, [[1, 1]], **options)
    with pytest.raises(InvalidArgumentError, match="group_size"):
        train_without(model, task, data, [[1]], group_size=0, **options)
    with pytest.raises(InvalidArgumentError, match="dropout"):
        train_without(Dropping(), task, data, [[1]], **options)


@pytest.mark.parametrize("embedding", ["frozen", "anchored"])
def test_members_with_their_own_start_and_anchor(setting, embedding):
    """Members carrying different embeddings (as after pretraining without different sentences): frozen,
    or trained with a proximity penalty to each member's own embedding; each equals its own train()."""
    data, model, _ = setting
    g = torch.Generator().manual_seed(5)
    starts = []
    for _ in range(3):
        state = copy.deepcopy(model.state_dict())
        state["embedding.weight"] = state["embedding.weight"] + 0.1 * torch.randn(state["embedding.weight"].shape, generator=g,
                                                                                   dtype=torch.float64)
        starts.append(state)
    options = {"epochs": 2, "batch_size": BATCH, "learning_rate": 0.05, "seed": 1, "l2": 1e-3}
    if embedding == "frozen":
        options["trainable"] = ["encoder", "head"]
        proximities = None
    else:
        options["l2_names"] = ["encoder", "head"]
        proximities = [Proximity(0.3, {"embedding.weight": s["embedding.weight"].clone()}) for s in starts]
    removals = [[], [2, 3], []]
    batched = train_without(model, ClassificationTask(), data, removals, initial_states=starts, proximity=proximities,
                            group_size=2, **options)
    for r, (removed, start) in enumerate(zip(removals, starts)):
        member = copy.deepcopy(model)
        member.load_state_dict(start)
        train(member, ClassificationTask(), data, exclude=removed,
              proximity=None if proximities is None else proximities[r], **options)
        for name, value in member.state_dict().items():
            torch.testing.assert_close(batched.states[r][name], value, rtol=1e-9, atol=1e-11, msg=f"{name} of member {r}")
    if embedding == "frozen":
        assert all(torch.equal(b["embedding.weight"], s["embedding.weight"]) for b, s in zip(batched.states, starts))
    with pytest.raises(InvalidArgumentError, match="initial_states"):
        train_without(model, ClassificationTask(), data, removals, initial_states=starts[:2], **options)
