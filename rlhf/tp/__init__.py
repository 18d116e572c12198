"""FairScale tensor-parallel backend: a llama-style model split over ``torchrun`` ranks.

Model and checkpoints:

- :mod:`rlhf.tp.model`: ``ModelArgs``, the ``Transformer`` (llama, mistral, mixtral, qwen2, qwen) and
  ``ScalarHeadTransformer`` (verifier / critic).
- :mod:`rlhf.tp.key_maps`: Hugging Face <-> shard key names per family (scalar head: ``score`` <->
  ``v_head``), config -> ``ModelArgs``, ``--model_type`` checks.
- :mod:`rlhf.tp.convert_weights`: pure split/merge tensor functions over the key maps.
- :mod:`rlhf.tp.hf_checkpoint`: HF weight files read one tensor at a time, config.json, safetensors out.
- :mod:`rlhf.tp.shard_dir`: the shard dir (``params.json`` + ``consolidated.NN.pth``), checked and written.
- :mod:`rlhf.tp.split_merge`: whole dirs, what ``checkpoint_split.py`` runs.
- :mod:`rlhf.tp.loading`: a model for this rank from a shard dir or a plain HF dir (+ ``--peft_path``).
- :mod:`rlhf.tp.distributed`: process group + FairScale model-parallel groups (gloo on CPU, NCCL on GPU).
- :mod:`rlhf.tp.lora`: LoRA on column- and row-parallel layers.

The Llama-RLHF workflow (``torchrun --nproc_per_node N -m rlhf.tp.<command> ...``):

- :mod:`rlhf.tp.prompt`: the GSM8K prompt template.
- :mod:`rlhf.tp.train_args`, :mod:`rlhf.tp.examples`, :mod:`rlhf.tp.training`, :mod:`rlhf.tp.trained_dir`:
  the flags, the sequences, the loop (on ``TPBackend``) and the output dir of solver_train / verifier_train.
- :mod:`rlhf.tp.solver_train`: supervised fine-tuning of the solver (LoRA or full).
- :mod:`rlhf.tp.verifier`: verifier inputs, training rows and scoring.
- :mod:`rlhf.tp.verifier_train`: the verifier (scalar head, binary cross-entropy).
- :mod:`rlhf.tp.solver_evaluate`: GSM8K evaluation, majority vote and verifier best-of-N.
- :mod:`rlhf.tp.backend`: ``TPBackend`` (the :class:`rlhf.backend.Backend` of one TP replica).
- :mod:`rlhf.tp.ppo_factory`: ``build_tp_session`` (the TP parts of a PPO session).
- :mod:`rlhf.tp.ppo_models`: ``TPPolicyModels`` (the PPO models bundle: TP actor, reference, critic,
  reward).
- :mod:`rlhf.tp.ppo_train`: PPO with a verifier and/or GSM8K rule reward.
"""
