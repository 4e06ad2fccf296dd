"""Seeded initialisation from a private generator: the weights of ``torch.manual_seed``, the global generator untouched,
safe on parallel threads while other threads draw random numbers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from influence.exceptions import InvalidArgumentError
from influence.models import CbowLanguageModel, TextClassifier
from influence.models.seeding import build_seeded, seeded_init


def _builders():
    def mixed():
        model = nn.Sequential(nn.Embedding(50, 8), nn.Conv1d(8, 4, 3), nn.Linear(4, 2), nn.LSTM(4, 4), nn.LayerNorm(4))
        nn.init.xavier_normal_(model[2].weight)
        nn.init.trunc_normal_(model[2].bias.data.view(1, -1))
        with torch.no_grad():
            model[4].weight.normal_(0, 0.02)
            model[4].bias.copy_(torch.randn(4))
        return model

    builders = {"text_classifier": lambda: TextClassifier(vocab_size=60, embed_dim=8, hidden_dim=6, num_classes=3),
                "cbow": lambda: CbowLanguageModel(vocab_size=60, embed_dim=8, hidden_dim=6),
                "mixed": mixed}
    try:
        from transformers import BertConfig

        from influence.models.minilm import MiniLMClassifier

        config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                            max_position_embeddings=16)
        builders["minilm"] = lambda: MiniLMClassifier(config, num_classes=2)
    except ImportError:  # transformers is a dependency of the lock; kept optional for a bare library install
        pass
    return builders


BUILDERS = _builders()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_weights_as_manual_seed_and_global_generator_untouched(name):
    build = BUILDERS[name]
    torch.manual_seed(7)
    reference = _state(build())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seeded = _state(build_seeded(build, 7))
    assert torch.equal(torch.get_rng_state(), before), "a draw went to the global generator"
    assert _equal(seeded, reference)
    assert not _equal(_state(build_seeded(build, 8)), reference)  # the seed matters


def test_parallel_builds_match_alone_while_another_thread_draws():
    """Eight threads build models of four seeds, 25 times each, while a ninth thread keeps drawing from (and
    re-seeding) the global generator: every model equals the one built alone. The old way (seed the global
    generator, then build) has no such guarantee."""
    build = BUILDERS["text_classifier"]
    alone = {seed: _state(build_seeded(build, seed)) for seed in range(4)}
    stop = threading.Event()

    def hostile():
        while not stop.is_set():
            torch.manual_seed(99)
            torch.rand(64)
            nn.Linear(8, 8)

    def work(seed: int) -> bool:
        return all(_equal(_state(build_seeded(build, seed)), alone[seed]) for _ in range(25))

    noise = threading.Thread(target=hostile)
    noise.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(work, [0, 1, 2, 3] * 2))
    finally:
        stop.set()
        noise.join()
    assert all(results)


def test_other_threads_are_not_redirected():
    """The private generator belongs to the thread that opened the block: another thread's draws inside the
    block still come from (and advance) the global generator, and do not advance the private one."""
    entered, drawn = threading.Event(), threading.Event()
    found = {}

    def other():
        entered.wait()
        torch.manual_seed(5)
        found["other"] = torch.rand(3)
        drawn.set()

    thread = threading.Thread(target=other)
    thread.start()
    with seeded_init(11) as generator:
        entered.set()
        drawn.wait()
        mine = torch.rand(3)
    thread.join()
    assert torch.equal(found["other"], torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(mine, torch.rand(3, generator=torch.Generator().manual_seed(11)))
    assert generator is not None


def test_explicit_generator_is_kept_and_bad_seed_named():
    own = torch.Generator().manual_seed(3)
    with seeded_init(11):
        drawn = torch.rand(2, generator=own)
        positional = nn.init.uniform_(torch.empty(2), 0.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.rand(2, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(positional, drawn)
    with pytest.raises(InvalidArgumentError, match="seed"):
        with seeded_init(-1):
            pass
