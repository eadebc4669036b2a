"""The attention seam (DESIGN.md, seam 1).

A model's attention layer computes q, k, v (after rope / qk-norm) and hands them to an implementation
that the *host* supplies when the model is built, through an `AttentionFactory`: a callable taking an
`AttentionSpec` and returning a module `impl(q, k, v) -> out` with q [T, H*D], k and v [T, Hkv*D],
out [T, H*D]. The model never builds or sees a KV cache.

Attention sinks (GPT-OSS: a learned logit per head in the softmax denominator) are the model's parameter;
a layer that has them sets `spec.has_sinks` and the factory is called as `factory(spec, sinks=tensor)`, so
the implementation holds the tensor from construction on (vLLM's Attention takes it there; SGLang's
RadixAttention takes it per call, which its wrapper can do from the stored reference). A factory without
a `sinks` parameter cannot build such a layer and is refused with the reason.

`PagedAttention` is ATOM's own implementation over a paged KV cache (used by atom-server and by the
core's tests). An implementation that keeps a host-allocated cache follows two small contracts:
- its `kv_cache_spec` (a `KVCacheSpec`, see kv_cache.py) says what to allocate; the host binds the
  allocated object to its `kv_cache` attribute (`bind_kv_caches`);
- its class names a `metadata_builder_cls` (an `AttentionMetadataBuilder`): the host builds one per
  model (`metadata_builder(model)`), turns each step's input into `AttentionInputs` (device tensors) and
  puts `builder.build(inputs)` in the forward context; for CUDA graphs it calls
  `builder.build_for_graph(inputs)` once per captured batch size with static buffers that it rewrites in
  place before every replay, then `builder.prepare_replay(metadata, num_rows)`.
An MLA implementation brings its own spec and builder the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atom.forward_context import get_forward_context
from atom.layers.fp8_input import Fp8RowMaxActivation, takes_rowmax
from atom.layers.kv_cache import (FullAttentionKVSpec, KVCacheSpec, PagedKVCache, SlidingWindowKVSpec,
                                  bind_kv_caches, check_cache_dtype, check_kv_scale, is_fp8,
                                  kv_cache_layers)
from atom.ops.attention import DecodePrep, write_kv_slots
from atom.ops.norm import rms_norm
from atom.envs import env_flag
from atom.ops.registry import impl_of, resolve
from atom.ops.rope import rotary_embedding

logger = logging.getLogger(__name__)

__all__ = ["Attention", "AttentionFactory", "AttentionInputs", "AttentionMetadataBuilder", "AttentionSpec",
           "PagedAttention", "PagedAttentionMetadata", "PagedAttentionMetadataBuilder", "attention_specs",
           "bind_kv_caches", "metadata_builder", "paged_attention_factory", "paged_attention_factory_for"]


@dataclass(frozen=True)
class AttentionSpec:
    layer_idx: int
    num_heads: int  # heads on this TP rank
    num_kv_heads: int  # KV heads on this TP rank
    head_dim: int
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None
    prefix: str = ""
    has_sinks: bool = False  # per-head sink logits join the softmax denominator (passed to the factory)


AttentionFactory = Callable[[AttentionSpec], nn.Module]


@dataclass
class AttentionInputs:
    """One step's attention inputs on the device, what every metadata builder starts from. B rows
    (sequences), T tokens; row b's queries are its last T_b = query_start_loc[b+1] - query_start_loc[b]
    tokens of seq_lens[b] context tokens. In a captured graph these are static buffers."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token, -1 = padding (not written)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context + new tokens
    max_query_len: int
    max_seq_len: int
    # A host that keeps only the window for sliding-window layers (a pool of their own): those layers'
    # slots and block tables (same logical block numbering; blocks before the window may be stale). None:
    # every layer uses slot_mapping / block_tables.
    window_slot_mapping: torch.Tensor | None = None
    window_block_tables: torch.Tensor | None = None


class AttentionMetadataBuilder:
    """Makes an attention implementation's per-step metadata (what it reads from the forward context)."""

    # The implementation's sliding-window layers read AttentionInputs.window_* when given (a host may
    # then keep only the window for them, in a pool of their own).
    supports_window_pool = False

    def __init__(self, specs: Sequence[KVCacheSpec]):
        self.specs = list(specs)

    def build(self, inputs: AttentionInputs) -> Any:
        """Eager step: metadata for these inputs."""
        raise NotImplementedError

    def build_for_graph(self, inputs: AttentionInputs) -> Any:
        """Once per captured batch size: metadata that aliases the static buffers of `inputs` (or buffers
        that prepare_replay refreshes), so in-place writes before a replay reach the graph."""
        return self.build(inputs)

    def prepare_replay(self, metadata: Any, num_rows: int) -> None:
        """Before each replay, after the host's inputs are on the device: device-side refresh of derived
        buffers (no host sync). num_rows: the real rows (the rest is padding)."""


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding (not written)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context + new tokens
    max_query_len: int
    max_seq_len: int
    window_slot_mapping: torch.Tensor | None = None  # sliding-window layers' own (AttentionInputs)
    window_block_tables: torch.Tensor | None = None
    # Every new token has a real slot (no padding rows), and the layers must not read max_query_len /
    # max_seq_len (a compiled step must not depend on them): qk-norm, rope and the KV write run as plain tensor
    # code that torch.compile traces, the attention implementation gets no max lengths (it computes them) and
    # is one opaque custom op under torch.compile. Set by atom-server's compiled CPU steps.
    traceable: bool = False


class PagedAttentionMetadataBuilder(AttentionMetadataBuilder):
    """PagedAttention reads the inputs as they are; its graph form aliases the static buffers."""

    supports_window_pool = True

    def build(self, inputs: AttentionInputs) -> PagedAttentionMetadata:
        return PagedAttentionMetadata(inputs.slot_mapping, inputs.block_tables, inputs.query_start_loc,
                                      inputs.seq_lens, inputs.max_query_len, inputs.max_seq_len,
                                      inputs.window_slot_mapping, inputs.window_block_tables)


# The decode prep inside the attention kernel: at decode the attention kernel does qk_norm_rope_cache's work
# itself (one launch a layer less; atom.ops.triton_kernels.attention's PREP). Measured on the H200 (BENCHMARKS.md,
# 2026-12-04's two A/Bs; 3 interleaved rounds, bf16): qwen3-8b (32 query heads over 8 KV heads: groups of 4)
# gained 60 us a step at batch 1 and 32 in every round in atom-server (0.97x / 0.99x) and 1.4% / 0.7% in
# vLLM+ATOM, and lost ~1% at 128; qwen3-0.6b (groups of 2) lost 3-6% at every batch (inside the fused kernel with
# groups of 2, attn_decode_bench.py). Re-measured on the H200 on 2026-12-07 (stop 65, 3 interleaved rounds, after the
# qkv partials' hand-off and dense_linear, under which the unfused step runs qk_norm_rope_cache and a sum kernel a
# layer): qwen3-0.6b's groups of 2 now gain in every round, batch 1 0.94 -> 0.86 ms a step, batch 32 1.29 -> 1.21.
# Not yet measured over FP8 caches, at groups of 1, or on other shapes.
# Hence the default rule (None, "auto"): fused for decode steps of at most FUSED_PREP_MAX_ROWS rows in layers whose
# KV heads serve at least FUSED_PREP_MIN_GROUP query heads. ATOM_ATTN_FUSED_DECODE_PREP=1 fuses every decode step,
# =0 none. Read by atom-server's PagedAttention and atom-vllm's attention backend alike.
FUSED_DECODE_PREP: bool | None = env_flag("ATOM_ATTN_FUSED_DECODE_PREP", None)
FUSED_PREP_MAX_ROWS = 32
FUSED_PREP_MIN_GROUP = 2


def fused_decode_attend(attend, prep):
    """The launcher of the attention kernel that does the decode prep itself (`paged_attention_impl`, taking
    `prep=DecodePrep(...)`) unless ATOM_ATTN_FUSED_DECODE_PREP=0, where both resolved ops, `paged_attention` and
    `qk_norm_rope_cache`, are the Triton kernels it merges; else None. Whether a step uses it: fuses_decode."""
    if FUSED_DECODE_PREP is False or any(getattr(impl_of(op), "backend", None) != "triton" for op in (attend, prep)):
        return None
    from atom.ops.triton_kernels import attention as triton_attention  # Triton is importable: resolved

    return triton_attention.paged_attention_impl


def fuses_decode(num_heads: int, num_kv_heads: int, rows: int, sinks: bool = False,
                 mode: bool | None = None) -> bool:
    """Whether a pure decode step of `rows` rows runs its prep inside the attention kernel (where the layer has
    the fused launcher). mode: FUSED_DECODE_PREP as the layer saw it when built; True (=1) always, else the
    measured rule, which leaves out layers with attention sinks (GPT-OSS: not among the measured shapes)."""
    if mode is not None:
        return mode
    return not sinks and rows <= FUSED_PREP_MAX_ROWS and num_heads >= FUSED_PREP_MIN_GROUP * num_kv_heads


class PagedAttention(nn.Module):
    metadata_builder_cls = PagedAttentionMetadataBuilder

    def __init__(self, spec: AttentionSpec, kv_cache_dtype: torch.dtype | None = None,
                 sinks: torch.Tensor | None = None):
        """kv_cache_dtype: None = the dtype the model is built in (torch's default dtype at construction); an
        FP8 type (torch.float8_e4m3fn, or float8_e4m3fnuz on MI300) stores fp8(k / k_scale), fp8(v / v_scale)
        with per-tensor scales from the checkpoint (load_kv_scale), else 1.0.
        sinks: the model's [num_heads] sink logits when spec.has_sinks."""
        super().__init__()
        self.spec = spec
        # A reference to the model's parameter, deliberately not registered here: the model owns and loads
        # it (registering it twice would list it under a second name).
        object.__setattr__(self, "sinks", sinks)
        dtype = check_cache_dtype(kv_cache_dtype or torch.get_default_dtype())
        common = dict(layer_idx=spec.layer_idx, dtype=dtype, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
        self.kv_cache_spec: FullAttentionKVSpec = (
            SlidingWindowKVSpec(sliding_window=spec.sliding_window, **common) if spec.sliding_window
            else FullAttentionKVSpec(**common))
        self.kv_cache: PagedKVCache | None = None
        # An FP8 cache is a build-time property of the ops (AITER's cache kernels take only the GPU's own FP8
        # type); sink layers ask for an implementation that has sinks (the AITER binding does not).
        static = {"kv_cache_dtype": dtype} if is_fp8(dtype) else {}
        self._write = resolve("reshape_and_cache", static=static or None)
        self._attend = resolve("paged_attention", static={**static, "has_sinks": True} if sinks is not None
                               else static or None)
        self._prep = resolve("qk_norm_rope_cache", static=static or None)
        # decode steps: the attention kernel does the prep's work itself (one launch a layer less), where both
        # ops are the Triton kernels it merges
        self._fused_attend = fused_decode_attend(self._attend, self._prep)
        self._fused_mode = FUSED_DECODE_PREP  # which decode steps use it (fuses_decode)
        # the Triton kernel's launcher, which can also store each output row's per-head maxima (rowmax_attend)
        self._rowmax_attend = None
        if getattr(impl_of(self._attend), "backend", None) == "triton":
            from atom.ops.triton_kernels import attention as triton_attention  # resolved: importable

            self._rowmax_attend = triton_attention.paged_attention_impl
        self._o_proj: tuple[nn.Module, ...] = ()  # the linear this layer's output feeds (feed_fp8_linear)

    def feed_fp8_linear(self, linear: nn.Module) -> None:
        """This layer's output goes to `linear` alone (the model's o_proj): where it is an FP8 linear whose GEMM
        quantizes per-token rows itself (atom.layers.fp8_input.takes_rowmax), hand it the output with its per-head
        maxima (an Fp8RowMaxActivation) instead of letting it run a quantization kernel."""
        if self._rowmax_attend is not None:
            self._o_proj = (linear,)  # a tuple: not a submodule

    def _rowmax(self, num_tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A float32 [num_tokens, num_heads] buffer for the per-head maxima when o_proj takes them this call."""
        if not self._o_proj or not takes_rowmax(self._o_proj[0], num_tokens, dtype):
            return None
        return torch.empty(num_tokens, self.spec.num_heads, dtype=torch.float32, device=self.kv_cache.k.device)

    def load_kv_scale(self, kind: str, value: float) -> None:
        """The checkpoint's per-tensor FP8 KV-cache scale of this layer ("k" or "v"): the cache stores
        entry = fp8(x / scale). Goes into the spec (what the host allocates from) and into a bound cache."""
        value = check_kv_scale(self.spec.prefix, kind, value, self.kv_cache_spec.dtype)
        self.kv_cache_spec = dataclasses.replace(self.kv_cache_spec, **{f"{kind}_scale": float(value)})
        cache = self.kv_cache
        if cache is not None and getattr(cache, f"{kind}_scale") is not None:
            getattr(cache, f"{kind}_scale").fill_(value)

    def _context(self):
        md = get_forward_context()
        if not isinstance(md, PagedAttentionMetadata) or self.kv_cache is None:
            raise RuntimeError("PagedAttention needs PagedAttentionMetadata in the forward context and a bound KV cache")
        return md

    def _slots_and_tables(self, md: PagedAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cache slots and block tables: the window pool's for a sliding-window layer when the
        host keeps one, else the main ones."""
        if self.spec.sliding_window and md.window_block_tables is not None:
            return md.window_slot_mapping, md.window_block_tables
        return md.slot_mapping, md.block_tables

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.spec
        md = self._context()
        num_tokens = q.shape[0]
        k = k.view(num_tokens, s.num_kv_heads, s.head_dim)
        v = v.view(num_tokens, s.num_kv_heads, s.head_dim)
        cache = self.kv_cache
        slots, tables = self._slots_and_tables(md)
        if md.traceable:
            write_kv_slots(k, v, cache.k, cache.v, slots, k_scale=cache.k_scale, v_scale=cache.v_scale)
            return self._attend_cached(q, md, tables, max_lengths=False)
        self._write(k, v, cache.k, cache.v, slots, k_scale=cache.k_scale, v_scale=cache.v_scale)
        return self._attend_cached(q, md, tables)

    def forward_with_prep(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                          cos_sin: torch.Tensor, is_neox: bool, qkv_parts: tuple | None = None) -> torch.Tensor:
        """forward() with the model's qk-norm (optional) and rope folded in: one qk_norm_rope_cache op does
        norm + rope + KV write (fewer launches per layer in decode). q, k un-normed and un-rotated. qkv_parts
        (only where fuses_decode_step said yes for these rows): q / k / v unwritten, the split-K qkv GEMM's
        partials (DecodePrep.qkv_parts) for the attention kernel to add."""
        md = self._context()
        fused = self._fuses_step(md, q.shape[0])
        if qkv_parts is not None and not fused:
            raise ValueError("PagedAttention: qkv partials are for steps whose decode prep runs inside the kernel")
        if md.traceable:  # the same ops, as traceable tensor code
            s = self.spec
            t = q.shape[0]
            if q_weight is not None:
                q = rms_norm(q.reshape(t, -1, s.head_dim), q_weight, eps).reshape(t, -1)
                k = rms_norm(k.reshape(t, -1, s.head_dim), k_weight, eps).reshape(t, -1)
            q, k = rotary_embedding(positions, q, k, s.head_dim, cos_sin, is_neox)
            return self.forward(q, k, v)
        cache = self.kv_cache
        slots, tables = self._slots_and_tables(md)
        # not under torch.compile: the fused launch is a plain function, not a custom op dynamo can keep opaque
        s = self.spec
        if fused:
            maxima = self._rowmax(q.shape[0], q.dtype)
            out = self._fused_attend(
                q.view(q.shape[0], s.num_heads, s.head_dim), cache.k, cache.v, tables, md.query_start_loc,
                md.seq_lens, s.scale, s.sliding_window, s.logit_softcap, md.max_query_len, md.max_seq_len,
                k_scale=cache.k_scale, v_scale=cache.v_scale, sinks=self.sinks,
                prep=DecodePrep(positions, k, v, q_weight, k_weight, eps, cos_sin, is_neox, slots, qkv_parts),
                maxima=maxima)
            out = out.reshape(q.shape[0], s.num_heads * s.head_dim)
            return out if maxima is None else Fp8RowMaxActivation(out, maxima)
        q, _ = self._prep(positions, q, k, v, q_weight, k_weight, eps, self.spec.head_dim, cos_sin, is_neox,
                          cache.k, cache.v, slots, k_scale=cache.k_scale, v_scale=cache.v_scale)
        return self._attend_cached(q, md, tables)

    # the attention kernel adds a split-K qkv GEMM's partials itself on the steps it does the prep of (SelfAttention)
    takes_qkv_parts = True

    def _fuses_step(self, md: PagedAttentionMetadata, rows: int) -> bool:
        s = self.spec
        return (self._fused_attend is not None and not md.traceable and md.max_query_len == 1
                and rows == md.seq_lens.shape[0]
                and fuses_decode(s.num_heads, s.num_kv_heads, rows, self.sinks is not None, self._fused_mode)
                and not torch.compiler.is_compiling())

    def fuses_decode_step(self, rows: int) -> bool:
        """Whether forward_with_prep runs this step's prep (`rows` query rows) inside the attention kernel."""
        return self._fuses_step(self._context(), rows)

    def _attend_cached(self, q: torch.Tensor, md: PagedAttentionMetadata, block_tables: torch.Tensor,
                       max_lengths: bool = True) -> torch.Tensor:
        s = self.spec
        num_tokens = q.shape[0]
        cache = self.kv_cache
        maxima = self._rowmax(num_tokens, q.dtype) if max_lengths else None  # not on the traceable path
        attend = self._attend if maxima is None else functools.partial(self._rowmax_attend, maxima=maxima)
        out = attend(q.view(num_tokens, s.num_heads, s.head_dim), cache.k, cache.v, block_tables,
                     md.query_start_loc, md.seq_lens, s.scale, s.sliding_window, s.logit_softcap,
                     md.max_query_len if max_lengths else None, md.max_seq_len if max_lengths else None,
                     k_scale=cache.k_scale, v_scale=cache.v_scale, sinks=self.sinks)
        out = out.reshape(num_tokens, s.num_heads * s.head_dim)
        return out if maxima is None else Fp8RowMaxActivation(out, maxima)


def paged_attention_factory(spec: AttentionSpec, sinks: torch.Tensor | None = None) -> nn.Module:
    return PagedAttention(spec, sinks=sinks)


def paged_attention_factory_for(kv_cache_dtype: torch.dtype | None) -> AttentionFactory:
    """ATOM's paged attention with its cache in `kv_cache_dtype` (None: the model's dtype)."""
    if kv_cache_dtype is None:
        return paged_attention_factory

    def factory(spec: AttentionSpec, sinks: torch.Tensor | None = None) -> nn.Module:
        return PagedAttention(spec, kv_cache_dtype=kv_cache_dtype, sinks=sinks)

    return factory


def attention_specs(model: nn.Module) -> list[AttentionSpec]:
    """The spec of every attention layer of a model, in layer order (what a host sizes its cache from)."""
    return sorted((m.spec for m in model.modules() if isinstance(m, Attention)), key=lambda s: s.layer_idx)


def metadata_builder(model: nn.Module) -> AttentionMetadataBuilder | None:
    """The metadata builder of the model's cache-owning attention implementation (None: no such layer).
    Every such layer of one model must use the same builder class (one metadata object per step)."""
    layers = kv_cache_layers(model)
    classes = {type(m).metadata_builder_cls for m in layers}
    if not classes:
        return None
    if len(classes) > 1:
        raise ValueError("the model mixes attention implementations with different metadata builders: "
                         + ", ".join(sorted(c.__name__ for c in classes)))
    return classes.pop()([m.kv_cache_spec for m in layers])


def _takes_sinks(factory: AttentionFactory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: let the call decide
        return True
    return any(p.name == "sinks" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class Attention(nn.Module):
    """Model-side attention front-end: holds the spec and the host's implementation."""

    def __init__(self, spec: AttentionSpec, attn_factory: AttentionFactory | None = None,
                 sinks: torch.Tensor | None = None):
        super().__init__()
        if spec.has_sinks != (sinks is not None):
            raise ValueError(f"attention layer {spec.prefix!r}: spec.has_sinks={spec.has_sinks} but sinks "
                             f"{'missing' if sinks is None else 'given'}")
        self.spec = spec
        factory = attn_factory or paged_attention_factory
        if sinks is None:
            self.impl = factory(spec)
            return
        if not _takes_sinks(factory):
            raise ValueError(f"attention layer {spec.prefix!r} has attention sinks, which this host's attention "
                             f"implementation ({getattr(factory, '__qualname__', type(factory).__qualname__)}) "
                             "does not support")
        self.impl = factory(spec, sinks=sinks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.impl(q, k, v)

    def feed_fp8_linear(self, linear: nn.Module) -> None:
        """The output goes to `linear` alone: the implementation may hand it FP8-ready activations (ATOM's
        PagedAttention; hosts' implementations keep their float output)."""
        feed = getattr(self.impl, "feed_fp8_linear", None)
        if feed is not None:
            feed(linear)

    def load_kv_scale(self, kind: str, value: float) -> None:
        """A checkpoint's per-tensor FP8 KV-cache scale ("k" or "v") for this layer, handed to the host's
        implementation (its `load_kv_scale`); one without it ignores the scales (logged once), as vLLM does
        for a layer that does not take them."""
        hand_kv_scale(self.impl, self.spec.prefix, kind, value)


def hand_kv_scale(impl: nn.Module, prefix: str, kind: str, value: float) -> None:
    """Give a host implementation a checkpoint's FP8 KV-cache scale through its `load_kv_scale`; an
    implementation without one ignores the scales (logged once)."""
    load = getattr(impl, "load_kv_scale", None)
    if load is not None:
        load(kind, value)
    elif not _warned_kv_scales:
        _warned_kv_scales.append(type(impl).__name__)
        logger.warning("the checkpoint has FP8 KV-cache scales (%s_scale of %s), but the attention "
                       "implementation %s does not take them: ignored", kind, prefix, type(impl).__name__)


_warned_kv_scales: list[str] = []
