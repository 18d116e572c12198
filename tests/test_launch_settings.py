"""What ``accelerate launch`` passes on (mixed precision; a DeepSpeed config's accumulation and clipping)
becomes the Trainer stages' flags (``rlhf/launch_settings.py``).

An Accelerate DeepSpeed config with ``mixed_precision: bf16`` (the usual one on a GPU) and no ``--bf16``,
or with ``gradient_accumulation_steps: 2`` and no such flag, stopped the SFT and reward-model stages at their
first step with transformers' "DeepSpeed config values that mismatch TrainingArguments values" traceback.
The run under a real ``accelerate launch`` is in ``tests/test_deepspeed_stages.py``.
"""

from __future__ import annotations

import logging
import os

import pytest
from transformers import TrainingArguments

import rlhf.models.loading as loading
from rlhf.args import DataArguments, LoraArguments, ModelArguments, parse_args
from rlhf.errors import ConfigError
from rlhf.launch_settings import PRECISION_ENV, accelerate_launch_flags, flag_values
from rlhf.sft.stage import SFTArguments

DEEPSPEED_LAUNCH = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "ACCELERATE_MIXED_PRECISION": "bf16",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
    "ACCELERATE_GRADIENT_CLIPPING": "0.5",
}


@pytest.fixture
def launched(monkeypatch):
    """``launched(**env)``: the environment ``accelerate launch`` would give the script."""
    for name in DEEPSPEED_LAUNCH:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(loading, "_precision_fallback_warned", False)

    def set_env(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_flag_values_read_both_spellings_and_both_forms():
    argv = ["--bf16", "--max-grad-norm=0.5", "--gradient_accumulation_steps", "4", "--do_train"]
    assert flag_values(argv) == {
        "--bf16": None, "--max_grad_norm": "0.5", "--gradient_accumulation_steps": "4", "--do_train": None
    }  # fmt: skip


def test_the_launch_precision_is_a_flag_on_a_gpu(launched, caplog):
    launched(ACCELERATE_MIXED_PRECISION="bf16")
    with caplog.at_level(logging.INFO):
        assert accelerate_launch_flags(["--do_train"], has_gpu=True) == ["--bf16"]
    assert "mixed precision bf16, from accelerate launch" in caplog.text


def test_the_launch_precision_falls_back_to_float32_without_a_gpu(launched, caplog):
    launched(ACCELERATE_MIXED_PRECISION="fp16")
    with caplog.at_level(logging.WARNING):
        assert accelerate_launch_flags(["--do_train"], has_gpu=False) == []
    assert "mixed_precision: fp16 (from accelerate launch) needs a GPU; none found" in caplog.text
    assert os.environ[PRECISION_ENV] == "no"  # transformers reads it: no CPU autocast, no DeepSpeed bf16


@pytest.mark.parametrize("argv", [["--fp16"], ["--bf16", "False"], ["--bf16=true"]])
def test_a_precision_flag_decides_over_the_launch(launched, argv):
    launched(ACCELERATE_MIXED_PRECISION="bf16")
    assert accelerate_launch_flags(argv, has_gpu=True) == []
    assert os.environ[PRECISION_ENV] == "no"


def test_outside_accelerate_launch_nothing_is_added(launched):
    assert accelerate_launch_flags(["--do_train"], has_gpu=True) == []


def test_a_deepspeed_launch_gives_accumulation_and_clipping(launched):
    launched(**DEEPSPEED_LAUNCH)
    flags = accelerate_launch_flags(["--do_train"], has_gpu=True)
    assert flags == ["--bf16", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5"]
    # equal values given as flags (in another spelling of the number) are fine
    argv = ["--gradient_accumulation_steps", "2", "--max-grad-norm=.5"]
    assert accelerate_launch_flags(argv, has_gpu=True) == []


def test_accumulation_and_clipping_without_deepspeed_are_not_taken(launched):
    launched(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")
    assert accelerate_launch_flags([], has_gpu=True) == []


def test_a_flag_that_contradicts_the_deepspeed_config_names_both(launched):
    launched(**DEEPSPEED_LAUNCH)
    with pytest.raises(ConfigError) as err:
        accelerate_launch_flags(["--gradient_accumulation_steps", "4"], has_gpu=False)
    assert str(err.value) == (
        "--gradient_accumulation_steps 4 differs from gradient_accumulation_steps: 2 in the Accelerate "
        "DeepSpeed config (accelerate launch --config_file): drop the flag or make them equal"
    )


def test_parsed_arguments_match_the_deepspeed_config_transformers_builds(launched, tmp_path):
    """The check that failed: transformers compares the DeepSpeed config it built from the launch's
    variables with the parsed TrainingArguments (bf16, accumulation, clipping)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    launched(**DEEPSPEED_LAUNCH)
    argv = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", str(tmp_path), "--do_train"]
    *_, args = parse_args(
        (ModelArguments, DataArguments, LoraArguments, SFTArguments, TrainingArguments), argv
    )
    assert (args.gradient_accumulation_steps, args.max_grad_norm) == (2, 0.5)
    config = HfTrainerDeepSpeedConfig(args.deepspeed_plugin.deepspeed_config)
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, model=None, num_training_steps=4)  # raised the mismatch
