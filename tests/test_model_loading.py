"""Model loading: --model_type validation, dtype fallback, tokenizer pad token, adapter dirs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from rlhf.args import LoraArguments, ModelArguments
from rlhf.errors import CheckpointError, ConfigError
from rlhf.models import family_of, load_causal_lm, load_config, load_tokenizer, resolve_dtype
from rlhf.models.lora import LoraSpec
from rlhf.sft.stage import build_sft_model
from rlhf.training import make_trainable


def float16_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` saved in float16 (its config.json then records ``"dtype": "float16"``, as most real
    Llama/Mistral checkpoints do), with its tokenizer files."""
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


@pytest.mark.parametrize(
    "name, family",
    [("llama", "llama"), ("llama-2-7b", "llama"), ("LLaMA-1-13b", "llama"), ("mistral-7b-instruct-v0.2", "mistral"),
     ("mixtral-8x7b-instruct-v0.1", "mixtral"), ("qwen2", "qwen2"), ("qwen-72b", "qwen")],
)  # fmt: skip
def test_model_type_names(name, family):
    assert family_of(name) == family


def test_unknown_model_type_lists_accepted_names():
    with pytest.raises(ConfigError, match=r"--model_type 'gpt-9' is not supported \(accepted: llama, "):
        family_of("gpt-9")


def test_model_type_mismatch_is_a_clear_error(tiny_model_factory):
    path = tiny_model_factory("mistral")
    with pytest.raises(
        ConfigError, match=r'--model_type llama-2-7b expects a llama checkpoint, but .* "mistral"'
    ):
        load_config(str(path), "llama-2-7b")


def test_model_type_inferred_when_absent(tiny_llama):
    assert load_config(str(tiny_llama)).model_type == "llama"


def test_missing_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_config(str(tmp_path / "missing"))


def test_a_file_given_as_the_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="weights.bin: a file, not a model directory"):
        load_config(str(tmp_path / "weights.bin"))


def test_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_config(str(tmp_path))


def test_half_precision_without_gpu_falls_back_to_float32(caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    import rlhf.models.loading as loading

    monkeypatch.setattr(loading, "_precision_fallback_warned", False)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("float16") == torch.float32
    assert "--torch_dtype float16 needs a GPU" in caplog.text
    assert resolve_dtype("auto") == "auto" and resolve_dtype("float32") == torch.float32


def test_auto_is_the_checkpoint_dtype_under_the_same_gpu_rule(tiny_llama, tmp_path, caplog, monkeypatch):
    import rlhf.models.loading as loading

    half = load_config(str(float16_copy(tiny_llama, tmp_path / "fp16")))
    monkeypatch.setattr(loading, "_precision_fallback_warned", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto", half) == torch.float16  # a GPU: PPO's frozen base may stay in half
    assert resolve_dtype("auto", load_config(str(tiny_llama))) == torch.float32
    assert resolve_dtype("auto") == "auto"  # no checkpoint to read: transformers decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("auto", half) == torch.float32
    assert "--torch_dtype auto (a float16 checkpoint) needs a GPU" in caplog.text


def test_float16_checkpoint_loads_in_float32_without_gpu_under_auto(tiny_llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    path = float16_copy(tiny_llama, tmp_path / "fp16")
    assert {p.dtype for p in load_causal_lm(str(path)).parameters()} == {torch.float32}


def test_full_fine_tuning_of_a_float16_checkpoint_under_auto_trains_float32_weights(tiny_llama, tmp_path):
    path = float16_copy(tiny_llama, tmp_path / "fp16")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    model = build_sft_model(ModelArguments(model_name_or_path=str(path)), LoraArguments(lora_rank=-1), args)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # as on a GPU, where auto loads the float16 weights as they are: full training still upcasts them
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    full = make_trainable(loaded, LoraSpec(rank=-1))
    assert {p.dtype for p in full.parameters() if p.requires_grad} == {torch.float32}
    lora = make_trainable(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16), LoraSpec(rank=4))
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.float16}  # frozen base


def test_bad_dtype():
    with pytest.raises(ConfigError, match="--torch_dtype must be one of"):
        resolve_dtype("float8")


def test_tokenizer_without_pad_token_gets_one(tiny_llama, tmp_path):
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tiny_llama / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token


def test_adapter_dir_loads_onto_its_base(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    loaded = load_causal_lm(str(tmp_path / "adapter"), torch_dtype="float32")
    merged = load_causal_lm(str(tmp_path / "adapter"), torch_dtype="float32", merge_adapter=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    assert not hasattr(merged, "peft_config")


class RunsCode:
    """Unpickling this runs ``open(marker, "w")``: what a malicious ``pytorch_model.bin`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_weights_file_that_runs_code_is_refused_in_one_line(tiny_llama, tmp_path):
    from rlhf.reward.model import load_reward_model

    model_dir = shutil.copytree(tiny_llama, tmp_path / "evil", ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "code_ran"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, model_dir / "pytorch_model.bin")
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(CheckpointError, match="holds more than tensors and is not loaded") as exc:
            load(str(model_dir))
        assert "GLOBAL" in str(exc.value) and "io.open" in str(exc.value) and not marker.exists()


def test_checkpoint_code_needs_the_flag_and_a_builtin_type_says_its_code_is_not_run(
    tiny_llama, tmp_path, caplog
):
    custom = shutil.copytree(tiny_llama, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_my.MyConfig"}
    (custom / "config.json").write_text(json.dumps(config | {"model_type": "mycustom", "auto_map": auto_map}))
    (custom / "configuration_my.py").write_text("from transformers import LlamaConfig as MyConfig\n")
    with pytest.raises(
        CheckpointError, match="contains custom code.*; pass --trust_remote_code to run the code"
    ):
        load_config(str(custom))
    builtin = shutil.copytree(tiny_llama, tmp_path / "builtin")
    (builtin / "config.json").write_text(json.dumps(config | {"auto_map": auto_map}))
    with caplog.at_level(logging.WARNING):
        assert load_config(str(builtin)).model_type == "llama"
    assert "names code of its own (auto_map) for the model type 'llama'" in caplog.text
