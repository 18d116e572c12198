"""FairScale tensor-parallel backend: a llama-style model split over ``torchrun`` ranks.

- :mod:`rlhf.tp.model`: ``ModelArgs`` and the ``Transformer`` (llama, mistral, mixtral, qwen2, qwen).
- :mod:`rlhf.tp.key_maps`: Hugging Face <-> shard key names per family, and config -> ``ModelArgs``.
- :mod:`rlhf.tp.checkpoint`: pure split/merge functions, streaming readers, sharded dirs on disk.
- :mod:`rlhf.tp.loading`: a model for this rank from a shard dir or a plain HF dir.
- :mod:`rlhf.tp.distributed`: process group + FairScale model-parallel groups (gloo on CPU, NCCL on GPU).
- :mod:`rlhf.tp.generation`: batched generation with a KV cache and left padding.
- :mod:`rlhf.tp.lora`: LoRA on column- and row-parallel layers.
- :mod:`rlhf.tp.solver_evaluate`: ``torchrun --nproc_per_node N -m rlhf.tp.solver_evaluate ...``.
"""
