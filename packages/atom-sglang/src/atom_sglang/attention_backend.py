"""SGLang attention backend "atom": ATOM's paged-attention op over SGLang's own KV pool.

SGLang's token pool holds, per layer, K and V as [num_slots, num_kv_heads, head_dim] and a request's
token slots in `req_to_token[req_pool_idx, :seq_len]`. That is ATOM's paged layout with block size 1:
the rows of req_to_token are the block tables. So the backend writes K/V at `out_cache_loc` through the
pool and calls `resolve("paged_attention")` — the torch reference on CPU, ATOM's Triton/AITER kernels
on GPUs (following ATOM_KERNEL_BACKEND). Attention sinks (GPT-OSS) come per call (`sinks=`, from the
RadixAttention) and go to paged_attention's `sinks` argument, through an implementation that has them.
With `--kv-cache-dtype fp8_e4m3` the pool holds e4m3 entries (k / k_scale with a checkpoint's per-tensor
scales, else k); the op reads them with the same scales (sinks and an FP8 pool combine).

SGLang's hybrid SWA pool (its default for GPT-OSS: a second, smaller pool for the sliding-window layers,
reached through a full->SWA slot translation whose interface differs between 0.5.15 and 0.5.23) is
refused with the fix: `--disable-hybrid-swa-memory` gives one pool, where the sliding-window layers
read only their window (the kernels skip the rest), at the memory cost of full-length caches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from atom.layers.kv_cache import is_fp8
from atom.ops.registry import resolve
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

try:  # newer sglang (0.5.23 has it): writes take a KVWriteLoc carrying the plan's "physical" mark
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
except ImportError:  # pragma: no cover - older sglang takes the bare out_cache_loc tensor
    KVWriteLoc = None


logger = logging.getLogger(__name__)


@dataclass
class AtomForwardMetadata:
    block_tables: torch.Tensor  # [B, >= max_seq_len] int32 token slots (block size 1)
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    max_query_len: int
    max_seq_len: int


_UNSUPPORTED_MODES = {"TARGET_VERIFY", "DRAFT_EXTEND", "DRAFT_EXTEND_V2", "DLLM_EXTEND", "SPLIT_PREFILL"}


def _write_loc(forward_batch):
    if KVWriteLoc is None:
        return forward_batch.out_cache_loc
    if hasattr(KVWriteLoc, "for_batch"):
        return KVWriteLoc.for_batch(forward_batch)
    return KVWriteLoc(forward_batch.out_cache_loc)


class AtomAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        if getattr(model_runner, "use_mla_backend", False):
            raise NotImplementedError(
                "the atom attention backend serves MHA/GQA/MQA models, not MLA (DeepSeek-V2/V3): ATOM's MLA kernels "
                "take the un-absorbed query and kv_b_proj, not SGLang's absorbed RadixAttention call; ATOM's "
                "DeepSeek models run on SGLang's MLA backends, e.g. --attention-backend triton (GPU) or "
                "torch_native (CPU)")
        if getattr(self.token_to_kv_pool, "swa_layer_nums", 0):
            raise NotImplementedError(
                "the atom attention backend does not support SGLang's hybrid SWA KV pool (a separate pool for "
                "the sliding-window layers, SGLang's default for this model): start SGLang with "
                "--disable-hybrid-swa-memory (one pool; the sliding-window layers read only their window), "
                "or use another --attention-backend (e.g. triton)")
        self.max_context_len = self.req_to_token_pool.req_to_token.shape[1]
        # --kv-cache-dtype fp8_e4m3: SGLang's pool holds fp8(k / k_scale) (a layer's checkpoint scale, else 1.0);
        # ATOM's op reads it back with the same per-tensor scales, kept on the device from the start (CUDA
        # graphs capture them as inputs).
        self.kv_dtype = getattr(self.token_to_kv_pool, "dtype", None)
        self.fp8_kv = self.kv_dtype is not None and is_fp8(self.kv_dtype)
        self._scales = self._kv_scales(model_runner) if self.fp8_kv else {}
        self._static = {"kv_cache_dtype": self.kv_dtype} if self.fp8_kv else {}
        self._dtype = getattr(model_runner, "dtype", None)
        self._attend = resolve("paged_attention", dtype=self._dtype, device=self.device,
                               static=self._static or None)
        self._attend_sinks = None  # resolved on the first layer with sinks (AITER's kernels have none)
        logger.info("ATOM attention backend: paged_attention from %s", self._attend.__module__)
        self.forward_metadata: AtomForwardMetadata | None = None
        self._graph: dict[str, torch.Tensor] | None = None

    def _kv_scales(self, model_runner) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer id -> (k_scale, v_scale) device tensors of every attention layer with checkpoint scales."""
        out = {}
        model = getattr(model_runner, "model", None)
        for m in model.modules() if model is not None else ():
            if getattr(m, "k_scale_float", None) is not None and hasattr(m, "layer_id"):
                out[m.layer_id] = tuple(torch.tensor(float(s), dtype=torch.float32, device=self.device)
                                        for s in (m.k_scale_float, m.v_scale_float or m.k_scale_float))
        return out

    # ---- metadata -------------------------------------------------------------------------------

    def _use_graph_buffers(self, forward_batch) -> bool:
        return (self._graph is not None and forward_batch.forward_mode.is_decode()
                and forward_batch.batch_size <= self._graph["seq_lens"].shape[0])

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        if mode.name in _UNSUPPORTED_MODES:  # by name: the set of predicates changes between releases
            raise NotImplementedError(f"the atom attention backend does not support forward mode {mode.name} "
                                      f"(speculative decoding / dLLM) yet")
        bs = forward_batch.batch_size
        if self._use_graph_buffers(forward_batch):
            # Static shapes for CUDA graphs: the tables span the whole context; the rows are copied in-graph.
            g = self._graph
            self.forward_metadata = AtomForwardMetadata(
                g["block_tables"][:bs], g["query_start_loc"][: bs + 1], g["seq_lens"][:bs], 1, self.max_context_len)
            return
        if forward_batch.seq_lens_cpu is not None:
            max_seq_len = int(forward_batch.seq_lens_cpu[:bs].max())
        else:
            max_seq_len = int(forward_batch.seq_lens[:bs].max())
        width = min(max_seq_len, self.max_context_len)
        block_tables = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices[:bs], :width]
        if max_seq_len > width:
            # Only SGLang's own dummy batches get here: its prefill CUDA-graph capture (0.5.15+) runs one
            # sequence of up to --cuda-graph-max-bs-prefill tokens, which may exceed the context length. The
            # kernel reads a key slot per position through the table, so pad the table with slot 0 (the
            # pool's padding slot) instead of letting it read past the rows of req_to_token.
            block_tables = torch.nn.functional.pad(block_tables, (0, max_seq_len - width))
        if mode.is_decode():
            qsl = torch.arange(bs + 1, dtype=torch.int32, device=self.device)
            max_query_len = 1
        else:
            qsl = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
            torch.cumsum(forward_batch.extend_seq_lens[:bs], dim=0, out=qsl[1:])
            max_query_len = int(max(forward_batch.extend_seq_lens_cpu[:bs]))
        self.forward_metadata = AtomForwardMetadata(block_tables.to(torch.int32), qsl,
                                                    forward_batch.seq_lens[:bs].to(torch.int32),
                                                    max_query_len, max_seq_len)

    def init_forward_metadata_in_graph(self, forward_batch):
        if not self._use_graph_buffers(forward_batch):
            return
        bs = forward_batch.batch_size
        g = self._graph
        g["block_tables"][:bs].copy_(self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices[:bs]])
        g["seq_lens"][:bs].copy_(forward_batch.seq_lens[:bs])

    def init_forward_metadata(self, forward_batch):
        self.init_forward_metadata_out_graph(forward_batch)
        self.init_forward_metadata_in_graph(forward_batch)

    # ---- CUDA graphs (decode) -------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs):
        self._graph = {
            "block_tables": torch.zeros(max_bs, self.max_context_len, dtype=torch.int32, device=self.device),
            "query_start_loc": torch.arange(max_bs + 1, dtype=torch.int32, device=self.device),
            "seq_lens": torch.ones(max_bs, dtype=torch.int32, device=self.device),
        }

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    # ---- forward --------------------------------------------------------------------------------

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool, sinks=None) -> torch.Tensor:
        if layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError("the atom attention backend needs equal q/k and v head dims")
        if layer.is_cross_attention or getattr(getattr(layer, "attn_type", None), "value", "decoder") != "decoder":
            raise NotImplementedError("the atom attention backend serves causal decoder self-attention only")
        if layer.logit_cap and layer.logit_cap > 0 and getattr(layer, "logit_capping_method", "tanh") != "tanh":
            raise NotImplementedError(f"logit capping method {layer.logit_capping_method!r} is not supported")
        md = self.forward_metadata
        num_heads, head_dim = layer.tp_q_head_num, layer.qk_head_dim
        scales = self._scales.get(layer.layer_id, (None, None))
        if save_kv_cache and k is not None and v is not None:
            if self.fp8_kv and layer.k_scale is not None:  # the pool divides k and v in place by the scales
                self.token_to_kv_pool.set_kv_buffer(layer, _write_loc(forward_batch), k.clone(), v.clone(),
                                                    layer.k_scale, layer.v_scale)
            else:
                self.token_to_kv_pool.set_kv_buffer(layer, _write_loc(forward_batch), k, v)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        # SGLang's window counts keys back from the query (i - j <= w); ATOM's counts keys seen (i - j < w).
        sgl_window = layer.sliding_window_size
        window = sgl_window + 1 if sgl_window is not None and sgl_window >= 0 else None
        attend = self._attend
        if sinks is not None:
            if self._attend_sinks is None:
                self._attend_sinks = resolve("paged_attention", dtype=self._dtype, device=self.device,
                                             static={**self._static, "has_sinks": True})
            attend = self._attend_sinks
        out = attend(
            q.reshape(-1, num_heads, head_dim),
            k_cache.unsqueeze(1),  # [slots, 1 (block size), Hkv, D]
            v_cache.unsqueeze(1),
            md.block_tables,
            md.query_start_loc,
            md.seq_lens,
            layer.scaling,
            window,
            layer.logit_cap if layer.logit_cap and layer.logit_cap > 0 else None,
            md.max_query_len,
            md.max_seq_len,
            k_scale=scales[0],
            v_scale=scales[1],
            sinks=sinks,
        )
        return out.reshape(-1, num_heads * head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, sinks=None, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, sinks)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, sinks=None, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, sinks)

    def support_triton(self):
        return False


def create_atom_backend(model_runner) -> AtomAttnBackend:
    return AtomAttnBackend(model_runner)
