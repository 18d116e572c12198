"""Model, adapter and LoRA inputs that cannot work are one-line errors naming the flag or the directory:
a causal LM as the reward model, a reward-model adapter as the policy, a tensor-parallel shard dir or an
adapter dir without weights where an HF model loads, LoRA alpha/dropout out of range, a tokenizer with
more tokens than the model has embedding rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from peft import TaskType
from transformers import AutoModelForCausalLM

from rlhf.args import LoraArguments
from rlhf.errors import CheckpointError, ConfigError
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.models.loading import SHARD_PARAMS, check_vocab_fits
from rlhf.models.lora import LoraSpec
from rlhf.reward.model import load_reward_backbone, load_reward_model
from rlhf.training import make_trainable


@pytest.fixture(scope="module")
def rm_adapter(tiny_llama, tmp_path_factory) -> Path:
    from test_ppo_models import build_rm_adapter

    return build_rm_adapter(tiny_llama, tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, tmp_path_factory) -> Path:
    from test_reward_parts import write_sft_adapter

    return write_sft_adapter(tiny_llama, tmp_path_factory.mktemp("sft") / "sft")


def test_a_causal_lm_as_the_reward_model_is_refused_not_scored_by_a_random_head(tiny_llama, sft_adapter):
    """transformers only logs its MISSING table for score.weight and draws a head: PPO optimised noise."""
    with pytest.raises(
        CheckpointError,
        match=r"^--reward_model_path .*: no trained score head \(score.weight missing\): it looks like a "
        r"causal LM; train a reward model with run_rm_with_peft.py$",
    ):
        load_reward_model(str(tiny_llama))
    with pytest.raises(CheckpointError, match=r"sft: a CAUSAL_LM adapter .*, not a reward model"):
        load_reward_model(str(sft_adapter))


def test_a_reward_model_adapter_loads_with_its_head(rm_adapter):
    model = load_reward_model(str(rm_adapter))
    assert model.base_model.model.score.modules_to_save["default"].weight.abs().sum() > 0


@pytest.mark.parametrize(
    "spec, message",
    [(dict(alpha=0.0), r"^--lora_alpha must be > 0 with --lora_rank 4 .* got 0.0$"),
     (dict(alpha=-8.0, flag_prefix="--actor_lora_"), r"^--actor_lora_alpha must be > 0 with --actor_lora_rank 4"),
     (dict(alpha=float("nan"), flag_prefix="--critic_lora_"), r"^--critic_lora_alpha must be > 0 .* got nan$"),
     (dict(dropout=1.0), r"^--lora_dropout must be in \[0, 1\), got 1.0$"),
     (dict(dropout=-0.1, flag_prefix="--actor_lora_"), r"^--actor_lora_dropout must be in \[0, 1\), got -0.1$")],
)  # fmt: skip
def test_lora_alpha_and_dropout_out_of_range_name_the_flag(spec, message):
    with pytest.raises(ConfigError, match=message):
        LoraSpec(rank=4, **spec)


def test_lora_flags_are_checked_where_every_stage_reads_them_and_only_for_an_adapter():
    from rlhf.tp.ppo_train import TPPPOArguments
    from rlhf.tp.train_args import TPTrainArguments

    with pytest.raises(ConfigError, match="^--lora_alpha must be > 0"):
        LoraArguments(lora_rank=4, lora_alpha=0).lora_spec()  # SFT and RM
    flags = SimpleNamespace(lora_rank=4, lora_alpha=32.0, lora_dropout=1.5, lora_target="q_proj")
    for tp_args in (TPTrainArguments, TPPPOArguments):  # solver/verifier_train, TP ppo_train
        with pytest.raises(ConfigError, match=r"^--lora_dropout must be in \[0, 1\), got 1.5$"):
            tp_args.lora_spec(flags)
    assert not LoraSpec(rank=-1, alpha=0.0, dropout=2.0).use_lora  # full training: the flags are unused
    assert LoraSpec(4, 8.0, 0.0, ["q_proj"], "--actor_lora_") == LoraSpec(4, 8.0, 0.0, ["q_proj"])


def test_a_reward_model_adapter_is_refused_as_a_causal_lm(rm_adapter):
    """Its score head had no place on the policy and was silently dropped (--peft_path refused it already)."""
    with pytest.raises(
        CheckpointError,
        match=r"^--sft_model_path .*rm is a reward-model adapter \(task_type SEQ_CLS in adapter_config.json\), "
        r"not a causal LM: its score head would be dropped; give the SFT model or SFT adapter \(its base is ",
    ):
        load_causal_lm(str(rm_adapter), flag="--sft_model_path", merge_adapter=True)
    with pytest.raises(CheckpointError, match=r"^\S+/rm is a reward-model adapter"):
        load_causal_lm(str(rm_adapter))


def weightless_copy(model_dir: Path, out: Path, *extra: str) -> Path:
    """``model_dir`` without its weights, plus empty files named ``extra``."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for name in extra:
        (out / name).write_text("{}")
    return out


def test_a_tensor_parallel_shard_dir_says_how_to_merge_it(tiny_llama, tmp_path):
    from rlhf.tp.shard_dir import PARAMS, shard_name

    assert SHARD_PARAMS == PARAMS  # matched, not imported (rlhf.tp imports rlhf.models.loading)
    shards = weightless_copy(tiny_llama, tmp_path / "shards", PARAMS, shard_name(0))
    merge = (
        rf"^{shards} is a tensor-parallel shard dir: merge it first with "
        rf"`python checkpoint_split.py --merge --ckpt_dir {shards} --save_path HF_DIR`$"
    )
    for load in (load_causal_lm, load_reward_model, lambda p: load_reward_backbone(p, pad_token_id=0)):
        with pytest.raises(CheckpointError, match=merge):
            load(str(shards))
    assert load_tokenizer(str(shards)) is not None  # the TP stages read their tokenizer there


def test_a_model_dir_without_weights_names_the_files_looked_for(tiny_llama, tmp_path):
    empty = weightless_copy(tiny_llama, tmp_path / "empty")
    with pytest.raises(
        CheckpointError, match=r"empty: no model weights \(none of model.safetensors, .*pytorch_model.bin"
    ):
        load_causal_lm(str(empty))


def test_an_adapter_dir_without_its_weights_is_one_line(tiny_llama, sft_adapter, tmp_path):
    """PEFT looked the dir up on the hub instead and failed with HFValidationError about a repo id."""
    bare = weightless_copy(sft_adapter, tmp_path / "bare")
    missing = r"bare: an adapter dir without its weights \(no adapter_model.safetensors or adapter_model.bin"
    with pytest.raises(CheckpointError, match=rf"^--model_name_or_path \S+{missing}"):
        load_causal_lm(str(bare), flag="--model_name_or_path")
    with pytest.raises(CheckpointError, match=rf"^--model_name_or_path \S+{missing}"):
        load_reward_backbone(str(bare), pad_token_id=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(CheckpointError, match=rf"^--peft_path \S+{missing}"):
        make_trainable(base, LoraSpec(rank=4), peft_path=str(bare), task_type=TaskType.CAUSAL_LM)


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_llama, tmp_path):
    """An id past the embedding rows was an IndexError mid-training; a smaller tokenizer is normal."""
    rows = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    big = shutil.copytree(tiny_llama, tmp_path / "big")
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(big)
    with pytest.raises(
        CheckpointError,
        match=rf"^{big}: the tokenizer has {rows + 5} tokens but the model only {rows} embedding rows",
    ):
        load_tokenizer(str(big))
    padded = shutil.copytree(tiny_llama, tmp_path / "padded")
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps(config | {"vocab_size": rows + 64}))
    assert len(load_tokenizer(str(padded))) == rows
    with pytest.raises(
        CheckpointError, match=f"the tokenizer has {rows} tokens but the model only {rows - 1}"
    ):
        check_vocab_fits(tokenizer=load_tokenizer(str(tiny_llama)), rows=rows - 1, what="m")


def test_an_evaluation_only_reward_run_needs_a_stored_score_head(tiny_llama, rm_adapter, tmp_path):
    """--do_eval alone scores with the head stored at --model_name_or_path: a causal LM stores none (the
    scores would be a random head's), an adapter dir belongs in --peft_path; a trained model dir passes."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.reward.model import check_head_for_evaluation

    for path in (tiny_llama, rm_adapter):
        with pytest.raises(
            ConfigError, match="stores no trained score head: .* pass the reward adapter as --peft_path"
        ):
            check_head_for_evaluation(str(path))
    trained = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    trained.save_pretrained(tmp_path / "rm_full")
    check_head_for_evaluation(str(tmp_path / "rm_full"))


def test_modules_to_save_on_tied_embeddings_warns_that_it_unties_them(tiny_model_factory, caplog):
    """A trained copy of the tied lm_head (or embed_tokens) no longer shares its weight with the other: the
    run says so, once per such name; an untied model, or another module, says nothing."""
    from rlhf.training.trainable import check_modules_to_save

    tied = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", tie_word_embeddings=True))
    untied = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))

    def warnings(model, names) -> list[str]:
        caplog.clear()  # building the models may have logged (at INFO, after an entry point's logging setup)
        with caplog.at_level("WARNING", logger="rlhf.training.trainable"):
            check_modules_to_save(model, names)
        return [r.getMessage() for r in caplog.records if r.name == "rlhf.training.trainable"]

    said = warnings(tied, ["lm_head", "embed_tokens", "norm"])
    assert len(said) == 2 and all("unties the pair" in w for w in said), said
    assert said[0].startswith("--modules_to_save lm_head: the model ties its output layer")
    assert warnings(untied, ["lm_head", "embed_tokens"]) == []
    assert warnings(tied, []) == []
