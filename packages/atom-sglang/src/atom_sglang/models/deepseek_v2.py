from atom.models import deepseek_v2
from atom_sglang.model_base import SGLangDeepseekV2Backbone, SGLangModelMixin


class DeepseekV2ForCausalLM(SGLangModelMixin, deepseek_v2.DeepseekV2ForCausalLM):
    backbone_cls = SGLangDeepseekV2Backbone
    uses_mla = True


EntryClass = DeepseekV2ForCausalLM
