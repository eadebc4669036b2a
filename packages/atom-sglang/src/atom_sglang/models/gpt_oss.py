from atom.models import gpt_oss
from atom_sglang.model_base import SGLangModelMixin


class GptOssForCausalLM(SGLangModelMixin, gpt_oss.GptOssForCausalLM):
    pass


EntryClass = GptOssForCausalLM
