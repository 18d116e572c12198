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
