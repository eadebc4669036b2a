"""DeepSeek-V2 (and V2-Lite): multi-head latent attention (MLA) + DeepSeekMoE.

The MLA layer, the DeepSeekMoE block, the decoder block and the keeper of a checkpoint's MTP layers live
here and are shared by deepseek_v3.py and glm4_moe.py. Parameter names follow the Hugging Face checkpoints
(merged: gate_up_proj of dense MLPs and shared experts; stacked experts w13 / w2). Linear and expert layers
take the checkpoint's quantization (quant_config, with their checkpoint prefix); the router stays unquantized.

MLA per layer (H heads, L = kv_lora_rank, R = qk_rope_head_dim, P = qk_nope_head_dim, V = v_head_dim):
    q            = q_b_proj(q_a_layernorm(q_a_proj(x)))   or q_proj(x) without q_lora_rank  -> [T, H, P + R]
    kv_c | k_pe  = kv_a_proj_with_mqa(x)                                                    -> [T, L | R]
    kv_c         = kv_a_layernorm(kv_c); q_pe, k_pe = rope(q_pe, k_pe)
    out          = o_proj(attention(q_nope, q_pe, kv_c, k_pe))   (the host's MLA implementation, atom.layers.mla)
Rope covers the R channels only; DeepSeek's checkpoints pair them interleaved (x0, x1), (x2, x3), ...
Every layer's RotaryEmbedding shares one cos|sin table (atom.layers.rotary).
The softmax scale is (P + R)^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn scaling, as in
transformers' DeepSeek code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from atom.distributed import get_ep_group, get_tp_group
from atom.envs import env_flag
from atom.layers.attention import Attention
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import ColumnParallelLinear, MergedReplicatedLinear, ReplicatedLinear, RowParallelLinear
from atom.layers.mla import MLAAttention, MLAAttentionFactory, MLAAttentionSpec
from atom.layers.moe import FusedMoE
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding, rope_parameters
from atom.models.decoder import DecoderForCausalLM, DenseMLP
from atom.ops.moe_routing import check_routing
from atom.ops.registry import resolve
from atom.quantization import QuantizationConfig

# transformers' DeepSeek code builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not rms_norm_eps
_LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MoERouting:
    """How a DeepSeekMoE block picks its experts (see atom.ops.moe_routing)."""

    scoring: str = "softmax"  # softmax | sigmoid
    num_groups: int = 1
    topk_group: int = 1
    group_score: str = "max"  # max | top2_sum
    renormalize: bool = False
    scaling: float = 1.0
    correction_bias: bool = False  # e_score_correction_bias (V3, GLM-4-MoE)


@dataclass(frozen=True)
class DeepseekOptions:
    routing: MoERouting
    rope_interleaved: bool = True


def v2_routing(config) -> MoERouting:
    """DeepSeek-V2's `topk_method`: greedy (plain top-k), group_limited_greedy (groups scored by their best
    expert) or noaux_tc (V3-style sigmoid + correction bias). norm_topk_prob renormalizes as in DeepSeek's
    and vLLM's code (transformers' V2 router ignores it; the released V2 configs set it false)."""
    method = getattr(config, "topk_method", None) or "greedy"
    renorm = bool(getattr(config, "norm_topk_prob", False)) and config.num_experts_per_tok > 1
    scaling = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
    if method == "greedy":
        return MoERouting(scoring=getattr(config, "scoring_func", "softmax"), renormalize=renorm, scaling=scaling)
    if method == "group_limited_greedy":
        return MoERouting(scoring=getattr(config, "scoring_func", "softmax"), num_groups=config.n_group,
                          topk_group=config.topk_group, group_score="max", renormalize=renorm, scaling=scaling)
    if method == "noaux_tc":
        return v3_routing(config)
    raise ValueError(f"unsupported DeepSeek topk_method {method!r}; supported: greedy, group_limited_greedy, noaux_tc")


def v3_routing(config) -> MoERouting:
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores, e_score_correction_bias for the choice, groups scored by the
    sum of their two best experts."""
    return MoERouting(scoring=getattr(config, "scoring_func", "sigmoid"), num_groups=config.n_group or 1,
                      topk_group=config.topk_group or 1, group_score="top2_sum",
                      renormalize=bool(config.norm_topk_prob),
                      scaling=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0), correction_bias=True)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(config) -> float:
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        m = yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale *= m * m
    return scale


def fuse_qkv_a(config, tp_size: int, quant_config: QuantizationConfig | None) -> bool:
    """Whether DeepseekMLA reads x with one GEMM (fused_qkv_a_proj = q_a_proj | kv_a_proj_with_mqa, or q_proj |
    kv_a_proj_with_mqa without q_lora) instead of two: one launch and one pass over x less a layer. Needs both
    whole on every rank (q_proj is column-parallel: fused at TP 1 only) and an unquantized checkpoint (a block
    scale layout per linear); ATOM_MLA_FUSED_QKV_A=0 keeps them apart."""
    whole = bool(config.q_lora_rank) or tp_size == 1
    return whole and quant_config is None and env_flag("ATOM_MLA_FUSED_QKV_A", True)


class DeepseekMLA(nn.Module):
    def __init__(self, config, layer_idx: int, mla_factory: MLAAttentionFactory | None, prefix: str,
                 rope_interleaved: bool, max_positions: int | None, *,
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        tp_size = get_tp_group().world_size
        if config.num_attention_heads % tp_size:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by "
                             f"tensor_parallel_size={tp_size}")
        self.num_heads = config.num_attention_heads // tp_size
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.v_head_dim = config.kv_lora_rank, config.v_head_dim
        self.q_lora_rank = config.q_lora_rank
        qk_head_dim = self.nope_dim + self.rope_dim
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        q = dict(quant_config=quant_config)
        # The projections that read x, as one GEMM when they are all whole on this rank (fuse_qkv_a)
        self.q_in_size = self.q_lora_rank or self.num_heads * qk_head_dim
        if fuse_qkv_a(config, tp_size, quant_config):
            self.fused_qkv_a_proj = MergedReplicatedLinear(hidden, [self.q_in_size, self.kv_lora_rank + self.rope_dim],
                                                           bias=bias, prefix=f"{prefix}.fused_qkv_a_proj", **q)
        else:
            self.fused_qkv_a_proj = None
            if self.q_lora_rank:
                self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias, prefix=f"{prefix}.q_a_proj", **q)
            else:
                self.q_proj = ColumnParallelLinear(hidden, config.num_attention_heads * qk_head_dim,
                                                   prefix=f"{prefix}.q_proj", **q)
            self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias,
                                                       prefix=f"{prefix}.kv_a_proj_with_mqa", **q)
        if self.q_lora_rank:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, config.num_attention_heads * qk_head_dim,
                                                 prefix=f"{prefix}.q_b_proj", **q)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        # read directly by the MLA implementation (W_UK / W_UV), through atom.layers.mla.kv_b_weight
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank,
                                              config.num_attention_heads * (self.nope_dim + self.v_head_dim),
                                              prefix=f"{prefix}.kv_b_proj", **q)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.v_head_dim, hidden, bias=bias,
                                        prefix=f"{prefix}.o_proj", **q)
        self.rotary_emb = RotaryEmbedding(config, self.rope_dim, is_neox=not rope_interleaved,
                                          max_positions=max_positions)
        spec = MLAAttentionSpec(layer_idx=layer_idx, num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank,
                                qk_nope_head_dim=self.nope_dim, qk_rope_head_dim=self.rope_dim,
                                v_head_dim=self.v_head_dim, scale=mla_softmax_scale(config), prefix=f"{prefix}.attn",
                                q_lora_rank=self.q_lora_rank or None)
        # named like vLLM's MLA wrapper, not `attn`: SGLang takes a layer's `self_attn.attn` for a RadixAttention
        self.mla_attn = MLAAttention(spec, self.kv_b_proj, mla_factory)
        # An implementation that does the latent norm, both ropes and its cache write in one op gets kv_a and q_pe as
        # the projections give them.
        self._fused_prep = self.mla_attn.fused_prep if self.rotary_emb.rope_type != "dynamic" else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        if self.fused_qkv_a_proj is not None:
            q_in, kv_a = self.fused_qkv_a_proj(x).split([self.q_in_size, self.kv_lora_rank + self.rope_dim], dim=-1)
        else:
            q_in = self.q_a_proj(x) if self.q_lora_rank else self.q_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        q = self.q_b_proj(self.q_a_layernorm(q_in)) if self.q_lora_rank else q_in
        q = q.view(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if self._fused_prep is not None:
            norm, rope = self.kv_a_layernorm, self.rotary_emb
            out = self._fused_prep(positions, q_nope, q_pe, kv_a, norm.weight, norm.eps, rope.cos_sin, rope.is_neox)
            return self.o_proj(out)
        kv_c, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c)
        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(t, self.num_heads * self.rope_dim), k_pe.contiguous())
        out = self.mla_attn(q_nope, q_pe.view(t, self.num_heads, self.rope_dim), kv_c, k_pe)
        return self.o_proj(out)


class MoEGate(nn.Module):
    """Router weights (and V3's e_score_correction_bias); logits in float32, as transformers computes them
    (the moe_router_logits op: on the GPU one kernel, without a float32 copy of x)."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        if correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)
        self._logits = resolve("moe_router_logits", static={"num_experts": num_experts, "hidden_size": hidden_size})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.weight)


def fuse_shared_experts(config, mlp_bias: bool, quant_config: QuantizationConfig | None) -> int:
    """How many shared experts a DeepSeekMoE block holds as extra expert slots (0: a separate DenseMLP).

    The shared MLP (intermediate size n_shared * I) is n_shared experts of intermediate size I side by side:
    act(gate) * up is elementwise over the intermediate features and down sums over them, so slot j takes the
    features j*I .. (j+1)*I of gate, up and down, and its output summed with weight 1.0 beside the routed
    experts' is the shared MLP's. One fused_experts call then runs both (at decode one pair kernel each for
    gate|up and down instead of two more GEMMs, the activation and an add a layer; SGLang's shared-experts
    fusion). Under tensor parallelism each rank's slots hold its slice of the features, which partitions
    them as well. Left separate: quantized checkpoints (their scales are laid out per linear), expert
    parallelism (the slots would have to be on every rank), biases, an activation other than SiLU, and
    ATOM_FUSE_SHARED_EXPERTS=0."""
    shared = int(getattr(config, "n_shared_experts", 0) or 0)
    if (not shared or quant_config is not None or mlp_bias or get_ep_group() is not None
            or config.hidden_act not in ("silu", "swish") or not env_flag("ATOM_FUSE_SHARED_EXPERTS", True)):
        return 0
    return shared


class DeepseekMoE(nn.Module):
    """Routed experts chosen by grouped top-k, plus always-on shared experts (held as extra expert slots
    when fuse_shared_experts says so, else a DenseMLP)."""

    def __init__(self, config, routing: MoERouting, mlp_bias: bool = False, *,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        num_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
        check_routing(num_experts, top_k, routing.num_groups, routing.topk_group, routing.scoring,
                      routing.group_score)
        self.routing, self.top_k, self.num_routed = routing, top_k, num_experts
        self.moe_inter = config.moe_intermediate_size
        self.gate = MoEGate(config.hidden_size, num_experts, routing.correction_bias)
        act = "silu" if config.hidden_act in ("silu", "swish") else "gelu_tanh"
        # shared experts held as slots num_experts .. num_experts + fused_shared - 1 of the experts
        self.fused_shared = fuse_shared_experts(config, mlp_bias, quant_config)
        self.experts = FusedMoE(num_experts + self.fused_shared, top_k, config.hidden_size,
                                config.moe_intermediate_size, renormalize=routing.renormalize, activation=act,
                                quant_config=quant_config, prefix=f"{prefix}.experts")
        shared = getattr(config, "n_shared_experts", 0) or 0
        self.shared_experts = (DenseMLP(config.hidden_size, config.moe_intermediate_size * shared, config.hidden_act,
                                        mlp_bias, quant_config=quant_config, prefix=f"{prefix}.shared_experts")
                               if shared and not self.fused_shared else None)
        # the build-time properties an implementation may not support (and its self-check's inputs)
        self._route = resolve("moe_grouped_topk", static=dict(
            num_experts=num_experts, top_k=top_k, num_groups=routing.num_groups, topk_group=routing.topk_group,
            scoring=routing.scoring, group_score=routing.group_score, correction_bias=routing.correction_bias,
            renormalize=routing.renormalize, routed_scaling_factor=routing.scaling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        weights, ids = self._route(self.gate(x), self.gate.e_score_correction_bias, self.top_k, r.num_groups,
                                   r.topk_group, r.scoring, r.group_score, r.renormalize, r.scaling,
                                   self.fused_shared)
        out = self.experts.forward_routed(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def is_moe_layer(config, layer_idx: int) -> bool:
    """first_k_dense_replace dense layers, then MoE every moe_layer_freq layers (DeepSeek's rule)."""
    freq = getattr(config, "moe_layer_freq", 1) or 1
    return (bool(getattr(config, "n_routed_experts", None)) and layer_idx >= (config.first_k_dense_replace or 0)
            and layer_idx % freq == 0)


def moe_or_dense_mlp(config, layer_idx: int, routing: MoERouting, mlp_bias: bool = False, *,
                     quant_config: QuantizationConfig | None = None, prefix: str = "") -> nn.Module:
    if is_moe_layer(config, layer_idx):
        return DeepseekMoE(config, routing, mlp_bias, quant_config=quant_config, prefix=prefix)
    return DenseMLP(config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias,
                    quant_config=quant_config, prefix=prefix)


class DecoderBlock(nn.Module):
    """Pre-norm residual block around a given attention and MLP (names as in the checkpoints)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def deepseek_block(config, layer_idx: int, opts: DeepseekOptions, mla_factory, prefix: str,
                   max_positions: int | None, *, quant_config: QuantizationConfig | None = None) -> DecoderBlock:
    attn = DeepseekMLA(config, layer_idx, mla_factory, f"{prefix}.self_attn", opts.rope_interleaved, max_positions,
                       quant_config=quant_config)
    mlp = moe_or_dense_mlp(config, layer_idx, opts.routing, bool(getattr(config, "mlp_bias", False)),
                           quant_config=quant_config, prefix=f"{prefix}.mlp")
    return DecoderBlock(attn, mlp, config.hidden_size, config.rms_norm_eps)


class BlockStack(nn.Module):
    """Embedding, the decoder blocks, final norm: flattened tokens -> final hidden states."""

    def __init__(self, config, blocks: Iterable[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, inputs_embeds=None):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepseekV2Model(BlockStack):
    def __init__(self, config, opts: DeepseekOptions, mla_factory: MLAAttentionFactory | None, prefix: str = "model",
                 max_positions: int | None = None, *, quant_config: QuantizationConfig | None = None):
        super().__init__(config, (deepseek_block(config, i, opts, mla_factory, f"{prefix}.layers.{i}", max_positions,
                                                 quant_config=quant_config)
                                  for i in range(config.num_hidden_layers)))


# ------------------------------------------------------------------ MTP layers
class KeptAttention(nn.Module):
    """Stands in for the attention of an MTP layer that is loaded and kept but not run (no speculative decoding,
    or an MTP layer past the first): no host sizes a KV cache for it."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def forward(self, *args, **kwargs):
        raise NotImplementedError("this MTP layer is loaded and kept, not run (speculative decoding with "
                                  "method 'mtp' runs the first MTP layer)")

    def load_kv_scale(self, kind: str, value: float) -> None:
        """A checkpoint's FP8 KV-cache scale of a layer that keeps no cache: nothing to apply it to."""


def _kept_factory(spec, *args) -> nn.Module:
    return KeptAttention(spec)


def _detach_attention(block: nn.Module) -> None:
    for module in list(block.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (Attention, MLAAttention)):
                setattr(module, name, KeptAttention(child.spec))


class SharedHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (checkpoint layer num_hidden_layers + i): the embedding and the
    previous hidden state, each normed (enorm, hnorm), concatenated and projected (eh_proj), go through a
    decoder block (mtp_block) and the shared head. Its embed_tokens is the model's (checkpoints repeat it).

    At position p it reads the hidden state h_p the target's LM head reads (after the final norm) and the
    embedding of token p + 1, and predicts token p + 2. Its output (shared_head.norm of the block's residual
    stream) is both what its head turns into logits and the hidden state a next draft step reads: vLLM's and
    SGLang's DeepSeek MTP chain the same way. Its attention is a real layer (its own KV cache, the same
    positions and block tables as the target's) when `run` is set, a KeptAttention otherwise."""

    def __init__(self, config, block: nn.Module, *, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", run: bool = False):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * config.hidden_size, config.hidden_size, quant_config=quant_config,
                                        prefix=f"{prefix}.eh_proj")
        self.shared_head = SharedHead(config)
        if not run:
            _detach_attention(block)
        self.mtp_block = block

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        """embeds [T, H] (of the tokens after each position), positions [T], prev_hidden [T, H] -> [T, H]."""
        # position 0 has no previous token to condition on: its embedding is masked, as in vLLM's DeepSeek MTP
        embeds = embeds.masked_fill((positions == 0)[:, None], 0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden)], dim=-1))
        hidden, residual = self.mtp_block(positions, x, None)
        normed, _ = self.shared_head.norm(hidden, residual)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(hidden)


class MTPLayers(nn.Module):
    def __init__(self, layers: Iterable[MTPLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_SHARED_EXPERT = re.compile(r"^(.*\.mlp)\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")


def load_fused_shared(moe: DeepseekMoE, mlp_name: str, kind: str, tensor: torch.Tensor, param, source: str) -> None:
    """A checkpoint's shared-expert linear (gate_proj / up_proj [n * I, H], down_proj [H, n * I]) into the
    n shared slots of moe.experts, feature block j into slot num_routed + j (see fuse_shared_experts); the
    experts' weight_loader then takes each block as it takes a routed expert's (the TP slice included)."""
    n, inter = moe.fused_shared, moe.moe_inter
    dim, shard = (1, "w2") if kind == "down_proj" else (0, "w1" if kind == "gate_proj" else "w3")
    if tensor.dim() != 2 or tensor.shape[dim] != n * inter:
        raise ValueError(f"shape mismatch for {source}: checkpoint {tuple(tensor.shape)}, expected {n * inter} "
                         f"(n_shared_experts={n} x moe_intermediate_size={inter}) in dim {dim}")
    p = param(f"{mlp_name}.experts.{'w2' if shard == 'w2' else 'w13'}", source)
    for j in range(n):
        p.weight_loader(p, tensor.narrow(dim, j * inter, inter), shard, moe.num_routed + j)


# self_attn.{q_a_proj | q_proj (no q_lora) | kv_a_proj_with_mqa}.<param>: shards of fused_qkv_a_proj when fused
_QKV_A = re.compile(r"^(.*\.self_attn)\.(q_a_proj|q_proj|kv_a_proj_with_mqa)\.(\w+)$")

_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")


class MTPKeepingCausalLM(DecoderForCausalLM):
    """A DecoderForCausalLM whose checkpoint may carry MTP layers (num_nextn_predict_layers, named as layers
    num_hidden_layers + i): they load into `self.mtp` (built on demand, so checkpoints without them load as
    before) and are kept. A layer index past them still raises.
    With run_mtp (a host drafting with them: atom-server's speculative decoding, method "mtp") they are built
    from the config up front and the first one runs: its attention comes from the host's factory, like the
    model's layers (layer index num_hidden_layers, so it gets its own KV cache spec), and `mtp_forward` /
    `mtp_logits` draft with it. Further MTP layers stay kept (drafting reuses the first one recursively).
    A host that drafts with its own MTP model (vLLM, SGLang) sets keep_mtp_layers = False: the MTP tensors
    are then checked and skipped, not held in memory (one more decoder layer, ~11B parameters on V3)."""

    keep_mtp_layers: bool = True
    supports_mtp: bool = True

    def __init__(self, config, attn_factory=None, prefix: str = "", max_positions: int | None = None, *,
                 quant_config: QuantizationConfig | None = None, run_mtp: bool = False):
        super().__init__(config, attn_factory=attn_factory, prefix=prefix, max_positions=max_positions,
                         quant_config=quant_config)
        # what make_block needs to build MTP blocks like the model's (on demand, when a checkpoint has them)
        self._max_positions, self._mtp_quant_config = max_positions, quant_config
        self._mtp_factory = attn_factory
        self.run_mtp = run_mtp
        if run_mtp:
            count = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
            if count < 1:
                raise ValueError(f"{type(self).__name__}: the config has no MTP layers (num_nextn_predict_layers "
                                 "is 0 or missing), so it cannot draft with them")
            self._build_mtp(count)

    def make_block(self, layer_idx: int, prefix: str, attn_factory=_kept_factory) -> nn.Module:  # pragma: no cover
        """A decoder block like the model's layer `layer_idx`, its attention built by attn_factory (the default
        makes a KeptAttention, never run; None: the default implementation, as for the model's layers)."""
        raise NotImplementedError

    def _mtp_index(self, source: str) -> int | None:
        m = _LAYER.match(source)
        if not m or int(m.group(1)) < self.config.num_hidden_layers:
            return None
        i = int(m.group(1)) - self.config.num_hidden_layers
        num_mtp = getattr(self.config, "num_nextn_predict_layers", 0) or 0
        if i >= num_mtp:
            raise ValueError(f"checkpoint tensor {source!r} belongs to layer {m.group(1)}, past the model's "
                             f"{self.config.num_hidden_layers} layers and {num_mtp} MTP layer(s) "
                             f"(num_nextn_predict_layers)")
        return i

    def checkpoint_name(self, name: str) -> str | None:
        i = self._mtp_index(name)
        if i is None:
            return super().checkpoint_name(name)
        rest = _LAYER.match(name).group(2)
        if rest.startswith("embed_tokens."):
            return None  # the model's own embedding
        if not rest.startswith(_MTP_OWN):
            rest = "mtp_block." + rest
        return f"mtp.layers.{i}.{rest}"

    def _build_mtp(self, count: int) -> None:
        from atom.loader.model_loader import default_dtype

        ref = self.model.embed_tokens.weight
        n = self.config.num_hidden_layers
        layers = []
        with default_dtype(ref.dtype), torch.device(ref.device):
            for i in range(count):
                run = self.run_mtp and i == 0
                block = self.make_block(n + i, f"model.layers.{n + i}", self._mtp_factory if run else _kept_factory)
                layers.append(MTPLayer(self.config, block, quant_config=self._mtp_quant_config,
                                       prefix=f"model.layers.{n + i}", run=run))
        self.mtp = MTPLayers(layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mtp: list[tuple[str, torch.Tensor]] = []

        def main_model(weights):
            for name, tensor in weights:
                if self._mtp_index(name) is None:  # raises for a layer past the MTP layers
                    yield name, tensor
                elif self.keep_mtp_layers or self.run_mtp:
                    mtp.append((name, tensor))

        loaded = super().load_weights(main_model(weights))
        if mtp:
            if not hasattr(self, "mtp"):
                self._build_mtp(1 + max(self._mtp_index(name) for name, _ in mtp))
            loaded |= super().load_weights(mtp)
        return loaded

    def _load_tensor(self, source: str, tensor: torch.Tensor, param) -> None:
        name = self.checkpoint_name(source)
        if name is not None and (m := _SHARED_EXPERT.match(name)):
            try:
                moe = self.get_submodule(m.group(1))
            except AttributeError:  # no such layer: the generic path names the tensor in its error
                moe = None
            if getattr(moe, "fused_shared", 0):
                load_fused_shared(moe, m.group(1), m.group(2), tensor, param, source)
                return
        super()._load_tensor(source, tensor, param)

    # ---- drafting (run_mtp) ----------------------------------------------------------------------
    def mtp_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        """The first MTP layer at `positions`: input_ids [T] are the tokens *after* each position, prev_hidden
        [T, H] the hidden states there (the target's final ones, or the previous draft step's) -> [T, H], the
        hidden states mtp_logits reads and a next draft step takes as prev_hidden."""
        return self.mtp.layers[0](self.model.embed_tokens(input_ids), positions, prev_hidden)

    def mtp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mtp.layers[0].compute_logits(hidden)


class DeepseekV2ForCausalLM(MTPKeepingCausalLM):
    backbone_cls = DeepseekV2Model
    uses_mla = True
    kv_scale_owner = "mla_attn"  # self_attn.k_scale (any of vLLM's spellings): the latent cache's scale

    def __init__(self, config, attn_factory=None, prefix: str = "", max_positions: int | None = None, *,
                 mla_factory: MLAAttentionFactory | None = None, quant_config: QuantizationConfig | None = None,
                 run_mtp: bool = False):
        if attn_factory is not None and mla_factory is None:
            raise ValueError(f"{type(self).__name__} uses multi-head latent attention: pass the host's MLA "
                             "implementation as mla_factory (the attention factory given builds multi-head "
                             "attention only)")
        super().__init__(config, attn_factory=mla_factory, prefix=prefix, max_positions=max_positions,
                         quant_config=quant_config, run_mtp=run_mtp)

    @classmethod
    def options(cls, config) -> DeepseekOptions:
        return DeepseekOptions(routing=v2_routing(config), rope_interleaved=True)

    def make_block(self, layer_idx: int, prefix: str, attn_factory=_kept_factory) -> nn.Module:
        return deepseek_block(self.config, layer_idx, self.options(self.config), attn_factory,
                              prefix, self._max_positions, quant_config=self._mtp_quant_config)

    def _load_tensor(self, source: str, tensor: torch.Tensor, param) -> None:
        name = self.checkpoint_name(source)
        if name is not None and (m := _QKV_A.match(name)):
            try:
                attn = self.get_submodule(m.group(1))
            except AttributeError:  # no such layer: the generic path names the tensor in its error
                attn = None
            if getattr(attn, "fused_qkv_a_proj", None) is not None:
                p = param(f"{m.group(1)}.fused_qkv_a_proj.{m.group(3)}", source)
                p.weight_loader(p, tensor, 1 if m.group(2) == "kv_a_proj_with_mqa" else 0)
                return
        if name is not None and ".self_attn.q_proj." in name:  # MLA's q_proj is whole, not a q|k|v shard
            p = param(name, source)
            p.weight_loader(p, tensor)
            return
        super()._load_tensor(source, tensor, param)
