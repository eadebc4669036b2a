from atom.models import llama
from atom_sglang.model_base import SGLangModelMixin


class LlamaForCausalLM(SGLangModelMixin, llama.LlamaForCausalLM):
    pass


class MistralForCausalLM(SGLangModelMixin, llama.MistralForCausalLM):
    pass


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
