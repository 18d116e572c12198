"""The final model in --output_dir is the run's model and no other: an earlier save of another kind
(an adapter, full weights) leaves no file that would change what the directory loads as."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_sft_outputs import with_flags
from test_sft_stage import quick_argv
from transformers import AutoModelForCausalLM

from rlhf.models import load_causal_lm
from rlhf.publish import publish_model_files
from run_sft_with_peft import main

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_FILES = {"model.safetensors", "config.json"}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13, 17]])).logits


def test_switching_between_lora_and_full_training_in_one_output_dir(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "out"
    base = quick_argv(tiny_llama, repo_root / "sft_data", out, "--overwrite_output_dir")
    full = with_flags(base, lora_rank="-1", learning_rate="1e-2")
    lora = with_flags(base, lora_rank="4", learning_rate="1e-2")

    main(lora)
    assert {p.name for p in out.iterdir()} >= ADAPTER_FILES
    main(full)  # full fine-tuning over the adapter's run
    names = {p.name for p in out.iterdir()}
    assert names >= FULL_FILES and not ADAPTER_FILES & names, names
    trained = load_causal_lm(str(out))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(plain, "peft_config") and torch.equal(logits(plain), logits(trained))
    assert not torch.allclose(logits(plain), logits(AutoModelForCausalLM.from_pretrained(tiny_llama)))

    main(lora)  # and back: the full weights must not sit under the new adapter
    names = {p.name for p in out.iterdir()}
    assert names >= ADAPTER_FILES and "model.safetensors" not in names, names


def test_only_model_files_not_brought_are_removed(tmp_path):
    target, staging = tmp_path / "out", tmp_path / ".out.tmp"
    for directory, names in ((target, ("adapter_config.json", "model-00001-of-00002.safetensors", "metrics.jsonl",
                                       "config.json")), (staging, ("config.json", "model.safetensors"))):  # fmt: skip
        directory.mkdir()
        for name in names:
            (directory / name).write_text(directory.name)
    (target / "checkpoint-2").mkdir()
    assert publish_model_files(staging, target) == ["adapter_config.json", "model-00001-of-00002.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == [
        "checkpoint-2", "config.json", "metrics.jsonl", "model.safetensors"
    ]  # fmt: skip
    assert (target / "config.json").read_text() == ".out.tmp" and not staging.exists()


def loads_as(target: Path) -> str:
    """What a loader would take ``target`` for: the version ("old"/"new") of a complete adapter or full
    model, "none" when it is no model (an error), "mixed" when its files come from both."""
    names = {p.name for p in target.iterdir()}
    if "adapter_config.json" in names:
        parts = ["adapter_config.json", "adapter_model.safetensors"]
    elif "config.json" in names:
        parts = ["config.json", "model.safetensors"]
    else:
        return "none"
    versions = {(target / n).read_text() if n in names else "missing" for n in parts}
    return versions.pop() if len(versions) == 1 and "missing" not in versions else "mixed"


@pytest.mark.parametrize("old_kind", ["adapter", "full"])
@pytest.mark.parametrize("new_kind", ["adapter", "full"])
def test_a_kill_during_publishing_never_leaves_a_mix_of_two_models(tmp_path, monkeypatch, old_kind, new_kind):
    files = {"adapter": ["adapter_config.json", "adapter_model.safetensors", "README.md"],
             "full": ["config.json", "model.safetensors", "generation_config.json"]}  # fmt: skip
    target, staging = tmp_path / "out", tmp_path / ".out.tmp"
    for directory, kind, version in ((target, old_kind, "old"), (staging, new_kind, "new")):
        directory.mkdir()
        for name in files[kind]:
            (directory / name).write_text(version)
    seen = [loads_as(target)]
    replace, unlink = os.replace, Path.unlink

    def replace_then_look(src, dst):
        replace(src, dst)
        seen.append(loads_as(target))

    def unlink_then_look(path, missing_ok=False):
        unlink(path, missing_ok=missing_ok)
        seen.append(loads_as(target))

    monkeypatch.setattr(os, "replace", replace_then_look)
    monkeypatch.setattr(Path, "unlink", unlink_then_look)
    publish_model_files(staging, target)
    assert seen[0] == "old" and seen[-1] == "new" and set(seen) <= {"old", "new", "none"}, seen


def test_lora_sft_on_an_adapter_dir_names_the_merged_base_it_trained_on(tiny_llama, repo_root, tmp_path):
    """Round 2 of LoRA SFT on round 1's adapter dir: the new adapter names <output_dir>/base_model (round
    1 merged into its base) and loads with plain peft, and with load_causal_lm, as the model trained."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    first, second = tmp_path / "round1", tmp_path / "round2"
    main(with_flags(quick_argv(tiny_llama, repo_root / "sft_data", first), lora_rank="4"))
    main(with_flags(quick_argv(first, repo_root / "sft_data", second), lora_rank="4"))
    assert (second / "base_model" / "model.safetensors").is_file()
    trained = PeftModel.from_pretrained(load_causal_lm(str(first), merge_adapter=True), second).eval()
    for reloaded in (AutoPeftModelForCausalLM.from_pretrained(second), load_causal_lm(str(second))):
        torch.testing.assert_close(logits(reloaded.eval()), logits(trained))


def test_adapters_trained_on_relative_paths_load_with_plain_peft_from_any_directory(
    tiny_llama, repo_root, tmp_path, monkeypatch
):
    """Every command of the docs passes relative paths: the saved adapter names its base by an absolute path
    (PEFT would record ``base`` as given), on a plain base and on the ``base_model/`` an adapter dir is
    merged into."""
    import shutil

    from peft import AutoPeftModelForCausalLM

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_llama, work / "base")
    monkeypatch.chdir(work)
    first = quick_argv(Path("base"), repo_root / "sft_data", Path("sft_lora"), "--lora_rank", "4")
    main(first)
    main(with_flags(first, model_name_or_path="sft_lora", output_dir="sft_on_adapter"))
    monkeypatch.chdir(elsewhere)
    for out, base in (
        ("sft_lora", work / "base"),
        ("sft_on_adapter", work / "sft_on_adapter" / "base_model"),
    ):
        model = AutoPeftModelForCausalLM.from_pretrained(work / out)
        assert model.peft_config["default"].base_model_name_or_path == str(base.resolve())
        assert torch.equal(logits(model), logits(load_causal_lm(str(work / out))))


def test_ppo_adapters_trained_on_a_relative_sft_path_name_it_absolutely(
    tiny_llama, repo_root, tmp_path, monkeypatch
):
    import json
    import shutil

    import run_ppo_with_peft

    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "sft")
    monkeypatch.chdir(work)
    run_ppo_with_peft.main([
        "--sft_model_path", "sft", "--reward_fn", "rlhf.toy_task:positivity_reward", "--dataset_dir",
        str(repo_root / "sft_data"), "--output_dir", "actor", "--max_steps", "1", "--per_device_train_batch_size",
        "2", "--max_response_length", "4", "--disable_tqdm", "true", "--report_to", "none",
    ])  # fmt: skip
    for adapter in (work / "actor", work / "actor" / "critic"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((work / "sft").resolve()), adapter


def test_a_continued_adapter_names_the_base_this_run_loaded(tiny_llama, tmp_path, monkeypatch):
    """--peft_path keeps training an adapter whose config may name its base relative to another directory:
    the continued adapter names the base this run loaded, by its absolute path."""
    import json
    import shutil

    from peft import LoraConfig, get_peft_model

    from rlhf.models.lora import LoraSpec
    from rlhf.training import make_trainable

    shutil.copytree(tiny_llama, tmp_path / "base")
    old = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"])
    )
    old.save_pretrained(tmp_path / "old_adapter")
    config_path = tmp_path / "old_adapter" / "adapter_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "../x/base"})
    )
    monkeypatch.chdir(tmp_path)
    model = make_trainable(
        AutoModelForCausalLM.from_pretrained("base"),
        LoraSpec(rank=-1),
        peft_path=str(tmp_path / "old_adapter"),
    )
    assert model.peft_config["default"].base_model_name_or_path == str((tmp_path / "base").resolve())
