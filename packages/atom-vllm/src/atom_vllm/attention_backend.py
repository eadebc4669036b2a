"""ATOM's paged attention as a vLLM attention backend (issue 16 target 1).

vLLM keeps everything it owns: the KV cache (its allocation, layout, prefix caching, the hybrid manager's
windows), the scheduler, the metadata its runner prepares and the CUDA graphs. The backend only changes the
kernels its `Attention` layer runs: ATOM's KV write (`reshape_and_cache`) and ATOM's varlen paged attention
(`paged_attention`: decode splits over each sequence's own keys, sinks, windows, soft-capping, FP8 caches),
the ones atom-server runs. `VllmAttentionFactory` hands the class to each `Attention` layer it builds
(`attn_backend=`), so no flag is needed: on GPUs by default, on CPU with ATOM_VLLM_ATTENTION=1 (vLLM's native CPU
attention reads its own layout faster than ATOM's torch references do); ATOM_VLLM_ATTENTION=0 keeps vLLM's.

The cache comes in vLLM's layout and ATOM's kernels read it through strides: vLLM <= 0.29 allocates what
`get_kv_cache_shape` says, [num_blocks, 2, block_size, num_kv_heads, head_size] (K and V halves of a block);
vLLM >= 0.30 hands a layer the logical [num_blocks, num_kv_heads, block_size, 2 * head_size] (K | V on the
last axis). Either way the K and V views are [num_blocks, block_size, num_kv_heads, head_size] with a unit
last stride, ATOM's cache shape.

CUDA graphs: full graphs for batches of single-token decodes (vLLM pads them with empty rows: seq_len 0,
slot -1, which write nothing and attend to nothing); the graph is captured at max_seq_len = max_model_len and
ATOM's decode kernel splits each sequence's own keys, so one capture serves every context. Other batches run
the op eagerly between vLLM's piecewise graphs.

Fused decode prep (atom.layers.attention's rule: decode steps of at most 32 rows in layers whose KV heads serve 4+
query heads, no sinks; ATOM_ATTN_FUSED_DECODE_PREP=1 every decode step, =0 none; atom-server's switch): at a
pure decode step (max_query_len 1, one token a sequence) ATOM's Triton attention kernel does the work of the
qk_norm_rope_cache op itself (q/k RMS-norm, rope, the K/V write; `paged_attention_impl(prep=DecodePrep)`), one
launch a layer less. The model's prep op (atom_vllm::norm_rope_write, inside vLLM's compiled pieces) then
launches nothing: it stashes the raw q and the prep's arguments on this layer's impl and returns a placeholder
of q's shape, which vLLM's attention op (`forward`) hands back; `forward` takes the stash (checked to be this
step's) and runs the fused kernel. Both ops decide alike from the same forward context: Triton resolved for
both ops, metadata present, max_query_len 1, tokens == sequences, the rule, and not a piecewise CUDA graph (there
the prep op is replayed from its capture without Python, so it must keep its own kernel). Full CUDA graphs of uniform
decode batches capture the fused kernel (padded rows: seq_len 0, slot -1). Every other step runs the two ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from atom.layers import attention as core_attention
from atom.ops.attention import DecodePrep
from atom.ops.registry import resolve
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)

# vLLM's --kv-cache-dtype values ATOM's kernels store: the model's dtype, a 16-bit one, or FP8 e4m3 (per-tensor
# scales; the FP8 type of the platform, e4m3fnuz on MI300)
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3")


@dataclass
class AtomAttentionMetadata:
    """One step's metadata: views of vLLM's persistent buffers (what a captured graph reads on replay)."""

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: context + new tokens
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding


class AtomAttentionMetadataBuilder(AttentionMetadataBuilder[AtomAttentionMetadata]):
    # Full CUDA graphs for pure single-token decode batches; the rest runs between vLLM's piecewise graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AtomAttentionMetadata:
        m = common_attn_metadata
        return AtomAttentionMetadata(num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
                                     max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc,
                                     seq_lens=m.seq_lens, block_table=m.block_table_tensor,
                                     slot_mapping=m.slot_mapping)


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer cache -> (K, V) views [num_blocks, block_size, num_kv_heads, head_size]."""
    if kv_cache.dim() == 5:  # vLLM <= 0.29: our get_kv_cache_shape, [num_blocks, 2, block_size, H, D]
        return kv_cache[:, 0], kv_cache[:, 1]
    # vLLM >= 0.30: logical [num_blocks, H, block_size, D_k + D_v] in whatever physical layout it chose
    k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return k, v


class AtomAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = True  # ATOM writes K and V inside the op, before attending

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM keys backends by an enum member; CUSTOM is the one for third parties

    @staticmethod
    def get_impl_cls() -> type[AtomAttentionImpl]:
        return AtomAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AtomAttentionMetadataBuilder]:
        return AtomAttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """vLLM <= 0.29 asks the backend (later releases decide the layout themselves)."""
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True


class AtomAttentionImpl(AttentionImpl[AtomAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **unused) -> None:
        if alibi_slopes is not None:
            raise ValueError("ATOM's attention backend has no ALiBi; set ATOM_VLLM_ATTENTION=0")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"ATOM's attention backend runs decoder attention only, not {attn_type!r}; "
                             "set ATOM_VLLM_ATTENTION=0")
        if kv_sharing_target_layer_name is not None:
            raise ValueError("ATOM's attention backend does not share KV caches across layers; "
                             "set ATOM_VLLM_ATTENTION=0")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: ATOM's attention backend stores "
                             f"{', '.join(KV_CACHE_DTYPES)}; set ATOM_VLLM_ATTENTION=0 for vLLM's backends")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8 = kv_cache_dtype.startswith("fp8")
        self.sinks = sinks
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.supports_quant_query_input = False  # vLLM must not hand us FP8 queries
        static = {"kv_cache_dtype": _fp8_dtype()} if self.fp8 else None
        self._write = resolve("reshape_and_cache", static=static)
        self._attend = resolve("paged_attention", static={**(static or {}), "has_sinks": True}
                               if sinks is not None else static)
        self._attend_into = _into_variant(self._attend)
        self._prep = resolve("qk_norm_rope_cache", static=static)
        # ATOM_ATTN_FUSED_DECODE_PREP (atom.layers.attention): decode steps run the prep inside the attention
        # kernel, where both ops are the Triton kernels it merges (atom-server's condition)
        self._fused_attend = core_attention.fused_decode_attend(self._attend, self._prep)
        self._fused_mode = core_attention.FUSED_DECODE_PREP  # which decode steps use it (fuses_decode)
        self._stash: tuple | None = None  # (metadata, raw q, DecodePrep) from norm_rope_write to forward
        self.fused_decode_steps = 0  # forward calls that ran the fused kernel (tests, logs)

    def _caches(self, layer: torch.nn.Module, kv_cache: torch.Tensor):
        """(K view, V view, k_scale, v_scale) of this layer's cache (ATOM's kernels' arguments)."""
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        if not self.fp8:
            return k_cache, v_cache, None, None
        fp8 = _fp8_dtype()
        if k_cache.dtype != fp8:  # vLLM allocates FP8 caches as bytes
            k_cache, v_cache = k_cache.view(fp8), v_cache.view(fp8)
        return k_cache, v_cache, layer._k_scale, layer._v_scale

    def norm_rope_write(self, layer: torch.nn.Module, kv_cache: torch.Tensor, md: AtomAttentionMetadata | None,
                        slots: torch.Tensor | None, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                        cos_sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
        """The model's qk-norm (optional) and rope of q and k and this layer's KV write in one ATOM op (atom-server's
        decode prep); returns the rotated q for forward(), which then writes nothing (no key rows). At a fused
        decode step (_fuses_decode) it launches nothing: the arguments wait on this impl for forward()'s kernel.
        slots: the forward context's slot mapping of the layer (the persistent buffer vLLM's own KV update reads
        inside its piecewise graphs), else the metadata's."""
        num_tokens = q.shape[0]
        self._stash = None
        if self._fuses_decode(md, kv_cache):  # forward() runs qk_norm_rope_cache's work in its kernel
            n = md.num_actual_tokens
            slots = (md.slot_mapping if slots is None else slots)[:n]
            # views of the model's qkv: kept alive by these references until forward() (a compiled piece ends at
            # the attention op; after this op it allocates only the attention's output, smaller than qkv, so
            # Inductor's buffer reuse has nothing to put in qkv's place first; check on a GPU with Inductor)
            self._stash = (md, q[:n], DecodePrep(positions[:n], k[:n], v[:n], q_weight, k_weight, eps, cos_sin,
                                                 is_neox, slots))
            # a custom op's output must not alias its input: forward() reads the stashed q, not this
            return torch.empty_like(q, memory_format=torch.contiguous_format)
        if kv_cache.numel() == 0 or (md is None and slots is None):  # vLLM's memory-profiling run: no cache yet
            slots = torch.full((num_tokens,), -1, dtype=torch.long, device=q.device)
            k_cache = v_cache = torch.empty(1, 1, self.num_kv_heads, self.head_size, dtype=k.dtype, device=k.device)
            k_scale = v_scale = None
        else:
            # No metadata with a bound cache is how vLLM captures its piecewise CUDA graphs: the forward context's
            # slots are its persistent buffer (-1 while capturing, the step's slots when the piece is replayed), so
            # the captured write must go through them into the real cache (a private dummy here left every replayed
            # prefill's keys and values unwritten)
            k_cache, v_cache, k_scale, v_scale = self._caches(layer, kv_cache)
            slots = md.slot_mapping if slots is None else slots
            if slots.shape[0] < num_tokens:  # rows past the step's tokens (padding) write nothing
                slots = torch.cat((slots, slots.new_full((num_tokens - slots.shape[0],), -1)))
            slots = slots[:num_tokens]
        q_out, _ = self._prep(positions, q, k, v, q_weight, k_weight, eps, self.head_size, cos_sin, is_neox,
                              k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
        return q_out

    def _fuses_decode(self, md: AtomAttentionMetadata | None, kv_cache: torch.Tensor) -> bool:
        """Whether this step's prep runs inside the attention kernel (the same answer in norm_rope_write and
        forward: both read the step's forward context)."""
        return (self._fused_attend is not None and md is not None and kv_cache.numel() > 0
                and md.max_query_len == 1 and md.num_actual_tokens == md.seq_lens.shape[0]
                and core_attention.fuses_decode(self.num_heads, self.num_kv_heads, md.num_actual_tokens,
                                                self.sinks is not None, self._fused_mode)
                and not _in_piecewise_cudagraph())

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AtomAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                **unused) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("ATOM's attention backend does not quantize its output")
        stash, self._stash = self._stash, None
        if attn_metadata is None:  # vLLM's memory-profiling run: no cache bound yet
            return output
        md = attn_metadata
        n = md.num_actual_tokens
        k_cache, v_cache, k_scale, v_scale = self._caches(layer, kv_cache)
        if stash is not None or (self._fuses_decode(md, kv_cache) and key is not None and not key.numel()):
            if stash is None or stash[0] is not md:
                raise RuntimeError(f"{getattr(layer, 'layer_name', '?')}: the fused decode prep's stash is "
                                   f"{'missing' if stash is None else 'from another step'} "
                                   "(norm_rope_write and the attention op must run in one step)")
            _, q_raw, prep = stash
            self._fused_attend(q_raw.view(n, self.num_heads, self.head_size), k_cache, v_cache, md.block_table,
                               md.query_start_loc, md.seq_lens, self.scale, self.sliding_window,
                               self.logits_soft_cap, md.max_query_len, md.max_seq_len, k_scale=k_scale,
                               v_scale=v_scale, sinks=self.sinks, out=output[:n], prep=prep)
            self.fused_decode_steps += 1
            return output
        if key is not None and key.numel():  # no rows: norm_rope_write wrote this step's K and V
            self._write(key[:n], value[:n], k_cache, v_cache, md.slot_mapping[:n], k_scale=k_scale, v_scale=v_scale)
        args = (query[:n], k_cache, v_cache, md.block_table, md.query_start_loc, md.seq_lens, self.scale,
                self.sliding_window, self.logits_soft_cap, md.max_query_len, md.max_seq_len)
        kw = dict(k_scale=k_scale, v_scale=v_scale, sinks=self.sinks)
        if self._attend_into is not None:
            self._attend_into(*args, out=output[:n], **kw)
        else:
            output[:n].copy_(self._attend(*args, **kw))
        return output


def _in_piecewise_cudagraph() -> bool:
    """This forward runs vLLM's piecewise CUDA graphs (capture or replay): ops inside the pieces replay their
    capture's kernels without Python."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    mode = getattr(get_forward_context(), "cudagraph_runtime_mode", None)
    return getattr(mode, "name", None) == "PIECEWISE"


def _fp8_dtype() -> torch.dtype:
    from vllm.platforms import current_platform  # the FP8 type vLLM stores its caches in

    return current_platform.fp8_dtype()


def _into_variant(attend):
    """An entry of the resolved paged attention that writes into vLLM's output buffer (no copy after it):
    ATOM's Triton kernel has one; None for the others."""
    from atom.ops.registry import impl_of

    impl = impl_of(attend)
    if impl is None or impl.backend != "triton":
        return None
    from atom.ops.triton_kernels.attention import paged_attention_impl

    return paged_attention_impl


@torch.library.custom_op("atom_vllm::norm_rope_write", mutates_args=())
def norm_rope_write(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cos_sin: torch.Tensor,
                    is_neox: bool, layer_name: str) -> torch.Tensor:
    """AtomAttentionImpl.norm_rope_write of the layer `layer_name`, as one op vLLM's torch.compile keeps opaque
    (like vLLM's own unified_kv_cache_update it finds its cache and slots in the forward context; the K/V write
    is its side effect, ordered before the attention by the rotated q the attention consumes)."""
    from vllm.model_executor.layers.attention.attention import get_attention_context

    md, layer, kv_cache, slots = get_attention_context(layer_name)
    return layer.impl.norm_rope_write(layer, kv_cache, md, slots, positions, q, k, v, q_weight, k_weight, eps,
                                      cos_sin, is_neox)


@norm_rope_write.register_fake
def _(positions, q, k, v, q_weight, k_weight, eps, cos_sin, is_neox, layer_name):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
