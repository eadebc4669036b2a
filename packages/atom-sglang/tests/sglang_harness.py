"""Drive an SGLang model class through SGLang's real pools, attention backend and LogitsProcessor.

It plays the scheduler's part with the simplest policy: request r owns token slots
[1 + r * max_context_len, ...) (slot 0 is the pool's padding slot), shuffled within the request so a
backend that assumes contiguous slots fails. The runner scaffolding (server-args context, pool sizing) is
SGLang's own attention test kit's; the pool is rebuilt with one layer per model layer: SGLang's MLA pool (one
[slots, 1, kv_lora_rank + qk_rope_head_dim] latent buffer per layer) for a config with kv_lora_rank, as SGLang's
model runner picks it for DeepSeek-V2/V3.
"""

from __future__ import annotations

import random

import torch

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit


def publish_server_args(model_path, backend: str) -> None:
    """Install SGLang's process-wide config (what a scheduler process does at start) for a CPU float32 run."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path=str(model_path), device="cpu", attention_backend=backend,
                       sampling_backend="pytorch", dtype="float32", disable_cuda_graph=True), role="test")


class SGLangHarness:
    def __init__(self, model, hf_config, backend: str, batch_size: int, max_context_len: int = 64,
                 dtype: torch.dtype = torch.float32):
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        case = kit.DenseAttentionCase(name="model", backend=backend, forward_mode=ForwardMode.EXTEND,
                                      num_heads=hf_config.num_attention_heads,
                                      num_kv_heads=hf_config.num_key_value_heads, page_size=1,
                                      prefix_lens=(0,) * batch_size, extend_lens=(1,) * batch_size)
        model_config = kit.TinyModelConfig(num_heads=case.num_heads, num_kv_heads=case.num_kv_heads,
                                           head_dim=head_dim, hidden_size=hf_config.hidden_size,
                                           context_len=max_context_len)
        runner = kit.MockModelRunner(case=case, model_config=model_config, dtype=dtype, device="cpu",
                                     max_context_len=max_context_len, head_dim=head_dim)
        size = 1 + batch_size * max_context_len
        if getattr(hf_config, "kv_lora_rank", None):
            from sglang.srt.configs.model_config import AttentionArch

            runner.use_mla_backend = True
            model_config.attention_arch = AttentionArch.MLA
            runner.token_to_kv_pool = MLATokenToKVPool(
                size=size, page_size=1, dtype=dtype, kv_lora_rank=hf_config.kv_lora_rank,
                qk_rope_head_dim=hf_config.qk_rope_head_dim, layer_num=hf_config.num_hidden_layers, device="cpu",
                enable_memory_saver=False)
        else:
            runner.token_to_kv_pool = MHATokenToKVPool(
                size=size, page_size=1, dtype=dtype, head_num=case.num_kv_heads, head_dim=head_dim,
                layer_num=hf_config.num_hidden_layers, device="cpu", enable_memory_saver=False,
                enable_alt_stream=False)
        runner.init_kv_index_translator()
        self.runner, self.model = runner, model
        self.backend = ATTENTION_BACKENDS[backend](runner)
        self.max_context_len = max_context_len
        rng = random.Random(0)
        self.slots = []
        for r in range(batch_size):
            perm = list(range(max_context_len))
            rng.shuffle(perm)
            self.slots.append([1 + r * max_context_len + p for p in perm])
        self.lens = [0] * batch_size

    @torch.no_grad()
    def step(self, chunks: list[list[int]]) -> torch.Tensor:
        """Feed chunks[r] as the next tokens of request r (all requests); returns next-token logits [B, V]."""
        decode = all(len(c) == 1 for c in chunks) and all(n > 0 for n in self.lens)
        mode = ForwardMode.DECODE if decode else ForwardMode.EXTEND
        req_to_token = self.runner.req_to_token_pool.req_to_token
        ids, positions, locs = [], [], []
        prefix_lens = list(self.lens)
        for r, chunk in enumerate(chunks):
            for j, tok in enumerate(chunk):
                pos = self.lens[r] + j
                req_to_token[r, pos] = self.slots[r][pos]
                ids.append(tok)
                positions.append(pos)
                locs.append(self.slots[r][pos])
            self.lens[r] += len(chunk)
        bs = len(chunks)
        batch = ForwardBatch(
            forward_mode=mode,
            batch_size=bs,
            input_ids=torch.tensor(ids, dtype=torch.int64),
            req_pool_indices=torch.arange(bs, dtype=torch.int32),
            seq_lens=torch.tensor(self.lens, dtype=torch.int32),
            seq_lens_cpu=torch.tensor(self.lens, dtype=torch.int32),
            out_cache_loc=torch.tensor(locs, dtype=torch.int64),
            seq_lens_sum=sum(self.lens),
            positions=torch.tensor(positions, dtype=torch.int64),
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        self.runner.kv_index_translator.bind_own_plan(batch)
        if mode == ForwardMode.EXTEND:
            batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
            batch.extend_prefix_lens_cpu = prefix_lens
            batch.extend_seq_lens = torch.tensor([len(c) for c in chunks], dtype=torch.int32)
            batch.extend_seq_lens_cpu = [len(c) for c in chunks]
            batch.extend_num_tokens = len(ids)
            batch.extend_logprob_start_lens_cpu = [len(c) for c in chunks]
        with forward_context(ForwardContext(attn_backend=self.backend)):
            self.backend.init_forward_metadata(batch)
            out = self.model(batch.input_ids, batch.positions, batch)
        return out.next_token_logits
