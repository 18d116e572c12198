"""The README's pipeline with LoRA at every stage: SFT adapter -> reward adapter trained on it -> PPO on the
SFT adapter. The reward stage and PPO each merge the SFT adapter into its base; PPO must see that the reward
adapter's base is that same model, share the one base, and start the critic from the reward model."""

from __future__ import annotations

import json

from test_reward_parts import write_sft_adapter
from test_reward_stage import quick_argv

import run_ppo_with_peft
from run_rm_with_peft import main as run_rm


def test_ppo_on_an_sft_adapter_shares_the_reward_adapter_trained_on_it(
    tiny_llama, repo_root, tmp_path, capsys
):
    sft = write_sft_adapter(tiny_llama, tmp_path / "sft_adapter")
    rm = tmp_path / "rm"
    run_rm(quick_argv(sft, repo_root / "rm_data", rm, "--lora_rank", "8", "--max_steps", "1"))
    record = json.loads((rm / "base_model" / "merged_from.json").read_text())
    assert record["adapter_dir"] == str(sft.resolve()) and record["files"]
    capsys.readouterr()
    argv = [
        "--sft_model_path", str(sft), "--reward_lora_path", str(rm), "--dataset_dir", str(repo_root / "sft_data"),
        "--output_dir", str(tmp_path / "ppo"), "--per_device_train_batch_size", "4", "--max_response_length", "4",
        "--max_steps", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert "the same model as --sft_model_path, so it is shared" in err
    assert (
        "loaded as a separate frozen model" not in err and "the critic starts from the SFT model" not in err
    )

    (sft / "adapter_model.safetensors").touch()  # the SFT adapter retrained since: no longer the same model
    run_ppo_with_peft.main([*argv, "--output_dir", str(tmp_path / "ppo2")])
    err = capsys.readouterr().err
    assert "loaded as a separate frozen model" in err
    assert "--critic_init reward: the critic starts from the SFT model instead" in err


def test_a_new_base_unnames_the_adapter_saved_on_the_old_one(tiny_llama, repo_root, tmp_path, capsys):
    """A run on a changed SFT adapter writes another <output_dir>/base_model at its start; stopped before its
    final save, it left the earlier run's adapter naming the new base, which then loaded (with plain peft,
    no error) as a model never trained. Now that adapter loses its config (it loads as no model); a re-run
    on the same source keeps it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.models.adapter_base import write_adapter_base

    sft = write_sft_adapter(tiny_llama, tmp_path / "sft_adapter")
    rm = tmp_path / "rm"
    run_rm(quick_argv(sft, repo_root / "rm_data", rm, "--lora_rank", "8", "--max_steps", "1"))
    assert json.loads((rm / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        rm / "base_model"
    )

    elsewhere = tmp_path / "critic_elsewhere"  # a PPO --critic_output_dir outside the output dir
    elsewhere.mkdir()
    (elsewhere / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(rm / "base_model")})
    )
    unrelated = tmp_path / "unrelated"  # names another base: not ours to touch
    unrelated.mkdir()
    (unrelated / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama)}))

    def rewrite_base(source) -> None:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), source)
        write_adapter_base(
            model, rm, lambda path: None, True, merged_from=source, also_named_in=[elsewhere, unrelated]
        )

    rewrite_base(sft)  # the same source, as a re-run or a resume writes it: the saved adapters stay valid
    assert (rm / "adapter_config.json").is_file() and (elsewhere / "adapter_config.json").is_file()
    with torch.no_grad():  # the SFT adapter changed since (retrained into the same dir)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), sft)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
        model.save_pretrained(sft)
    rewrite_base(sft)
    assert not (rm / "adapter_config.json").exists() and (rm / "adapter_model.safetensors").is_file()
    assert not (elsewhere / "adapter_config.json").exists() and (unrelated / "adapter_config.json").is_file()
    assert "its adapter_config.json is removed" in capsys.readouterr().err
