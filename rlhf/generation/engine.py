"""The rollout engine: static KV cache, prefill, a decode loop with on-device sampling and EOS tracking.

One engine serves every model side (:class:`rlhf.generation.decoder.Decoder`). A generation:

1. pads the batch to a bucket of rows when CUDA graphs are on (extra rows are all padding);
2. captures the decode graph of that bucket on first use (:class:`rlhf.generation.graphs.DecodeGraphs`),
   then empties the cache rows;
3. prefills the left-padded prompts (in chunks of ``prefill_chunk`` columns if set) at slots
   ``0..P-1``; positions count real tokens, pads get -1;
4. decodes one token per row per step at slots ``P, P+1, ...``: sample on the device
   (:func:`rlhf.generation.sampling.sample_next`), broadcast across TP ranks (``Decoder.sync``), record
   the token and its log-prob, mark rows that produced EOS, write the token into the step's input buffers
   and run the step (a graph replay on GPU, the same step eagerly on CPU);
5. every ``check_every`` steps the host asks whether all rows ended (the only device->host sync in the
   loop) and runs the optional ``stop(row, tokens)`` callback (stop strings).

The result is a :class:`rlhf.generation.base.Generation`: responses right-padded after the first EOS (or
the point where ``stop`` ended the row), the mask including the EOS, and the sampled tokens' log-probs.
The cache is allocated by :meth:`RolloutEngine.reserve` (PPO calls it at start through
:meth:`EngineGenerator.prepare`) or else at the first generation, for ``max_batch_size`` rows x ``max_length``
slots, and reused; a longer request re-allocates it (with a warning) and drops the graphs.

On CPU the engine runs eagerly (and the tests drive the graph bookkeeping with a capture that re-runs the
step); the CUDA-graph path ran on an H200 (``tests/test_generation_gpu.py``, ``bench/RESULTS.md``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from rlhf.errors import ConfigError
from rlhf.generation.attention import sdpa_backends
from rlhf.generation.base import Generation, SamplingConfig, eos_ids, is_eos, response_mask_after_eos
from rlhf.generation.cache import StaticKVCache
from rlhf.generation.decoder import Decoder
from rlhf.generation.graphs import Capture, DecodeGraphs, StaleGraphError, batch_buckets, bucket_for
from rlhf.generation.sampling import sample_next

logger = logging.getLogger(__name__)

StopFn = Callable[[int, list[int]], bool]


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded prompts: 0 at each row's first real token, -1 on pads. [B, P] -> [B, P]."""
    mask = prompt_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)


def pad_rows(x: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    """``x`` [B, ...] with rows of ``value`` appended up to ``rows``."""
    if x.shape[0] >= rows:
        return x
    extra = torch.full((rows - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, extra])


class StopTracker:
    """Rows that a ``stop(row, tokens)`` callback ends (stop strings), checked every few steps.

    Each check asks about every row still running at the previous check, with its tokens up to its EOS
    (excluded) or to now; a row it ends gets the first length where ``stop`` holds, as if checked after
    every token. ``offset`` is added to the row index passed to ``stop``.
    """

    def __init__(self, stop: StopFn, eos_token_id: int | tuple[int, ...] | None, offset: int = 0) -> None:
        self.stop, self.eos_token_id, self.offset = stop, eos_token_id, offset
        self.ends: dict[int, int] = {}  # row -> response length
        self.checked = 0  # steps seen by the previous check

    def check(self, tokens: torch.Tensor, done: torch.Tensor) -> None:
        """tokens [rows, steps] generated so far; marks the rows it ends in ``done`` [>= rows]."""
        steps, checked = tokens.shape[1], self.checked
        self.checked = steps
        lengths = response_mask_after_eos(tokens, self.eos_token_id).sum(-1).tolist()  # through the EOS
        rows = [r for r, n in enumerate(lengths) if n > checked and r not in self.ends]
        if not rows:
            return
        for row, row_tokens in zip(rows, tokens[rows].tolist()):
            ended = lengths[row] > 0 and row_tokens[lengths[row] - 1] in eos_ids(self.eos_token_id)
            n_max = lengths[row] - int(ended)  # tokens before the EOS
            if not self.stop(self.offset + row, row_tokens[:n_max]):
                continue
            first = (n for n in range(checked + 1, n_max + 1) if self.stop(self.offset + row, row_tokens[:n]))
            self.ends[row] = next(first, n_max)
            done[row] = True


class RolloutEngine:
    """Generates for one model side; see the module docstring.

    cuda_graphs: None = on when the model is on a GPU and its steps can be captured; ``capture`` replaces
    CUDA graph capture (tests). ``max_length`` (prompt + response tokens) and ``max_batch_size`` size the
    cache; ``check_every`` is how many steps pass between the host's checks; ``prefill_chunk`` bounds the
    prompt columns per prefill step (None: all at once). ``compile_backend`` (e.g. ``"inductor"``) runs the
    decode step through ``torch.compile`` with that backend before any graph capture, fusing its small
    kernels (norms, RoPE, the adapters' scale-and-add); the prefill stays eager. Not yet measured on a GPU,
    so off by default (``bench/rollout.py`` measures it).
    """

    def __init__(
        self,
        decoder: Decoder,
        *,
        max_batch_size: int,
        max_length: int,
        cuda_graphs: bool | None = None,
        check_every: int = 8,
        prefill_chunk: int | None = None,
        capture: Capture | None = None,
        compile_backend: str | Callable | None = None,
    ) -> None:
        self.decoder = decoder
        self._step = decoder.step
        if compile_backend is not None:
            self._step = torch.compile(decoder.step, backend=compile_backend, dynamic=False)
        self.max_batch_size, self.max_length = max_batch_size, max_length
        device = decoder.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and decoder.capturable
        elif cuda_graphs and not decoder.capturable:
            raise ConfigError(
                f"{type(decoder).__name__}: this model's steps cannot be captured as CUDA graphs"
            )
        elif cuda_graphs and capture is None and device.type != "cuda":
            raise ConfigError(f"CUDA graphs need the model on a GPU; it is on {device}")
        self.check_every, self.prefill_chunk = max(1, check_every), prefill_chunk
        self.buckets = batch_buckets(max_batch_size) if cuda_graphs else None
        self.cache: StaticKVCache | None = None
        # the decode step's inputs: graphs read these buffers, so the loop writes into them in place
        self.tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs = DecodeGraphs(self._weak_decode_step(), decoder.module, capture) if cuda_graphs else None
        logger.info(
            "rollout engine: %s, %s%s, up to %d rows x %d tokens",
            type(decoder).__name__, "CUDA graphs per batch bucket" if cuda_graphs else "eager steps",
            f", decode step compiled ({compile_backend})" if compile_backend else "", max_batch_size, max_length,
        )  # fmt: skip

    def _weak_decode_step(self) -> Callable[[int], torch.Tensor]:
        """:meth:`_decode_step` through a weak reference: the graphs held by this engine must not hold it
        back, or a dropped engine (its KV cache, graph pool and model) would wait for the cyclic garbage
        collector instead of being freed at once (``del model`` before loading the verifier)."""
        engine = weakref.ref(self)
        return lambda batch: engine()._decode_step(batch)

    def _decode_step(self, batch: int) -> torch.Tensor:
        return self._step(self.tokens[:batch], self.positions[:batch], self.slot, self.cache)

    def reserve(self) -> None:
        """Allocate the static KV cache now (``max_batch_size`` rows x ``max_length`` slots; logged)."""
        self._reserve(self.max_length)

    def _reserve(self, length: int) -> None:
        """A cache for ``max_batch_size`` rows and at least ``length`` slots in the compute dtype."""
        dtype, device = self.decoder.compute_dtype(), self.decoder.device
        if self.cache is not None and self.cache.fits(self.max_batch_size, length, dtype, device):
            return
        if self.cache is not None:
            logger.warning(
                "re-allocating the KV cache for %d slots in %s (had %d in %s)",
                length, dtype, self.cache.max_len, self.cache.dtype,
            )  # fmt: skip
            self.cache = None  # free it before the new one is allocated
            if self.graphs is not None:
                self.graphs.clear()
        slots = max(length, self.max_length)
        self.cache = self.decoder.new_cache(self.max_batch_size, -(-slots // 16) * 16, dtype)
        # the step's input buffers may still point past a smaller new cache (a longer earlier request): the
        # capture before this generation's prefill runs the step on them
        self.slot.zero_()
        self.positions.zero_()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        *,
        generator: torch.Generator | None = None,
        stop: StopFn | None = None,
    ) -> Generation:
        """Responses to left-padded prompts (prompt_ids, prompt_mask [B, P]); any B (split by capacity).

        ``generator`` drives the sampling (default: the global RNG); ``stop(row, tokens)`` may end row
        ``row`` early given its tokens so far (checked every ``check_every`` steps; the row then ends at
        the first length where ``stop`` holds).
        """
        if prompt_ids.shape[0] == 0:  # no prompts: no responses (a caller's empty last chunk)
            empty = prompt_ids.new_zeros((0, 0), dtype=torch.long)
            return Generation(empty, empty.clone(), torch.zeros((0, 0), device=prompt_ids.device))
        parts = [
            self._generate(prompt_ids[i : i + self.max_batch_size], prompt_mask[i : i + self.max_batch_size],
                           sampling, generator, stop, offset=i)
            for i in range(0, prompt_ids.shape[0], self.max_batch_size)
        ]  # fmt: skip
        if len(parts) == 1:
            return parts[0]
        width = max(p.response_ids.shape[1] for p in parts)

        def cat(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
            return torch.cat(
                [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]
            )

        return Generation(
            cat([p.response_ids for p in parts], sampling.pad_token_id),
            cat([p.response_mask for p in parts], 0),
            cat([p.logprobs for p in parts], 0.0),
        )

    def _generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop: StopFn | None,
        offset: int = 0,
    ) -> Generation:
        decoder, device = self.decoder, self.decoder.device
        rows, width, budget = prompt_ids.shape[0], prompt_ids.shape[1], sampling.max_new_tokens
        self._reserve(width + budget)
        batch = bucket_for(rows, self.buckets) if self.buckets else rows
        ids = pad_rows(prompt_ids.to(device), batch, sampling.pad_token_id)
        mask = pad_rows(prompt_mask.to(device), batch, 0)
        decoder.refresh()
        with sdpa_backends(device), decoder.generating():
            graph_key = self._graph_key(batch, device)
            self.cache.reset(batch)
            logits = self._prefill(ids, prompt_positions(mask))
            self.positions[:batch, 0] = mask.long().sum(-1) - 1
            self.slot.fill_(width - 1)
            tokens_out = torch.full((batch, budget), sampling.pad_token_id, dtype=torch.long, device=device)
            logprobs_out = torch.zeros((batch, budget), dtype=torch.float32, device=device)
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            done[rows:] = True  # bucket padding
            eos = sampling.eos_token_id
            stops = StopTracker(stop, eos, offset) if stop is not None else None
            steps = 0
            for step in range(budget):
                tokens, logprobs = sample_next(logits, step, sampling, generator, decoder.sync)
                tokens_out[:, step], logprobs_out[:, step] = tokens, logprobs
                if eos is not None:
                    done |= is_eos(tokens, eos)
                steps = step + 1
                if steps == budget:
                    break
                if steps % self.check_every == 0:
                    if stops is not None:
                        stops.check(tokens_out[:rows, :steps], done)
                    if bool(done.all()):
                        break
                self.tokens[:batch, 0] = tokens
                self.positions[:batch].add_(1)
                self.slot.add_(1)
                logits = self._decode(batch, graph_key)
            if stops is not None:
                stops.check(tokens_out[:rows, :steps], done)
        ends = stops.ends if stops is not None else {}
        return self._result(
            tokens_out[:rows, :steps], logprobs_out[:rows, :steps], ends, sampling, prompt_ids
        )

    def _graph_key(self, batch: int, device: torch.device) -> tuple | None:
        """The decode graph of ``batch`` rows in the current model state, captured if new (None: eager).

        Warm-up and capture write into the cache, so this runs before the cache is reset. A capture that
        fails (an operation of this model that CUDA graphs cannot record) turns the graphs off for this
        engine with a warning: decoding goes on eagerly, with the same tokens. Stale weights, running out of
        memory and a failed compile of the step still raise.
        """
        if self.graphs is None:
            return None
        try:
            return self.graphs.prepare(batch, self.decoder.state_key(), device)
        except (StaleGraphError, torch.OutOfMemoryError, torch._dynamo.exc.TorchDynamoException):
            raise  # stale weights, no memory or a failed --generation_compile: not a capture problem
        except RuntimeError as error:
            cause = error.__context__ or error  # capture_end's error hides the operation that broke it
            logger.warning(
                "rollout engine: capturing the decode step as a CUDA graph failed (%s: %s); decoding "
                "eagerly from now on", type(cause).__name__, str(cause).splitlines()[0] if str(cause) else "",
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.graphs = None
            return None

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the prompts [B, P] through the model at slots 0..P-1; logits [B, V] of the last column."""
        width = ids.shape[1]
        chunk = self.prefill_chunk or width
        slots = torch.arange(width, device=ids.device)
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            logits = self.decoder.step(
                ids[:, start:end], positions[:, start:end], slots[start:end], self.cache
            )
        return logits

    def _decode(self, batch: int, graph_key: tuple | None) -> torch.Tensor:
        if graph_key is not None:
            return self.graphs.run(graph_key)
        return self._decode_step(batch)

    @staticmethod
    def _result(
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        ends: dict[int, int],
        sampling: SamplingConfig,
        like: torch.Tensor,
    ) -> Generation:
        """Cut after EOS or the ``stop`` length, trim columns no row uses, move to ``like``'s device."""
        mask = response_mask_after_eos(tokens, sampling.eos_token_id)
        if ends:
            limit = torch.full((tokens.shape[0], 1), tokens.shape[1], dtype=torch.long, device=tokens.device)
            for row, length in ends.items():
                limit[row] = length
            mask = mask * (torch.arange(tokens.shape[1], device=tokens.device)[None] < limit).long()
        width = max(int(mask.sum(-1).max()), 1) if tokens.shape[0] else 0
        mask = mask[:, :width]
        tokens = tokens[:, :width].masked_fill(mask == 0, sampling.pad_token_id)
        logprobs = logprobs[:, :width] * mask
        return Generation(tokens.to(like.device), mask.to(like.device), logprobs.to(like.device))


class EngineGenerator:
    """:class:`rlhf.generation.Generator` on the engine: ``generate(prompt_ids, prompt_mask)``.

    ``model_context()`` yields the model to generate with (for the PEFT bundle: the base with the actor
    adapter active, as ``HFGenerator`` takes it); ``decoder_factory(model)`` makes its model side. The
    engine is built by :meth:`prepare` or the first generation and reused while the context yields the same
    model.
    """

    def __init__(
        self,
        model_context: Callable[[], AbstractContextManager[Any]],
        sampling: SamplingConfig,
        *,
        max_prompt_length: int,
        max_batch_size: int,
        decoder_factory: Callable[[Any], Decoder],
        generator: torch.Generator | None = None,
        **engine_options: Any,
    ) -> None:
        self.model_context, self.sampling = model_context, sampling
        self.max_prompt_length, self.max_batch_size = max_prompt_length, max_batch_size
        self.decoder_factory, self.generator = decoder_factory, generator
        self.engine_options = engine_options
        self.engine: RolloutEngine | None = None

    def engine_for(self, model: Any) -> RolloutEngine:
        if self.engine is None or self.engine.decoder.module is not model:
            self.engine = RolloutEngine(
                self.decoder_factory(model), max_batch_size=self.max_batch_size,
                max_length=self.max_prompt_length + self.sampling.max_new_tokens, **self.engine_options,
            )  # fmt: skip
        return self.engine

    @torch.no_grad()
    def prepare(self) -> None:
        """Build the engine for the model the context yields and allocate its KV cache (the size is logged),
        so a run states its generation memory at start rather than at the first rollout."""
        with self.model_context() as model:
            self.engine_for(model).reserve()

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        stop: StopFn | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Generation:
        """``sampling``: other settings than the generator's for this call (e.g. greedy for an evaluation;
        the same engine, KV cache and graphs)."""
        with self.model_context() as model:
            engine = self.engine_for(model)
            return engine.generate(
                prompt_ids, prompt_mask, sampling or self.sampling, generator=self.generator, stop=stop
            )
