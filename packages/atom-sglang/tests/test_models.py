"""ATOM's models inside SGLang: registry resolution, strict imports, and logits against transformers.

Prefill (in two chunks, so the second extends a cached prefix) and decode run through SGLang's real
token pool, RadixAttention and LogitsProcessor, with ATOM's "atom" backend and with SGLang's own
torch_native backend.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
import transformers

from atom_sglang.plugin import register
from tiny_models import CONFIGS, write_checkpoint

assert register()

from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator  # noqa: E402
from sglang.srt.models.registry import ModelRegistry, import_model_classes  # noqa: E402

from sglang_harness import SGLangHarness, publish_server_args  # noqa: E402

ARCHS = sorted(CONFIGS)


def test_every_module_imports_strictly():
    import atom_sglang.models as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    assert sorted(names) == ["llama", "mixtral", "qwen2", "qwen3", "qwen3_moe"]
    for name in names:
        importlib.import_module(f"atom_sglang.models.{name}")  # raises instead of SGLang's log-and-drop
    classes = import_model_classes("atom_sglang.models", strict=True)
    assert sorted(classes) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_resolves_atom_class(arch):
    cls, resolved = ModelRegistry.resolve_model_cls([arch])
    assert resolved == arch and cls.__name__ == arch
    assert cls.__module__.startswith("atom_sglang.models."), cls


def test_quantization_goes_through_atom_and_unknown_methods_are_refused(tmp_path):
    from sglang.srt.layers.quantization.blockwise_int8 import BlockInt8Config
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    from atom.quantization.fp8 import Fp8LinearMethod
    from atom_sglang.models.llama import LlamaForCausalLM

    # SGLang's --quantization fp8 on a float checkpoint: ATOM's online FP8 (its name picks ATOM's scheme)
    write_checkpoint("LlamaForCausalLM", tmp_path)
    publish_server_args(tmp_path, "atom")
    model = LlamaForCausalLM(config=CONFIGS["LlamaForCausalLM"](), quant_config=Fp8Config())
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, Fp8LinearMethod)
    with pytest.raises(NotImplementedError, match=r"cannot serve this quantized checkpoint.*'blockwise_int8' is not "
                                                  r"supported by ATOM; supported: compressed-tensors, fp8"):
        LlamaForCausalLM(config=CONFIGS["LlamaForCausalLM"](),
                         quant_config=BlockInt8Config(is_checkpoint_int8_serialized=True, activation_scheme="dynamic",
                                                      ignored_layers=None, weight_block_size=[128, 128]))


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_checkpoint(request.param, path)
    return request.param, path, hf


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["atom", "torch_native"])
def test_prefill_decode_logits_match_transformers(checkpoint, backend):
    arch, path, hf = checkpoint
    config = transformers.AutoConfig.from_pretrained(path)
    publish_server_args(path, backend)
    cls, _ = ModelRegistry.resolve_model_cls(config.architectures)
    model = cls(config=config, quant_config=None).float().eval()
    loaded = model.load_weights(safetensors_weights_iterator([str(p) for p in path.glob("*.safetensors")]))
    assert loaded == {n for n, _ in model.named_parameters(remove_duplicate=False)}

    torch.manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (9, 6)]
    harness = SGLangHarness(model, config, backend, batch_size=len(prompts))
    seqs = [[] for _ in prompts]

    def check(logits: torch.Tensor, what: str) -> None:
        with torch.no_grad():
            ref = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])
        assert logits.shape == ref.shape
        err = _rel_err(logits.float(), ref)
        assert err < 1e-4, f"{arch}/{backend} {what}: max rel err {err:.2e}"

    for chunk in ([p[:4] for p in prompts], [p[4:] for p in prompts]):  # the second extends a cached prefix
        for s, c in zip(seqs, chunk):
            s.extend(c)
        logits = harness.step(chunk)
        check(logits, f"extend to {[len(s) for s in seqs]}")
    for step in range(3):
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
        logits = harness.step([[t] for t in nxt])
        check(logits, f"decode step {step}")
