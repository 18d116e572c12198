"""checkpoint_split.py: split -> merge round trips and the key maps (the errors: test_tp_checkpoint_errors.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import load_file, save_file

from rlhf.errors import CheckpointError
from rlhf.tp.convert_weights import StateDictLookup, merge_tensors, split_state, split_tensor
from rlhf.tp.hf_checkpoint import TensorSource
from rlhf.tp.key_maps import concrete_key_map, model_args_from_hf, shard_dim
from rlhf.tp.model import ModelArgs
from rlhf.tp.shard_dir import write_metadata, write_shard
from rlhf.tp.split_merge import merge_to_dir

ARCHS = ["llama", "mistral", "mixtral", "qwen2"]


def split_main():
    import checkpoint_split

    return checkpoint_split.main


def assert_same_weights(original: Path, merged: Path) -> None:
    a, b = load_file(original / "model.safetensors"), load_file(merged / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_split_merge_round_trip_is_exact(arch, tiny_model_factory, tmp_path):
    source = tiny_model_factory(arch)
    main = split_main()
    main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "shards"), "--n", "2"])
    shards = tmp_path / "shards"
    assert sorted(p.name for p in shards.glob("consolidated.*")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]
    params = json.loads((shards / "params.json").read_text())
    assert params["n_shards"] == 2 and params["family"] == arch
    assert (shards / "tokenizer.json").is_file()
    shard0 = torch.load(shards / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wq.weight"].shape == (32, 64)  # 4 heads x 16 / 2 ranks
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard0["tok_embeddings.weight"].shape == (512, 32)  # split on the model dim
    main(["--merge", "--ckpt_dir", str(shards), "--save_path", str(tmp_path / "merged")])
    merged = tmp_path / "merged"
    assert_same_weights(source, merged)
    assert json.loads((merged / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.model_type == arch


def test_tied_padded_vocab_and_rope_scaling_round_trip(tiny_model_factory, llama3_rope_copy, tmp_path):
    tied = tiny_model_factory("llama", tie_word_embeddings=True, vocab_size=511)
    # the tokenizer trainer may stop short of 511 tokens; the point is a vocabulary 2 does not divide
    vocab = json.loads((tied / "config.json").read_text())["vocab_size"]
    assert vocab % 2 == 1
    main = split_main()
    main(["--ckpt_file", str(tied / "model.safetensors"), "--save_path", str(tmp_path / "s"), "--n", "2"])
    shard = torch.load(tmp_path / "s" / "consolidated.01.pth", weights_only=True)
    assert "output.weight" not in shard
    assert shard["tok_embeddings.weight"].shape == ((vocab + 1) // 2, 64)  # vocabulary split, padded
    assert torch.all(shard["tok_embeddings.weight"][-1] == 0)
    main(["--merge", "--ckpt_dir", str(tmp_path / "s"), "--save_path", str(tmp_path / "m")])
    assert_same_weights(tied, tmp_path / "m")

    rope = llama3_rope_copy(tmp_path / "rope", original_max_position_embeddings=64)
    main(["--ckpt_file", str(rope), "--save_path", str(tmp_path / "rs"), "--n", "2"])
    params = json.loads((tmp_path / "rs" / "params.json").read_text())
    assert params["rope_scaling"]["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    # merged into several safetensors files + index, which split reads back
    main(["--merge", "--ckpt_dir", str(tmp_path / "rs"), "--save_path", str(tmp_path / "rm"),
          "--max_shard_size_gb", "0.0001"])  # fmt: skip
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["rope_scaling"]["factor"] == 8.0
    assert len(list((tmp_path / "rm").glob("model-*-of-*.safetensors"))) > 1
    main(["--ckpt_file", str(tmp_path / "rm"), "--save_path", str(tmp_path / "rs2"), "--n", "2"])
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        a = torch.load(tmp_path / "rs" / name, weights_only=True)
        b = torch.load(tmp_path / "rs2" / name, weights_only=True)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "arch,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mixtral", {})]
)
def test_verifier_shards_merge_to_sequence_classification(arch, overrides, tiny_model_factory, tmp_path):
    """A scalar-head shard dir (verifier / critic) merges into an HF ForSequenceClassification dir whose
    score at the last real token equals the TP verifier's."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.tp.distributed import init_model_parallel, shutdown
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.shard_dir import save_model_shards

    source = tiny_model_factory(arch, **overrides)
    tokens = torch.tensor([[1, 17, 42, 99, 7, 2], [1, 5, 6, 2, 0, 0]])  # the second row right-padded
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    init_model_parallel()
    try:
        verifier = load_tp_model(
            str(source), rank=0, world_size=1, device=torch.device("cpu"), scalar_head=True
        )
        torch.manual_seed(0)
        verifier.v_head.weight.data.normal_()
        with torch.no_grad():
            expected = verifier(tokens, mask)[torch.arange(2), torch.tensor([5, 3])]
        save_model_shards(verifier, tmp_path / "v", source, head="scalar")
    finally:
        shutdown()
    split_main()(["--merge", "--ckpt_dir", str(tmp_path / "v"), "--save_path", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [f"{arch.capitalize()}ForSequenceClassification"]
    assert "score.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    with torch.no_grad():
        scores = model(input_ids=tokens, attention_mask=mask).logits.squeeze(-1)
    assert expected.abs().min() > 1e-3  # a real head, not zeros
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)

    # the merged dir splits again (another TP degree) into a scalar-head shard dir, and loads as it is
    split_main()(["--ckpt_file", str(tmp_path / "hf"), "--save_path", str(tmp_path / "v2"), "-n", "2"])
    assert json.loads((tmp_path / "v2" / "params.json").read_text())["head"] == "scalar"
    split_main()(["--ckpt_file", str(tmp_path / "hf"), "--save_path", str(tmp_path / "v1"), "-n", "1"])
    init_model_parallel()
    try:
        for path in (tmp_path / "v1", tmp_path / "hf"):
            again = load_tp_model(
                str(path), rank=0, world_size=1, device=torch.device("cpu"), scalar_head=True
            )
            with torch.no_grad():
                scores = again(tokens, mask)[torch.arange(2), torch.tensor([5, 3])]
            torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
            with pytest.raises(CheckpointError, match="a verifier \\(scalar head\\), not a causal LM"):
                load_tp_model(str(path), rank=0, world_size=1, device=torch.device("cpu"))
    finally:
        shutdown()


def test_sequence_classification_with_several_labels_is_refused(tiny_model_factory, tmp_path):
    from rlhf.tp.convert_weights import source_head

    state = load_file(tiny_model_factory("llama") / "model.safetensors")
    dim = state["model.norm.weight"].shape[0]
    lm = dict(state)
    score = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert source_head(StateDictLookup(lm)) == "lm"
    assert source_head(StateDictLookup(score | {"score.weight": torch.zeros(1, dim)})) == "scalar"
    with pytest.raises(
        CheckpointError, match="score.weight has 2 labels: a verifier or reward model has one"
    ):
        source_head(StateDictLookup(score | {"score.weight": torch.zeros(2, dim)}))


def test_scalar_head_of_a_family_without_sequence_classification_is_refused():
    from rlhf.tp.key_maps import sequence_classification_config

    with pytest.raises(CheckpointError, match="no transformers ForSequenceClassification"):
        sequence_classification_config({"model_type": "qwen"})


def test_single_pickle_file_with_config_dir(tiny_model_factory, tmp_path):
    source = tiny_model_factory("qwen2")
    state = load_file(source / "model.safetensors")
    torch.save(state, tmp_path / "checkpoint.bin")
    split_main()(
        ["--ckpt_file", str(tmp_path / "checkpoint.bin"), "--config_dir", str(source), "--save_path",
         str(tmp_path / "s"), "--n", "1"]
    )  # fmt: skip
    shard = torch.load(tmp_path / "s" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(shard["layers.1.attention.wq.bias"], state["model.layers.1.self_attn.q_proj.bias"])


def test_a_whole_weights_file_is_read_before_an_index_as_transformers_does(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({"w": torch.full((2,), 2.0)}, tmp_path / "pytorch_model.bin")
    assert TensorSource.open(tmp_path).get("w").sum() == 0
    (tmp_path / "model.safetensors").unlink()
    assert TensorSource.open(tmp_path).get("w").sum() == 2  # then the safetensors index, before the .bin


def test_pure_split_and_merge_functions():
    weight = torch.arange(5 * 4, dtype=torch.float32).view(5, 4)
    pieces = split_tensor(weight, 0, 2, padded_rows=6)
    assert [p.shape for p in pieces] == [(3, 4), (3, 4)] and torch.all(pieces[1][-1] == 0)
    assert torch.equal(merge_tensors(pieces, 0, rows=5), weight)
    cols = split_tensor(weight, 1, 4)
    assert torch.equal(cols[2], weight[:, 2:3]) and torch.equal(merge_tensors(cols, 1), weight)
    assert all(p is weight for p in split_tensor(weight, None, 3))
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=10, hidden_dim=16)
    assert shard_dim("layers.0.attention.wk.bias", args) == 0
    assert shard_dim("layers.0.feed_forward.w2.weight", args) == 1
    assert shard_dim("layers.0.attention.wo.bias", args) is None
    assert shard_dim("layers.0.feed_forward.experts.3.w3.weight", args) == 0
    assert shard_dim("layers.0.feed_forward.gate.weight", args) is None


def qwen_config() -> dict:
    return {
        "model_type": "qwen",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "kv_channels": 4,
        "intermediate_size": 24,
        "vocab_size": 10,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "seq_length": 32,
    }


def test_qwen_key_map_on_synthetic_state_dict():
    args = model_args_from_hf(qwen_config())
    assert (args.family, args.hidden_dim, args.qkv_bias, args.n_kv_heads) == ("qwen", 12, True, 2)
    g = torch.Generator().manual_seed(0)
    state = {
        "transformer.wte.weight": torch.randn(10, 8, generator=g),
        "transformer.ln_f.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(10, 8, generator=g),
        "transformer.h.0.ln_1.weight": torch.randn(8, generator=g),
        "transformer.h.0.ln_2.weight": torch.randn(8, generator=g),
        "transformer.h.0.attn.c_attn.weight": torch.randn(24, 8, generator=g),
        "transformer.h.0.attn.c_attn.bias": torch.randn(24, generator=g),
        "transformer.h.0.attn.c_proj.weight": torch.randn(8, 8, generator=g),
        "transformer.h.0.mlp.w1.weight": torch.randn(12, 8, generator=g),
        "transformer.h.0.mlp.w2.weight": torch.randn(12, 8, generator=g),
        "transformer.h.0.mlp.c_proj.weight": torch.randn(8, 12, generator=g),
    }
    assert set(concrete_key_map(args)) == set(state)
    shards = split_state(StateDictLookup(state), args, 2, [0, 1])
    c_attn, bias = state["transformer.h.0.attn.c_attn.weight"], state["transformer.h.0.attn.c_attn.bias"]
    # q, k, v are the thirds of c_attn; rank 1 holds the second head of each
    assert torch.equal(shards[1]["layers.0.attention.wq.weight"], c_attn[4:8])
    assert torch.equal(shards[0]["layers.0.attention.wk.weight"], c_attn[8:12])
    assert torch.equal(shards[1]["layers.0.attention.wv.bias"], bias[20:24])
    # Qwen's mlp.w2 goes through silu (our w1), mlp.w1 is the up projection (our w3)
    assert torch.equal(
        shards[0]["layers.0.feed_forward.w1.weight"], state["transformer.h.0.mlp.w2.weight"][:6]
    )
    assert torch.equal(
        shards[1]["layers.0.feed_forward.w3.weight"], state["transformer.h.0.mlp.w1.weight"][6:]
    )
    assert torch.equal(
        shards[1]["layers.0.feed_forward.w2.weight"], state["transformer.h.0.mlp.c_proj.weight"][:, 6:]
    )
    assert torch.equal(shards[0]["output.weight"], state["lm_head.weight"][:5])


def test_qwen_shards_merge_back_to_fused_keys(tmp_path):
    args = model_args_from_hf(qwen_config())
    g = torch.Generator().manual_seed(1)
    shapes = {
        "transformer.wte.weight": (10, 8), "transformer.ln_f.weight": (8,), "lm_head.weight": (10, 8),
        "transformer.h.0.ln_1.weight": (8,), "transformer.h.0.ln_2.weight": (8,),
        "transformer.h.0.attn.c_attn.weight": (24, 8), "transformer.h.0.attn.c_attn.bias": (24,),
        "transformer.h.0.attn.c_proj.weight": (8, 8), "transformer.h.0.mlp.w1.weight": (12, 8),
        "transformer.h.0.mlp.w2.weight": (12, 8), "transformer.h.0.mlp.c_proj.weight": (8, 12),
    }  # fmt: skip
    state = {key: torch.randn(*shape, generator=g) for key, shape in shapes.items()}
    (tmp_path / "s").mkdir()
    for rank, shard in split_state(StateDictLookup(state), args, 2, [0, 1]).items():
        write_shard(shard, tmp_path / "s", rank)
    write_metadata(tmp_path / "s", args, 2, qwen_config(), None)
    merge_to_dir(tmp_path / "s", tmp_path / "m")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert sorted(merged) == sorted(state)
    assert all(torch.equal(merged[k], state[k]) for k in state)


@pytest.mark.slow
def test_split_under_torchrun_with_two_processes(tiny_model_factory, tmp_path):
    """Two torchrun processes share the shards (``-n``: torchrun's own parser takes ``--n`` on Python 3.11)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    source = tiny_model_factory("mixtral")
    command = torchrun(2)
    command += [
        str(repo / "checkpoint_split.py"),
        "--ckpt_file",
        str(source),
        "--save_path",
        str(tmp_path / "s"),
    ]
    env = script_env()
    result = subprocess.run(command + ["-n", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    split_main()(["--ckpt_file", str(source), "--save_path", str(tmp_path / "ref"), "--n", "2"])
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        a = torch.load(tmp_path / "s" / name, weights_only=True)
        b = torch.load(tmp_path / "ref" / name, weights_only=True)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".*"))  # no staging dir left behind
    merge = [*torchrun(2), str(repo / "checkpoint_split.py"), "--merge", "--ckpt_dir", str(tmp_path / "s"),
             "--save_path", str(tmp_path / "m")]  # fmt: skip
    result = subprocess.run(merge, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # rank 0 merges; rank 1 does not race it
    assert_same_weights(source, tmp_path / "m")


def test_merge_runs_on_rank_0_only(tiny_model_factory, tmp_path, monkeypatch):
    """Under torchrun with several processes, the merge is one writer's job: the other ranks write nothing
    (before, rank 1 failed on rank 0's finished --save_path and torchrun exited 1)."""
    source = tiny_model_factory("llama")
    split_main()(["--ckpt_file", str(source), "--save_path", str(tmp_path / "s"), "--n", "2"])
    monkeypatch.setenv("RANK", "1")
    split_main()(["--merge", "--ckpt_dir", str(tmp_path / "s"), "--save_path", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m*"))
    monkeypatch.setenv("RANK", "0")
    split_main()(["--merge", "--ckpt_dir", str(tmp_path / "s"), "--save_path", str(tmp_path / "m")])
    assert_same_weights(source, tmp_path / "m")


def test_the_source_runs_records_stay_behind(tiny_model_factory, tmp_path):
    """A trained model dir holds its run's records (the Trainer's trainer_state.json and *_results.json, our
    merged_from.json): the shards and the dir merged back take the model's files only, so no later run's
    plot or reader mistakes them for its own."""

    source = tmp_path / "sft"
    shutil.copytree(tiny_model_factory("llama"), source)
    records = ["trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
               "merged_from.json"]  # fmt: skip
    for name in records:
        (source / name).write_text("{}")
    main = split_main()
    main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "shards"), "--n", "2"])
    main(["--merge", "--ckpt_dir", str(tmp_path / "shards"), "--save_path", str(tmp_path / "merged")])
    for out in (tmp_path / "shards", tmp_path / "merged"):
        names = {p.name for p in out.iterdir()}
        assert "tokenizer.json" in names and "generation_config.json" in names, names
        assert not names & set(records), names
