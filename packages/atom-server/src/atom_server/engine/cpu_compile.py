"""The CPU forward through torch.compile (Inductor's C++ backend): the CPU counterpart of the decode graphs.

Eager PyTorch issues ~30 small ops per layer and step (norms, rope, the KV write, the attention's index
arithmetic), whose Python and dispatch overhead outweighs their work on a CPU at decode batch sizes, and whose
float32 round trips cost a prefill ~15% of its time; Inductor fuses them into a few C++ loops per layer.
What is compiled:
- one decoder layer (`DecoderLayer.forward`): one graph for every layer of the model (regional compilation:
  the compile takes the time of one layer whatever the depth; models with layer kinds, e.g. sliding-window
  and full attention, get one graph per kind), dynamic in the token count, the row count and the block-table
  width, so prefill, mixed and decode steps of any size and context run the same graph without recompiling
  (sizes are treated size-obliviously: one row runs the same graph as 32);
- for decode steps, also the final norm, the LM head and the greedy argmax (`decode`).
The embedding lookup stays eager (one op). Every layer gets a residual (zeros for the first: the fused
add + norm then computes exactly what the first layer does without one), so all layers share one graph.

The layers see `PagedAttentionMetadata(traceable=True)`: qk-norm, rope and the KV write run as plain tensor
code that Inductor fuses; the attention is the resolved paged_attention implementation as one opaque custom
op that finds the step's shape itself (on CPU the torch reference: decoding rows through the native kernel
of atom.ops.cpu_native, prefill rows through torch's fused attention); the linear layers keep oneDNN's packed
weights through the custom op `atom::cpu_packed_linear`. After the warm-up the compiled graphs are called
directly (`_DirectCall`), not through Dynamo's frame evaluation: its guards are what tells one compiled graph
from another, and here each layer has its one graph, valid for every size.

Used on CPU when the model is a `DecoderModel` with `PagedAttention` layers at TP=1 and no MTP drafter; off
with `--enforce-eager` (as vLLM's flag turns its compilation off) or ATOM_CPU_COMPILE=0. Compiled at start-up
(`warm_up`, ~10-30 s on two cores the first time); Inductor caches the compiled code on disk
(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>), so later starts mostly skip the C++ compile.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import types

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from atom.forward_context import set_forward_context
from atom.layers.attention import AttentionInputs, PagedAttention, PagedAttentionMetadata
from atom.layers.kv_cache import kv_cache_layers
from atom.models.decoder import DecoderLayer, DecoderModel
from atom.ops import cpu_native

logger = logging.getLogger(__name__)


def enabled_by_env() -> bool:
    return os.environ.get("ATOM_CPU_COMPILE", "1").lower() not in ("0", "false", "no", "off")


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the compiled CPU forward can run `model`, else why not."""
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, DecoderModel) or type(backbone).forward is not DecoderModel.forward:
        return f"{type(model).__name__} has no plain DecoderModel backbone"
    if not all(type(layer) is DecoderLayer for layer in backbone.layers):
        return "its layers are not plain DecoderLayers"
    if not all(isinstance(m, PagedAttention) for m in kv_cache_layers(model)):
        return "its attention layers are not PagedAttention"
    return None


def _run_layer(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
               residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(positions, hidden, residual)


def _run_head(norm: nn.Module, model: nn.Module, hidden: torch.Tensor,
              residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, _ = norm(hidden, residual)
    logits = model.compute_logits(hidden).float()
    return logits, logits.argmax(dim=-1)


class _Graph:
    """A torch.compile backend (Inductor) that keeps what it compiled: the compiled graph and, for each of its
    inputs, the expression Dynamo reads it from (`L['layer']._modules[...]._parameters['weight']`,
    `L['hidden'].size()[0]`, the forward context's tensors). With them the graph is called directly, without
    Dynamo's per-call frame evaluation, which costs more than the C++ of a layer at batch 1 (~0.15 ms a call
    on the 2-core machine: 30 layers, ~4.5 ms a step)."""

    def __init__(self):
        self.compiled: list[tuple[list[str], object]] = []
        self.last: int | None = None  # the graph Dynamo ran last (which graph a layer takes, at warm-up)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        # bf16/fp16 results rounded where eager rounds them (Inductor otherwise keeps float32 between fused ops)
        fn = compile_fx(gm, example_inputs, config_patches={"emulate_precision_casts": True})
        names = []
        for node in gm.graph.find_nodes(op="placeholder"):
            source = node.meta["grapharg"].source
            names.append(source.name() if callable(source.name) else source.name)
        index = len(self.compiled)
        self.compiled.append((names, fn))

        def run(*args):
            self.last = index
            return fn(*args)

        return run


def _own_copy(fn):
    """`fn` with a code object of its own, hence a Dynamo cache of its own: each CompiledForward compiles and
    captures its own graphs (Dynamo caches compiled graphs per code object, process-wide)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_copies = itertools.count()


class _DirectCall:
    """Calls one compiled graph with its inputs taken from `L` (the compiled function's arguments by name) and
    the function's globals. Inputs read from the `static` arguments (modules: a layer's parameters and KV
    cache) are read once per set of those (`template`); the others once per `inputs` call."""

    def __init__(self, names: list[str], fn, globals_: dict, static: tuple[str, ...]):
        self.fn = fn
        self.globals = globals_
        self.codes = [compile(n, "<graph input>", "eval") for n in names]
        prefixes = tuple(f"L[{name!r}]" for name in static)
        self.static = [i for i, n in enumerate(names) if n.startswith(prefixes)]
        static_set = set(self.static)
        self.dynamic = [i for i in range(len(names)) if i not in static_set]
        self.slot = {n: i for i, n in enumerate(names)}

    def template(self, **static) -> list:
        env = {"L": static, "G": self.globals}
        args: list = [None] * len(self.codes)
        for i in self.static:
            args[i] = eval(self.codes[i], env)  # noqa: S307 - Dynamo's own source expressions
        return args

    def inputs(self, **values) -> list[tuple[int, object]]:
        env = {"L": values, "G": self.globals}
        return [(i, eval(self.codes[i], env)) for i in self.dynamic]  # noqa: S307

    def __call__(self, template: list, inputs: list[tuple[int, object]], **tensors):
        args = list(template)
        for i, value in inputs:
            args[i] = value
        for name, value in tensors.items():  # per-call tensors whose sizes are those `inputs` read
            args[self.slot[f"L[{name!r}]"]] = value
        return self.fn(*args)


class CompiledForward:
    """The compiled CPU forward of one model (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.backbone: DecoderModel = model.model
        self._layer_graph, self._head_graph = _Graph(), _Graph()
        self._layer_fn, self._head_fn = _own_copy(_run_layer), _own_copy(_run_head)
        self._layer = torch.compile(self._layer_fn, fullgraph=True, backend=self._layer_graph)
        self._head = torch.compile(self._head_fn, fullgraph=True, backend=self._head_graph)
        self._layer_graph_of: list[int] = []  # per layer, the graph it runs (layer kinds differ, e.g. windowed)
        self._layers: list[tuple[_DirectCall, list]] | None = None  # bound direct calls, per layer
        self._head_call: tuple[_DirectCall, list] | None = None
        self.compile_s: float | None = None
        self.steps = {"forward": 0, "decode": 0}  # steps run compiled, by kind (tests, stats)

    @staticmethod
    def metadata(inputs: AttentionInputs) -> PagedAttentionMetadata:
        """The layers' metadata for a step (every slot a real one): the traceable kind, no max lengths read."""
        return PagedAttentionMetadata(inputs.slot_mapping, inputs.block_tables, inputs.query_start_loc,
                                      inputs.seq_lens, inputs.max_query_len, inputs.max_seq_len,
                                      inputs.window_slot_mapping, inputs.window_block_tables, traceable=True)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor,
                      md: PagedAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) after the last layer, before the final norm, for every token of the step; writes
        the step's KV. The caller sets the forward context (md)."""
        hidden = self.backbone.embed_tokens(ids)
        return self._run_layers(positions, hidden, torch.zeros_like(hidden))

    def _run_layers(self, positions: torch.Tensor, hidden: torch.Tensor,
                    residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layers is None:
            with fx_config.patch(backed_size_oblivious=True):  # batch 1 takes the general graph too
                graph_of = []
                for layer in self.backbone.layers:
                    hidden, residual = self._layer(layer, positions, hidden, residual)
                    graph_of.append(self._layer_graph.last)
                self._layer_graph_of = graph_of
            return hidden, residual
        inputs: dict[int, list] = {}  # per graph: its per-step inputs, read once
        for call, template in self._layers:
            if id(call) not in inputs:
                inputs[id(call)] = call.inputs(positions=positions, hidden=hidden, residual=residual)
            hidden, residual = call(template, inputs[id(call)], hidden=hidden, residual=residual)
        return hidden, residual

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, md: PagedAttentionMetadata) -> torch.Tensor:
        """The model's final hidden states [T, hidden] (what model(ids, positions) returns)."""
        self.steps["forward"] += 1
        with set_forward_context(md):
            hidden, residual = self.hidden_states(ids, positions, md)
        return self.backbone.norm(hidden, residual)[0]

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor,
               md: PagedAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step (one token per row): (float32 logits [B, vocab], greedy tokens [B])."""
        self.steps["decode"] += 1
        with set_forward_context(md):
            hidden, residual = self.hidden_states(ids, positions, md)
        if self._head_call is None:
            with fx_config.patch(backed_size_oblivious=True):
                return self._head(self.backbone.norm, self.model, hidden, residual)
        call, template = self._head_call
        return tuple(call(template, call.inputs(hidden=hidden, residual=residual)))

    @torch.inference_mode()  # the inputs are inference tensors, as in the runner's steps
    def warm_up(self, windowed: bool) -> float:
        """Compile now, then bind the direct calls; returns the seconds it took. The layers are traced on a
        two-row step of three tokens (a decoding row and a two-token prefill, so the token count and the row
        count stay distinct sizes: one graph serves prefill, mixed and decode steps), the head on a decode
        step. Both write block 0 of the cache, which holds nothing yet: a sequence that gets that block writes
        every slot it reads first."""
        start = time.perf_counter()
        cpu_native.library()  # built (or found missing) before tracing: the trace bakes in which attention runs
        slots = torch.tensor([0, 1, 2])
        inputs = AttentionInputs(slot_mapping=slots, block_tables=torch.zeros(2, 2, dtype=torch.int32),
                                 query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32),
                                 seq_lens=torch.tensor([1, 3], dtype=torch.int32), max_query_len=2, max_seq_len=3)
        if windowed:
            inputs.window_slot_mapping, inputs.window_block_tables = slots.clone(), inputs.block_tables.clone()
        ids, positions = torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2])
        # the token count, the row count and the table width vary from step to step
        for t in (ids, positions, inputs.slot_mapping, inputs.query_start_loc, inputs.seq_lens,
                  inputs.window_slot_mapping):
            if t is not None:
                torch._dynamo.mark_dynamic(t, 0)
        for t in (inputs.block_tables, inputs.window_block_tables):
            if t is not None:
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, 1)
        md = self.metadata(inputs)
        with set_forward_context(md):
            hidden = self.backbone.embed_tokens(ids)
            residual = torch.zeros_like(hidden)
            for t in (hidden, residual):
                torch._dynamo.mark_dynamic(t, 0)
            self._run_layers(positions, hidden, residual)
            hidden, residual = hidden[:2], residual[:2]
            for t in (hidden, residual):
                torch._dynamo.mark_dynamic(t, 0)
            with fx_config.patch(backed_size_oblivious=True):
                self._head(self.backbone.norm, self.model, hidden, residual)
        try:
            self._bind()
        except Exception as e:  # Dynamo's graph inputs not as expected: the compiled graphs through Dynamo
            logger.warning("compiled CPU forward: calling the graphs directly failed (%s); going through "
                           "torch.compile's frame evaluation instead (slower at small batches)", e)
        self.compile_s = time.perf_counter() - start
        return self.compile_s

    def _bind(self) -> None:
        if len(self._head_graph.compiled) != 1 or not self._layer_graph_of or None in self._layer_graph_of:
            raise RuntimeError(f"unexpected graphs: {len(self._head_graph.compiled)} for the head, layers took "
                               f"{self._layer_graph_of}")
        calls = [_DirectCall(*graph, self._layer_fn.__globals__, static=("layer",))
                 for graph in self._layer_graph.compiled]
        layers = [(calls[g], calls[g].template(layer=layer))
                  for g, layer in zip(self._layer_graph_of, self.backbone.layers)]
        head = _DirectCall(*self._head_graph.compiled[0], self._head_fn.__globals__, static=("norm", "model"))
        self._layers, self._head_call = layers, (head, head.template(norm=self.backbone.norm, model=self.model))
