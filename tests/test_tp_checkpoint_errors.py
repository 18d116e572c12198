"""checkpoint_split.py: the errors users can hit (bad dirs, damaged files, wrong flags), as one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.errors import CheckpointError, ConfigError
from rlhf.tp.convert_weights import StateDictLookup, split_state
from rlhf.tp.hf_checkpoint import TensorSource
from rlhf.tp.key_maps import check_divisible, check_preset, model_args_from_hf
from rlhf.tp.model import ModelArgs
from rlhf.tp.shard_dir import load_shard
from rlhf.tp.split_merge import split_to_dir


def split_main():
    import checkpoint_split

    return checkpoint_split.main


def test_errors_are_clear(tiny_model_factory, tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=176)
    with pytest.raises(ConfigError, match="key-value heads \\(2\\) is not divisible by the shard count 4"):
        check_divisible(args, 4)
    with pytest.raises(ConfigError, match="expects a qwen checkpoint"):
        check_preset("qwen-7b", args, "x/params.json")
    with pytest.raises(ConfigError, match="llama-2-7b has dim 4096"):
        check_preset("llama-2-7b", args, "x/params.json")
    check_preset("llama", args, "x/params.json")

    source = tiny_model_factory("llama")
    main = split_main()
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "s"), "--n", "4"])
    assert exit_info.value.code == 2
    state = load_file(source / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="not in the llama key map"):
        split_state(
            StateDictLookup(state),
            model_args_from_hf(json.loads((source / "config.json").read_text())),
            2,
            [0],
        )
    save_file({"x": torch.zeros(1)}, str(tmp_path / "lonely.safetensors"))
    with pytest.raises(CheckpointError, match="no config.json"):
        split_to_dir(tmp_path / "lonely.safetensors", tmp_path / "out", 2)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        TensorSource.open(tmp_path / "missing.bin")
    main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "s2"), "--n", "2"])
    with pytest.raises(
        CheckpointError, match="holds 2 shards but the model-parallel world size is 1"
    ) as error:
        load_shard(tmp_path / "s2", 0, 1)
    # a shard dir cannot be split again: the hint says to merge it first
    assert f"checkpoint_split.py --merge --ckpt_dir {tmp_path / 's2'}" in str(error.value)
    with pytest.raises(SystemExit):  # an existing, non-empty --save_path needs --overwrite
        main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "s2"), "--n", "2"])
    main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "s2"), "--n", "1", "--overwrite"])
    assert json.loads((tmp_path / "s2" / "params.json").read_text())["n_shards"] == 1
    # --overwrite never replaces the checkpoint it reads from (or a dir holding it)
    own = tmp_path / "own" / "model"
    shutil.copytree(source, own)
    for save in (own, own.parent):
        with pytest.raises(SystemExit):
            main(["--ckpt_file", str(own), "--save_path", str(save), "--n", "1", "--overwrite"])
        assert (own / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(
            [
                "--merge",
                "--ckpt_dir",
                str(tmp_path / "s2"),
                "--save_path",
                str(tmp_path / "s2"),
                "--overwrite",
            ]
        )
    assert (tmp_path / "s2" / "params.json").is_file()


def exits_with(main, argv: list[str], capsys) -> str:
    """The ``error: ...`` line a CLI ends with when it exits with code 2 (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "Traceback" not in err and line.startswith("error: "), err
    return line


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_shard_dirs_are_one_line_errors_naming_the_file(tiny_model_factory, tmp_path, capsys):
    from rlhf.tp.shard_dir import check_shard_dir, read_params

    main = split_main()
    source = tiny_model_factory("llama")
    main(["--ckpt_file", str(source), "--save_path", str(tmp_path / "s"), "--n", "2"])
    good = json.loads((tmp_path / "s" / "params.json").read_text())
    assert check_shard_dir(tmp_path / "s", world_size=2)["n_shards"] == 2

    truncate(tmp_path / "s" / "consolidated.01.pth")
    shard = str(tmp_path / "s" / "consolidated.01.pth")
    for check in (lambda: check_shard_dir(tmp_path / "s"), lambda: load_shard(tmp_path / "s", 1, 2)):
        with pytest.raises(CheckpointError, match=f"{shard}: unreadable, truncated or corrupt"):
            check()
    line = exits_with(
        main, ["--merge", "--ckpt_dir", str(tmp_path / "s"), "--save_path", str(tmp_path / "m")], capsys
    )
    assert shard in line and not (tmp_path / "m").exists()
    load_shard(tmp_path / "s", 0, 2)  # the other shard still loads

    params = tmp_path / "s" / "params.json"
    params.write_text(json.dumps(good)[:-20])  # cut mid-file: not JSON
    with pytest.raises(CheckpointError, match=f"{params}: unreadable, truncated or corrupt"):
        read_params(tmp_path / "s")
    params.write_text(json.dumps({k: v for k, v in good.items() if k not in ("n_shards", "dim")}))
    with pytest.raises(CheckpointError, match=f"{params}: missing dim, n_shards"):
        read_params(tmp_path / "s")
    params.write_text(json.dumps({**good, "n_shards": 0}))
    with pytest.raises(CheckpointError, match="n_shards must be a positive integer, got 0"):
        load_shard(tmp_path / "s", 0, 1)
    params.write_text(json.dumps({**good, "head": "value"}))
    with pytest.raises(CheckpointError, match="head must be one of lm, scalar"):
        read_params(tmp_path / "s")


def test_damaged_hf_checkpoints_and_file_save_paths_are_one_line_errors(tiny_model_factory, tmp_path, capsys):
    import shutil

    main = split_main()
    source = shutil.copytree(tiny_model_factory("qwen2"), tmp_path / "hf")
    (tmp_path / "file").write_text("not a dir")
    line = exits_with(
        main, ["--ckpt_file", str(source), "--save_path", str(tmp_path / "file"), "--n", "1"], capsys
    )
    assert line == f"error: --save_path {tmp_path / 'file'} is a file, not a directory"
    line = exits_with(
        main, ["--merge", "--ckpt_dir", str(source), "--save_path", str(tmp_path / "file")], capsys
    )
    assert "is a file, not a directory" in line
    assert (tmp_path / "file").read_text() == "not a dir"

    truncate(source / "model.safetensors")
    line = exits_with(
        main, ["--ckpt_file", str(source), "--save_path", str(tmp_path / "s"), "--n", "1"], capsys
    )
    assert f"{source / 'model.safetensors'}: unreadable, truncated or corrupt" in line
    state = load_file(tiny_model_factory("qwen2") / "model.safetensors")
    torch.save(state, tmp_path / "checkpoint.bin")
    truncate(tmp_path / "checkpoint.bin")
    argv = ["--ckpt_file", str(tmp_path / "checkpoint.bin"), "--config_dir", str(tiny_model_factory("qwen2"))]
    line = exits_with(main, argv + ["--save_path", str(tmp_path / "s"), "--n", "1"], capsys)
    assert f"{tmp_path / 'checkpoint.bin'}: unreadable, truncated or corrupt" in line
    (source / "config.json").write_text("{")
    line = exits_with(
        main, ["--ckpt_file", str(source), "--save_path", str(tmp_path / "s"), "--n", "1"], capsys
    )
    assert f"{source / 'config.json'}: unreadable, truncated or corrupt" in line
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


def test_missing_dirs_are_named_by_their_flag(tiny_model_factory, tmp_path, capsys, monkeypatch):
    """A missing --ckpt_file said "/path/to/your: no config.json", a missing relative --ckpt_dir was taken for
    a hub id ("cannot load tokenizer (We couldn't connect to 'https://huggingface.co' ...)"), and the critic's
    shard count was checked only after the actor had loaded."""
    from rlhf.tp import ppo_train, solver_evaluate, solver_train

    monkeypatch.chdir(tmp_path)
    gsm8k = tmp_path / "train.jsonl"
    gsm8k.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "1+1=2\n#### 2"}) + "\n")
    main = split_main()
    line = exits_with(
        main, ["--ckpt_file", "/path/to/your/checkpoint.bin", "--save_path", "s", "-n", "1"], capsys
    )
    assert line == "error: --ckpt_file /path/to/your/checkpoint.bin: no such file or directory"
    assert exits_with(main, ["--merge", "--ckpt_dir", "runs/x", "--save_path", "s"], capsys) == (
        "error: --ckpt_dir runs/x: no such directory"
    )
    argv = ["--ckpt_dir", "runs/solver", "--save_dir", "out", "--train_file", str(gsm8k)]
    assert exits_with(solver_train.main, argv, capsys) == "error: --ckpt_dir runs/solver: no such directory"
    argv = ["--ckpt_dir", "runs/solver", "--label_file", str(gsm8k), "--log_dir", "logs"]
    assert (
        exits_with(solver_evaluate.main, argv, capsys) == "error: --ckpt_dir runs/solver: no such directory"
    )
    model = str(tiny_model_factory("llama"))
    base = ["--train_file", str(gsm8k), "--actor_save_dir", "a", "--reward_fn", "gsm8k"]
    argv = base + [
        "--actor_ckpt_dir",
        "runs/solver",
        "--advantage_estimator",
        "grpo",
        "--num_samples_per_prompt",
        "2",
    ]
    assert (
        exits_with(ppo_train.main, argv, capsys) == "error: --actor_ckpt_dir runs/solver: no such directory"
    )
    argv = base + ["--actor_ckpt_dir", model, "--critic_ckpt_dir", "runs/verifier", "--critic_save_dir", "c"]
    assert (
        exits_with(ppo_train.main, argv, capsys)
        == "error: --critic_ckpt_dir runs/verifier: no such directory"
    )


def test_splitting_a_shard_dir_says_to_merge_it_first(tiny_model_factory, tmp_path, capsys):
    """A shard dir as --ckpt_file said "no model.safetensors, pytorch_model.bin or index file"."""
    shards = tmp_path / "shards"
    split_to_dir(tiny_model_factory("llama"), shards, 1)
    line = exits_with(
        split_main(), ["--ckpt_file", str(shards), "--save_path", str(tmp_path / "s"), "-n", "2"], capsys
    )
    assert line.startswith(f"error: {shards}: already a shard dir (params.json, consolidated.NN.pth)")
    assert f"checkpoint_split.py --merge --ckpt_dir {shards} --save_path HF_DIR" in line


def test_splitting_an_adapter_dir_says_to_merge_it_first(tiny_model_factory, tmp_path, capsys):
    """An adapter dir as --ckpt_file said "no config.json", while the TP commands take it as it is."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    line = exits_with(
        split_main(), ["--ckpt_file", str(adapter), "--save_path", str(tmp_path / "s"), "-n", "2"], capsys
    )
    assert line.startswith(f"error: {adapter}: a PEFT adapter dir, not a model: the TP commands take it")
    assert "merge it into its base first (peft's merge_and_unload, then save_pretrained)" in line


def test_a_model_type_that_does_not_fit_fails_before_data_and_weights_load(
    tiny_model_factory, tmp_path, capsys, monkeypatch
):
    """A --model_type preset of another size was refused only after the data was tokenized and the weights
    loaded (load_tp_model's own check)."""
    from rlhf.tp import solver_train, training

    monkeypatch.setattr(training, "load_tp_model", lambda *a, **k: pytest.fail("loaded the weights first"))
    gsm8k = tmp_path / "train.jsonl"
    gsm8k.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "1+1=2\n#### 2"}) + "\n")
    model = tiny_model_factory("llama")
    argv = ["--ckpt_dir", str(model), "--save_dir", str(tmp_path / "s"), "--train_file", str(gsm8k)]
    line = exits_with(solver_train.main, argv + ["--model_type", "llama-2-7b"], capsys)
    assert line.startswith("error: --model_type llama-2-7b has dim 4096 and 32 layers, but ")


def test_a_tp_trainers_adapter_dir_says_to_pass_its_parent(tmp_path):
    """solver_train's ``<save_dir>/adapter`` holds an adapter_config.json, so it was read as a PEFT adapter:
    "cannot read base_model_name_or_path ('base_model_name_or_path')"."""
    from rlhf.tp.loading import check_checkpoint

    adapter = tmp_path / "solver" / "adapter"
    adapter.mkdir(parents=True)
    config = {"r": 4, "alpha": 8, "targets": ["wq"], "base": "tiny", "head": "lm", "n_shards": 1}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(str(adapter), 1)
    assert "a tensor-parallel trainer (solver_train, verifier_train) writes beside its model" in str(
        info.value
    )
    assert f"pass its parent dir {tmp_path / 'solver'}" in str(info.value)


@pytest.mark.parametrize("model_type", ["mycustom", "llama"])
def test_a_checkpoints_own_code_never_runs(model_type, tiny_model_factory, tmp_path, capsys):
    """config.json's auto_map used to reach AutoConfig without trust_remote_code: transformers asked on
    stdin whether to run the checkpoint's code (and ran it on "y"). The TP backend needs none of it."""
    import shutil

    source = shutil.copytree(tiny_model_factory("llama"), tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config |= {"model_type": model_type, "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}
    (source / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (source / "configuration_my.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaConfig\n"
        f"class MyConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
    )
    argv = ["--ckpt_file", str(source), "--save_path", str(tmp_path / "s"), "--n", "1"]
    if model_type == "mycustom":
        line = exits_with(split_main(), argv, capsys)
        assert line.startswith("error: model_type 'mycustom' is not supported by the TP backend")
    else:  # a built-in type: transformers' own class, as the PEFT path loads it
        split_main()(argv)
        assert (tmp_path / "s" / "params.json").is_file()
    assert not marker.exists()
