from atom.models import deepseek_v3
from atom_sglang.model_base import SGLangDeepseekV2Backbone, SGLangModelMixin


class DeepseekV3ForCausalLM(SGLangModelMixin, deepseek_v3.DeepseekV3ForCausalLM):
    backbone_cls = SGLangDeepseekV2Backbone
    uses_mla = True


EntryClass = DeepseekV3ForCausalLM
