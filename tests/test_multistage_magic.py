"""Multi-stage MAGIC against actual two-stage retraining (float64, tiny models, both embedding modes).

The models and data are those of ``tests/test_multistage.py``, trained here by
:func:`influence.models.training.train` (minibatches, a fixed number of epochs, no optimum reached):
pretraining of the embedding with its decoder, then finetuning of a classifier on the carried
embedding, frozen (``"fixed"``) or trained with a proximity penalty to it (``"updated"``). For each
removal set of pretraining examples both runs are re-run with ``exclude`` (same seeds, same initial
states, the finetuning started from the re-pretrained embedding) and the actual change of every
query's loss is compared with the sum of the removed examples' scores.
"""

from __future__ import annotations

import pytest
import torch

from influence.exceptions import InvalidArgumentError
from influence.methods.magic import TrainingRecipe
from influence.methods.multistage_magic import multistage_magic_scores
from influence.models.training import train
from influence.regularizers import Proximity
from influence.task import ClassificationTask
from tests.test_multistage import Classifier, Pretrainer, examples, make_data, pearson

PRETRAIN = {"epochs": 2, "batch_size": 50, "learning_rate": 0.5, "seed": 11, "optimizer": "sgd", "l2": 1e-3}
FINETUNE = {"epochs": 4, "batch_size": 10, "learning_rate": 0.3, "seed": 12, "l2": 1e-3}
ALPHA = 0.5
REMOVALS = [[i] for i in range(0, 60, 4)] + [[i, i + 1, i + 2] for i in range(100, 160, 12)]


def pretrain(initial: dict, data, exclude=None) -> Pretrainer:
    model = Pretrainer().double()
    model.load_state_dict(initial)
    train(model, ClassificationTask(), data, exclude=exclude, **PRETRAIN)
    return model


def finetune_recipe(mode: str, head: dict, pretrained: Pretrainer, optimizer: str) -> tuple[dict, dict]:
    """(initial state, the other train() arguments) of a finetuning run on ``pretrained``'s embedding."""
    model = Classifier().double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f"head.{k}": v.clone() for k, v in head.items()})
    state["embedding.weight"] = pretrained.embedding.weight.detach().clone()
    arguments = {**FINETUNE, "optimizer": optimizer, "l2_names": ["head"]}
    if optimizer == "adam":  # Adam's step is about the learning rate per coordinate, whatever the gradient's size
        arguments["learning_rate"] = 0.02
    if mode == "fixed":
        arguments["trainable"] = ["head"]
    else:
        arguments["trainable"] = "all"
        arguments["proximity"] = Proximity(ALPHA, {"embedding.weight": state["embedding.weight"].clone()})
    return state, arguments


def finetune(state: dict, arguments: dict, data) -> Classifier:
    model = Classifier().double()
    model.load_state_dict(state)
    train(model, ClassificationTask(), data, **arguments)
    return model


def query_losses(model, queries) -> torch.Tensor:
    with torch.no_grad():
        batch = torch.utils.data.default_collate(queries)
        return ClassificationTask().train_loss(model, batch)


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(3)
    data = make_data()
    pretrain_data = examples(data["context"], data["target"])
    finetune_data = examples(data["sentences"], data["labels"])
    queries = examples(data["queries"], data["query_labels"])
    initial = {k: v.clone() for k, v in Pretrainer().double().state_dict().items()}
    head = {k: v.clone() for k, v in Classifier().double().head.state_dict().items()}
    pretrained = pretrain(initial, pretrain_data)
    return {"data": (pretrain_data, finetune_data, queries), "initial": initial, "head": head, "pretrained": pretrained}


@pytest.mark.parametrize(("mode", "optimizer"), [("fixed", "sgd"), ("updated", "sgd"), ("updated", "adam")])
def test_multistage_magic_predicts_two_stage_retraining(runs, mode, optimizer):
    pretrain_data, finetune_data, queries = runs["data"]
    pretrained = runs["pretrained"]
    state, arguments = finetune_recipe(mode, runs["head"], pretrained, optimizer)
    finetuned = finetune(state, arguments, finetune_data)
    task = ClassificationTask()
    scores = multistage_magic_scores(
        task, pretrained, pretrain_data, task, finetuned, finetune_data, queries,
        pretraining=TrainingRecipe(initial_state=runs["initial"], **PRETRAIN),
        finetuning=TrainingRecipe(initial_state=state, **arguments),
    )
    assert scores.shape == (len(queries), len(pretrain_data))
    base = query_losses(finetuned, queries)
    predicted = torch.stack([scores[:, removed].sum(dim=1) for removed in REMOVALS], dim=1)
    actual = torch.zeros_like(predicted)
    for column, removed in enumerate(REMOVALS):
        again = pretrain(runs["initial"], pretrain_data, exclude=removed)
        state_again, arguments_again = finetune_recipe(mode, runs["head"], again, optimizer)
        actual[:, column] = query_losses(finetune(state_again, arguments_again, finetune_data), queries) - base
    correlation = pearson(predicted, actual)
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    print(f"multi-stage MAGIC, {mode}, {optimizer}: Pearson {correlation:.4f}, slope {slope:.3f}")
    assert correlation >= 0.95
    assert 0.8 <= slope <= 1.25


def test_a_finetuning_recipe_that_does_not_reproduce_the_model_is_refused(runs):
    pretrain_data, finetune_data, queries = runs["data"]
    state, arguments = finetune_recipe("fixed", runs["head"], runs["pretrained"], "sgd")
    finetuned = finetune(state, arguments, finetune_data)
    task = ClassificationTask()
    wrong = TrainingRecipe(initial_state=state, **{**arguments, "seed": arguments["seed"] + 1})
    with pytest.raises(InvalidArgumentError, match="finetuning"):
        multistage_magic_scores(task, runs["pretrained"], pretrain_data, task, finetuned, finetune_data, queries,
                                pretraining=TrainingRecipe(initial_state=runs["initial"], **PRETRAIN), finetuning=wrong)


def test_a_query_word_that_no_finetuning_example_holds_keeps_the_scores_finite(runs):
    """Updated mode, Adam: a word of the queries that no finetuning sentence holds keeps its pretrained row
    (its gradient is exactly 0 at every step: the proximity penalty of a row that never moved). The
    replay's ``1/eps`` factors of such a row overflowed into NaN scores; its derivative is the identity."""
    pretrain_data, finetune_data, queries = runs["data"]
    unseen = 1
    sentences = torch.stack([finetune_data[i]["tokens"] for i in range(len(finetune_data))])
    labels = torch.stack([finetune_data[i]["label"] for i in range(len(finetune_data))])
    sentences = torch.where(sentences == unseen, torch.full_like(sentences, 2), sentences)
    finetune_data = examples(sentences, labels)
    query_tokens = torch.stack([queries[i]["tokens"] for i in range(len(queries))])
    query_tokens[:, 0] = unseen
    queries = examples(query_tokens, torch.stack([queries[i]["label"] for i in range(len(queries))]))
    pretrained = runs["pretrained"]
    state, arguments = finetune_recipe("updated", runs["head"], pretrained, "adam")
    finetuned = finetune(state, arguments, finetune_data)
    assert torch.equal(finetuned.embedding.weight[unseen], pretrained.embedding.weight[unseen])  # the row never moved
    task = ClassificationTask()
    scores = multistage_magic_scores(
        task, pretrained, pretrain_data, task, finetuned, finetune_data, queries,
        pretraining=TrainingRecipe(initial_state=runs["initial"], **PRETRAIN),
        finetuning=TrainingRecipe(initial_state=state, **arguments),
    )
    assert torch.isfinite(scores).all()
    base = query_losses(finetuned, queries)
    removals = REMOVALS[::2]
    predicted = torch.stack([scores[:, removed].sum(dim=1) for removed in removals], dim=1)
    actual = torch.zeros_like(predicted)
    for column, removed in enumerate(removals):
        again = pretrain(runs["initial"], pretrain_data, exclude=removed)
        state_again, arguments_again = finetune_recipe("updated", runs["head"], again, "adam")
        actual[:, column] = query_losses(finetune(state_again, arguments_again, finetune_data), queries) - base
    correlation = pearson(predicted, actual)
    print(f"multi-stage MAGIC with an unseen query word: Pearson {correlation:.4f}")
    assert correlation >= 0.95
