"""DeepSpeed in the Trainer-based stages (SFT, reward model), run for real on CPU (DeepSpeed's CPU
accelerator, one process under torchrun or accelerate launch), and the checkpoint checks that depend on it.

- ZeRO-3 with an adapter dir as ``--model_name_or_path``: the adapter is merged outside ZeRO-3 into
  ``<output_dir>/base_model`` and loaded from there (``rlhf/models/adapter_base.py``);
- ZeRO-3 whose config does not gather the weights on save still writes a plain final model
  (``rlhf/training/runner.py``);
- an Accelerate DeepSpeed config without ``--deepspeed`` resumes its own checkpoints, and DeepSpeed's
  per-rank files are required one per rank (``rlhf/training/checkpoints.py``).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import free_port, script_env, torchrun
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_sft_outputs import logged_steps as trained_steps
from test_sft_outputs import with_flags
from test_sft_stage import quick_argv
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

import run_sft_with_peft
from rlhf.training.checkpoints import CheckpointLayout, checkpoint_problem, layout_of
from rlhf.training.resume_settings import PROCESSES, ZERO_STAGE, args_settings, write_settings, zero_stage

REPO = Path(__file__).resolve().parents[1]
# what a pickle of test_model_loading.RunsCode names: io.open on Python 3.11, _io.open from 3.12 on
PICKLED_OPEN = f"{io.open.__module__}.open"
ZERO2, ZERO3 = REPO / "configs" / "ds_zero2.json", REPO / "configs" / "ds_zero3.json"
SCRIPTS = {"sft": REPO / "run_sft_with_peft.py", "rm": REPO / "run_rm_with_peft.py"}
DATA = {"sft": REPO / "sft_data", "rm": REPO / "rm_data"}


def stage_argv(stage: str, model: Path, out: Path, **flags: str) -> list[str]:
    """Two steps of a stage on ``model``, LoRA rank 4, batches of 4, unless ``flags`` say otherwise."""
    argv = quick_argv(model, DATA[stage], out, "--lora_rank", "4")
    defaults = {
        "max_steps": "2",
        "per_device_train_batch_size": "4",
        "data_cache_dir": str(out.parent / f"cache_{stage}"),
    }
    return with_flags(argv, **(defaults | flags))


def launched(stage: str, argv: list[str], cwd: Path, launcher: list[str] | None = None, **env: str):
    """Run a stage's entry script under ``launcher`` (torchrun, one process, by default)."""
    cmd = [*(launcher or torchrun(1)), str(SCRIPTS[stage]), *argv]
    return subprocess.run(cmd, cwd=cwd, env=script_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA SFT adapter dir on the tiny llama (what README's step 1 writes), trained in-process."""
    out = tmp_path_factory.mktemp("sft_adapter") / "sft_lora"
    run_sft_with_peft.main(stage_argv("sft", tiny_llama, out))
    return out


def merged_reference(adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter merged into its base without DeepSpeed: what ``base_model`` must hold."""
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"])  # fmt: skip
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


# --- ZeRO-3 on an adapter dir ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_zero3_trains_on_an_adapter_dir_merged_outside_zero3(stage, sft_adapter, tmp_path):
    """Under ZeRO-3 the base was an empty partition when PEFT merged into it: a RuntimeError (size of
    tensor a (0) must match ...). Now the merge is written to base_model/ first and loaded from there."""
    out = tmp_path / stage
    proc = launched(stage, stage_argv(stage, sft_adapter, out, deepspeed=str(ZERO3)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = out / "base_model"
    saved = load_file(base / "model.safetensors")
    backbone = {k: v for k, v in merged_reference(sft_adapter).items() if k.startswith("model.")}
    assert all(torch.equal(saved[k], v) for k, v in backbone.items())  # whole weights, the adapter merged
    assert json.loads((base / "merged_from.json").read_text())["adapter_dir"] == str(sft_adapter.resolve())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(
        auto.from_pretrained(base, **({"num_labels": 1} if stage == "rm" else {})), out
    )
    assert model.peft_config["default"].r == 4


# --- ZeRO-3 without gathering on save ---------------------------------------------------------------


@pytest.mark.slow
def test_zero3_without_gathering_on_save_still_writes_a_plain_model(tiny_llama, tmp_path):
    """With stage3_gather_16bit_weights_on_model_save false (Accelerate's ZeRO-3 default) the final dir held
    DeepSpeed shards and no model.safetensors, and the run said it saved the final model."""
    config = json.loads(ZERO3.read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "zero3_nogather.json").write_text(json.dumps(config))
    out = tmp_path / "full"
    argv = stage_argv("sft", tiny_llama, out, lora_rank="-1", deepspeed=str(tmp_path / "zero3_nogather.json"))
    proc = launched("sft", argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("global_step*"))
    before = load_file(tiny_llama / "model.safetensors")
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(after[k].shape == v.shape and not torch.equal(after[k], v) for k, v in before.items())
    assert "stage3_gather_16bit_weights_on_model_save turned on" in proc.stderr


# --- DeepSpeed from an Accelerate config ------------------------------------------------------------

# as `accelerate config` writes one for a GPU: bf16 and accumulation in the config, not as stage flags
ACCELERATE_ZERO2 = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  gradient_accumulation_steps: 2
  gradient_clipping: 1.0
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
machine_rank: 0
mixed_precision: bf16
num_machines: 1
num_processes: 1
use_cpu: false
"""


def test_an_accelerate_deepspeed_config_is_a_deepspeed_layout(monkeypatch):
    """transformers builds args.deepspeed_plugin from ACCELERATE_USE_DEEPSPEED, with no --deepspeed: the
    checkpoints are DeepSpeed's, and the layout (and the recorded ZeRO stage) must say so."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    args = TrainingArguments(output_dir="unused", report_to="none")
    assert not args.deepspeed and args.deepspeed_plugin is not None
    assert layout_of(args) == CheckpointLayout(
        deepspeed=True, zero_optimizer=True, scheduler_file=True, zero_stage=2, processes=1
    )
    assert args_settings(args)[ZERO_STAGE] == 2
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert args_settings(TrainingArguments(output_dir="unused", report_to="none"))[ZERO_STAGE] == 0


@pytest.mark.slow
def test_an_accelerate_deepspeed_run_resumes_its_checkpoints(tiny_llama, tmp_path):
    """Every resume of a run under `accelerate launch --config_file <DEEPSPEED>` was refused: "optimizer.pt
    (it holds DeepSpeed's global_step*/ instead: resume with --deepspeed) is missing". And a config with
    mixed_precision: bf16 or gradient_accumulation_steps: 2 (and no such stage flags) stopped at the first
    step: "DeepSpeed config values that mismatch TrainingArguments values"; they are taken as the flags
    (rlhf/launch_settings.py; bf16 falls back to float32 on this CPU machine)."""
    config = tmp_path / "accelerate_zero2.yaml"
    config.write_text(ACCELERATE_ZERO2)
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
                "--main_process_port", str(free_port())]  # fmt: skip
    out = tmp_path / "sft"
    argv = stage_argv("sft", tiny_llama, out, save_strategy="steps", save_steps="2")
    for steps in ("2", "4"):
        proc = launched("sft", with_flags(argv, max_steps=steps), tmp_path, launcher)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "latest").is_file()
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    assert trained_steps(out) == [1, 2, 3, 4]
    assert "--gradient_accumulation_steps 2, from the Accelerate DeepSpeed config" in proc.stderr
    assert "mixed_precision: bf16 (from accelerate launch) needs a GPU" in proc.stderr


# --- DeepSpeed's per-rank files ---------------------------------------------------------------------


def zero_checkpoint(root: Path, processes: int, stage: int, record: bool = True) -> Path:
    """The files of a DeepSpeed ZeRO checkpoint of ``processes`` ranks (as DeepSpeed 0.x writes them)."""
    ckpt = root / "checkpoint-2"
    tag = ckpt / "global_step2"
    tag.mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    for rank in range(processes):
        torch.save({}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if stage == 3:
            torch.save({}, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    if stage < 3:
        torch.save({}, tag / "mp_rank_00_model_states.pt")
    torch.save({"last_epoch": 2}, ckpt / "scheduler.pt")
    save_file({"w": torch.ones(2)}, ckpt / "adapter_model.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    if record:
        write_settings(ckpt, {PROCESSES: processes, ZERO_STAGE: stage})
    return ckpt


@pytest.mark.parametrize("stage", [2, 3])
def test_each_rank_needs_its_own_deepspeed_files(tmp_path, stage):
    """A checkpoint without rank 1's optimizer shard passed the check; rank 1 then crashed alone
    (FileNotFoundError) while rank 0 waited for it."""
    layout = CheckpointLayout(deepspeed=True, zero_stage=stage, processes=2)
    ckpt = zero_checkpoint(tmp_path, 2, stage)
    assert checkpoint_problem(ckpt, layout) is None
    (ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(ckpt, layout) == (
        "incomplete: global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1's of 2 processes) is missing"
    )
    if stage == 3:
        torch.save({}, ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        (ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
        assert checkpoint_problem(ckpt, layout) == (
            "incomplete: global_step2/zero_pp_rank_1_mp_rank_00_model_states.pt (rank 1's of 2 processes) is "
            "missing"
        )


def test_a_deepspeed_file_naming_anything_but_deepspeeds_state_classes_is_refused(tmp_path):
    """DeepSpeed unpickles its global_step*/*.pt files with weights_only=False: one holding an object whose
    loading runs code was resumed from (and the code ran). Its own state classes pass; anything else is one
    phrase naming it, read from the pickle's opcodes without loading it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from test_model_loading import RunsCode

    layout = CheckpointLayout(deepspeed=True, zero_stage=2, processes=1)
    ckpt = zero_checkpoint(tmp_path, 1, 2)
    optim = ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = {"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "w": torch.ones(4)}  # fmt: skip
    torch.save(state, optim)
    assert checkpoint_problem(ckpt, layout) is None
    marker = tmp_path / "code_ran"
    torch.save(
        {"module": {"w": torch.ones(2)}, "x": RunsCode(marker)},
        ckpt / "global_step2" / "mp_rank_00_model_states.pt",
    )
    assert checkpoint_problem(ckpt, layout) == (
        f"mp_rank_00_model_states.pt is refused: it holds {PICKLED_OPEN}, which DeepSpeed's loader would import "
        "(a pickle that could run code; only DeepSpeed's own state classes are let through)"
    )
    assert not marker.exists()
    # DeepSpeed loads the dir `latest` names: any dir of the checkpoint is scanned, a path out of it refused
    torch.save({}, ckpt / "global_step2" / "mp_rank_00_model_states.pt")
    (ckpt / "other").mkdir()
    torch.save({"x": RunsCode(marker)}, ckpt / "other" / "mp_rank_00_model_states.pt")
    torch.save(state, ckpt / "other" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (ckpt / "latest").write_text("other")
    assert checkpoint_problem(ckpt, layout).startswith(
        f"mp_rank_00_model_states.pt is refused: it holds {PICKLED_OPEN}"
    )
    for elsewhere in ("global_step2/sub", str(tmp_path / "elsewhere"), ".."):
        (ckpt / "latest").write_text(elsewhere)
        assert checkpoint_problem(ckpt, layout) == (
            "incomplete: a global_step*/ dir of this checkpoint that latest names is missing"
        ), elsewhere


def test_a_state_file_refused_by_weights_only_says_so(tmp_path):
    """optimizer.pt holding a pickle that runs code was reported as "truncated or corrupt"."""
    from test_model_loading import RunsCode

    ckpt = zero_checkpoint(tmp_path, 1, 2)
    torch.save({"state": RunsCode(tmp_path / "code_ran")}, ckpt / "scheduler.pt")
    problem = checkpoint_problem(ckpt, CheckpointLayout(deepspeed=True, zero_stage=2, processes=1))
    assert problem.startswith(
        f"scheduler.pt is refused: it holds {PICKLED_OPEN}, which loading would import"
    ), problem
    assert not (tmp_path / "code_ran").exists()


def test_rank_files_follow_the_checkpoints_record_else_this_run(tmp_path):
    """The ranks and stage a checkpoint recorded decide its files (another count is the settings check's one
    line, not a missing file); one that recorded none is checked against this run's."""
    one = zero_checkpoint(tmp_path / "a", 1, 2)
    assert checkpoint_problem(one, CheckpointLayout(deepspeed=True, zero_stage=2, processes=2)) is None
    unrecorded = zero_checkpoint(tmp_path / "b", 1, 3, record=False)
    assert checkpoint_problem(unrecorded, CheckpointLayout(deepspeed=True, zero_stage=3, processes=2)) == (
        "incomplete: global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1's of 2 processes) is "
        "missing"
    )
    unread = SimpleNamespace(
        deepspeed="ds.json", hf_deepspeed_config=SimpleNamespace(config=None), world_size=2
    )
    assert layout_of(unread).processes == 2 and zero_stage(unread) is None


# --- several CPU processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_cpu_processes_under_zero3_train_save_and_resume(tiny_llama, tmp_path):
    """torchrun --nproc_per_node 2 with --deepspeed on a machine without GPU failed DeepSpeed's
    train_batch_size check: transformers (--use_cpu) never started DeepSpeed's communication, which then
    counted one process. Now both ranks train, each writes its ZeRO-3 shards, and the run resumes."""
    out = tmp_path / "zero3x2"
    argv = stage_argv("sft", tiny_llama, out, lora_rank="-1", deepspeed=str(ZERO3), save_strategy="steps",
                      save_steps="2", per_device_train_batch_size="2")  # fmt: skip
    for steps in ("2", "4"):
        proc = launched("sft", with_flags(argv, max_steps=steps), tmp_path, torchrun(2))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    assert trained_steps(out) == [1, 2, 3, 4]
    shards = sorted(p.name for p in (out / "checkpoint-4" / "global_step4").iterdir())
    assert shards == [
        f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")
    ]
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0  # a plain, whole final model
