"""One decoder-only transformer that every supported family configures.

Families differ in a handful of switches (QKV bias, qk-norm, sliding window, dense MLP or MoE), so they
share this code and each family file only says which switches it sets (see llama.py, qwen3_moe.py...).
Parameter names follow the Hugging Face checkpoints, except the merged ones: qkv_proj (q|k|v),
gate_up_proj (gate|up) and the stacked experts w13 / w2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from atom.layers.activation import GatedActivation
from atom.layers.attention import Attention, AttentionFactory, AttentionSpec
from atom.layers.decode_layer import OneLaunchDecode
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.fp8_input import SplitKPartials
from atom.layers.gpt_oss_moe import GptOssMoE
from atom.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from atom.layers.moe import FusedMoE
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding
from atom.ops.registry import impl_of, resolve
from atom.quantization import QuantizationConfig, weights_reloading


@dataclass(frozen=True)
class DecoderOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    moe: str | None = None  # None | "qwen3_moe" | "mixtral" | "gpt_oss"
    attention_sinks: bool = False  # a learned logit per head in the softmax denominator (GPT-OSS)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return window


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx: int, opts: DecoderOptions, attn_factory: AttentionFactory | None,
                 prefix: str, max_positions: int | None, *, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.head_dim = _head_dim(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=opts.qkv_bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=opts.o_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        if opts.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = opts.qk_norm
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, is_neox=True, max_positions=max_positions)
        sinks = None
        if opts.attention_sinks:
            self.sinks = sinks = nn.Parameter(torch.empty(self.qkv_proj.num_heads), requires_grad=False)
            self.sinks.weight_loader = self._load_sinks
        spec = AttentionSpec(
            layer_idx=layer_idx,
            num_heads=self.qkv_proj.num_heads,
            num_kv_heads=self.qkv_proj.num_kv_heads,
            head_dim=self.head_dim,
            scale=self.head_dim**-0.5,
            sliding_window=_sliding_window(config, layer_idx),
            logit_softcap=getattr(config, "attn_logit_softcapping", None),
            prefix=f"{prefix}.attn",
            has_sinks=opts.attention_sinks,
        )
        self.attn = Attention(spec, attn_factory, sinks=sinks)
        self.attn.feed_fp8_linear(self.o_proj)  # its output feeds o_proj alone (atom.layers.fp8_input)
        # An implementation that can do qk-norm + rope + its KV write in one op gets them un-normed.
        self._fused_prep = (getattr(self.attn.impl, "forward_with_prep", None)
                            if self.rotary_emb.rope_type != "dynamic" else None)
        # ATOM's attention adds a split-K qkv GEMM's partials itself on the steps it does the prep of
        self._qkv_parts = (self._fused_prep is not None and getattr(self.attn.impl, "takes_qkv_parts", False)
                           and self.qkv_proj.leave_splits("attention"))

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n, rank = param.shape[0], self.qkv_proj.tp_rank
        if tuple(loaded.shape) != (n * self.qkv_proj.tp_size,):
            raise ValueError(f"shape mismatch for sinks: checkpoint {tuple(loaded.shape)}, expected "
                             f"({n * self.qkv_proj.tp_size},) (one per attention head)")
        param.data.copy_(loaded.narrow(0, rank * n, n))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        sizes = [self.q_size, self.kv_size, self.kv_size]
        qkv_parts = None
        if self._qkv_parts and isinstance(qkv, SplitKPartials):  # the attention kernel adds them on the steps it preps
            if self.attn.impl.fuses_decode_step(qkv.out.shape[0]):
                qkv_parts = (*qkv.parts[0].split(sizes, dim=-1), qkv.parts.shape[0], qkv.parts.stride(0))
                qkv = qkv.out
            else:
                qkv = qkv.summed()
        q, k, v = qkv.split(sizes, dim=-1)
        if self._fused_prep is not None:
            qn, kn = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
            extra = {} if qkv_parts is None else {"qkv_parts": qkv_parts}
            out = self._fused_prep(positions, q, k, v, qn.weight if qn else None, kn.weight if kn else None,
                                   qn.eps if qn else 0.0, self.rotary_emb.cos_sin, self.rotary_emb.is_neox, **extra)
            return self.o_proj(out)
        if self.qk_norm:
            t = qkv.shape[0]  # x may be an Fp8Activation (atom.layers.fp8_input)
            q = self.q_norm(q.reshape(t, -1, self.head_dim)).reshape(t, self.q_size)
            k = self.k_norm(k.reshape(t, -1, self.head_dim)).reshape(t, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False, *,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act = GatedActivation(hidden_act)
        self.act.feed_fp8_linear(self.down_proj)
        if self.act.takes_split_parts():  # a split-K gate_up GEMM's partials are added by the activation's kernel
            self.gate_up_proj.leave_splits("activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    def __init__(self, config, opts: DecoderOptions, *, quant_config: QuantizationConfig | None = None,
                 prefix: str = ""):
        super().__init__()
        if opts.moe == "mixtral":
            num_experts, inter, renorm = config.num_local_experts, config.intermediate_size, True
        else:
            num_experts, inter = config.num_experts, config.moe_intermediate_size
            renorm = bool(getattr(config, "norm_topk_prob", False))
        # The router stays unquantized (as in vLLM and the FP8 checkpoints).
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False, prefix=f"{prefix}.gate")
        act = "silu" if config.hidden_act in ("silu", "swish") else "gelu_tanh"
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size, inter,
                                renormalize=renorm, activation=act, quant_config=quant_config,
                                prefix=f"{prefix}.experts")
        self._gate_logits = _gate_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_logits is not None and not torch.compiler.is_compiling():
            # the router's GEMM as a Triton kernel at a few tokens (atom-vllm's compiled graph keeps the linear)
            return self.experts(x, self._gate_logits(x, self.gate.weight))
        return self.experts(x, self.gate(x))


def _gate_kernel():
    """The Triton moe_gate_logits where it would run its kernel (ATOM_MOE_GATE_KERNEL_MAX_TOKENS > 0, 64 by default,
    and Triton the backend chosen), else None: the gate stays a plain linear (the CPU's packed GEMMs; under
    torch.compile too, SparseMoE.forward)."""
    op = resolve("moe_gate_logits")
    impl = impl_of(op)
    if impl is None or impl.backend != "triton":
        return None
    from atom.ops.triton_kernels import moe_routing

    return op if moe_routing.GATE_KERNEL_MAX_TOKENS > 0 else None


def _is_moe_layer(config, layer_idx: int, opts: DecoderOptions) -> bool:
    if opts.moe in ("mixtral", "gpt_oss"):
        return True
    if opts.moe == "qwen3_moe":
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return (layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
                and (layer_idx + 1) % step == 0)
    return False


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, opts: DecoderOptions, attn_factory, prefix: str,
                 max_positions: int | None, *, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.self_attn = SelfAttention(config, layer_idx, opts, attn_factory, f"{prefix}.self_attn", max_positions,
                                       quant_config=quant_config)
        if _is_moe_layer(config, layer_idx, opts):
            if opts.moe == "gpt_oss":
                self.mlp = GptOssMoE(config, quant_config=quant_config, prefix=f"{prefix}.mlp")
            else:
                self.mlp = SparseMoE(config, opts, quant_config=quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, config.hidden_act, opts.mlp_bias,
                                quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # each norm's output feeds one linear alone: FP8 linears take it quantized (atom.layers.fp8_input)
        self.input_layernorm.feed_fp8_linear(self.self_attn.qkv_proj)
        if isinstance(self.mlp, DenseMLP):
            self.post_attention_layernorm.feed_fp8_linear(self.mlp.gate_up_proj)
        # o_proj's output feeds the residual norm alone: a split-K FP8 GEMM may leave its sum to the norm
        self.self_attn.o_proj.sum_splits_in(self.post_attention_layernorm)
        # one-row decode steps as one launch, where the layer is one it runs (ATOM_DECODE_LAYER)
        self._one_launch = OneLaunchDecode.for_layer(self)

    def forward(self, positions, hidden, residual):
        if self._one_launch is not None:
            done = self._one_launch.forward(positions, hidden, residual)
            if done is not None:
                return done
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config, opts: DecoderOptions, attn_factory, prefix: str = "model",
                 max_positions: int | None = None, *, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, opts, attn_factory, f"{prefix}.layers.{i}", max_positions,
                         quant_config=quant_config)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # a dense MLP's output feeds the next layer's input norm (or the final one) alone, as its x
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, DenseMLP):
                nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
                layer.mlp.down_proj.sum_splits_in(nxt)
        # a one-launch layer's early stream asks L2 for the next one-launch layer's qkv weight
        for layer, nxt in zip(self.layers[:-1], self.layers[1:], strict=True):
            if layer._one_launch is not None and nxt._one_launch is not None:
                layer._one_launch.next_layer = nxt

    def forward(self, input_ids, positions, inputs_embeds=None):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# checkpoint name piece -> (merged parameter piece, shard id)
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
# experts.<e>.<proj>.<suffix>: "weight" loads into w13 / w2, any other suffix (a quantization scheme's
# weight_scale, ...) into w13_<suffix> / w2_<suffix>.
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(\w+)$")
_EXPERT_SHARD = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
# FP8 KV-cache scales, in the spellings vLLM reads (ModelOpt / llm-compressor: self_attn.k_proj.k_scale,
# self_attn.k_scale, self_attn.qkv_proj.k_scale, self_attn.attn.k_scale; the deprecated kv_scale sets both).
_KV_SCALE = re.compile(r"^(.*\.self_attn)\.(?:(?:[kv]_proj|qkv_proj|attn)\.)?(k|v|kv)_scale$")
# Static query / softmax scales of FP8 attention: ATOM does not quantize queries, so they are not used.
_UNUSED_ATTN_SCALE = re.compile(r"^.*\.self_attn\.(?:(?:[qkv]_proj|qkv_proj|attn)\.)?(q|prob)_scale$")


class DecoderForCausalLM(nn.Module):
    """Base of every family class. Subclasses set `options(config)`."""

    # Hosts may swap the backbone for a subclass (atom-vllm decorates it for vLLM's torch.compile).
    backbone_cls: type[DecoderModel] = DecoderModel
    # Multi-head latent attention (DeepSeek): the model takes an `mla_factory`, not an attention factory.
    uses_mla: bool = False
    # The submodule of a layer's self_attn that takes its checkpoint FP8 KV-cache scales (load_kv_scale).
    kv_scale_owner: str = "attn"

    @classmethod
    def options(cls, config) -> DecoderOptions:  # pragma: no cover - overridden
        return DecoderOptions()

    def __init__(self, config, attn_factory: AttentionFactory | None = None, prefix: str = "",
                 max_positions: int | None = None, *, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.config = config
        opts = self.options(config)
        self.model = self.backbone_cls(config, opts, attn_factory, prefix=f"{prefix}.model" if prefix else "model",
                                       max_positions=max_positions, quant_config=quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        tie_to = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tie_to=tie_to)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Flattened tokens of the whole batch -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name onto this model's names; None skips it."""
        if "rotary_emb.inv_freq" in name:
            return None
        if self.tie_word_embeddings and name == "lm_head.weight":
            return None
        return name.replace(".block_sparse_moe.", ".mlp.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the parameter names that were loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        weights_reloading(self)  # the post-load hook runs again on these weights

        def param(target: str, source: str) -> nn.Parameter:
            if target not in params:
                raise ValueError(f"checkpoint tensor {source!r} has no matching parameter ({target!r}) "
                                 f"in {type(self).__name__}")
            loaded.add(target)
            return params[target]

        for source, tensor in weights:
            try:
                self._load_tensor(source, tensor, param)
            except ValueError as e:
                if repr(source) in str(e):
                    raise
                raise ValueError(f"cannot load checkpoint tensor {source!r}: {e}") from e
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded

    def _load_tensor(self, source: str, tensor: torch.Tensor, param) -> None:
        name = self.checkpoint_name(source)
        if name is None or _UNUSED_ATTN_SCALE.match(name):
            return
        if m := _KV_SCALE.match(name):
            self._load_kv_scale(source, m.group(1), m.group(2), tensor)
            return
        if m := _EXPERT.match(name):
            base, expert, kind, suffix = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            shard = _EXPERT_SHARD[kind]
            stacked = "w2" if shard == "w2" else "w13"
            p = param(f"{base}.{stacked}" if suffix == "weight" else f"{base}.{stacked}_{suffix}", source)
            p.weight_loader(p, tensor, shard, expert)
            return
        if m := _FUSED_EXPERTS.match(name):
            base, kind = m.groups()
            p = param(f"{base}.{'w13' if kind == 'gate_up_proj' else 'w2'}", source)
            for e in range(tensor.shape[0]):
                p.weight_loader(p, tensor[e], "w13" if kind == "gate_up_proj" else "w2", e)
            return
        for piece, merged, shard in _STACKED:
            if piece in name and ".experts." not in name:
                p = param(name.replace(piece, merged), source)
                p.weight_loader(p, tensor, shard)
                return
        p = param(name, source)
        loader = getattr(p, "weight_loader", None)
        if loader is not None:
            loader(p, tensor)
            return
        if tuple(p.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {source}: checkpoint {tuple(tensor.shape)}, model {tuple(p.shape)}")
        p.data.copy_(tensor)

    def _load_kv_scale(self, source: str, attn_prefix: str, kind: str, tensor: torch.Tensor) -> None:
        """A per-tensor FP8 KV-cache scale -> the layer's attention (which hands it to the host's
        implementation: ATOM's paged cache spec, SGLang's RadixAttention, vLLM's Attention)."""
        try:
            attn = self.get_submodule(f"{attn_prefix}.{self.kv_scale_owner}")
        except AttributeError:
            raise ValueError(f"checkpoint tensor {source!r} has no matching attention layer in "
                             f"{type(self).__name__}") from None
        if tensor.numel() != 1:
            raise ValueError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}; ATOM reads per-tensor "
                             "KV-cache scales (one element)")
        value = float(tensor.float().reshape(()))
        for k in ("k", "v") if kind == "kv" else (kind,):
            attn.load_kv_scale(k, value)
