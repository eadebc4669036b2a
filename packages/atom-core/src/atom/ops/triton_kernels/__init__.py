"""Triton implementations of atom-core's hot ops (NVIDIA and AMD GPUs; CPU only under TRITON_INTERPRET=1).

Importing this package registers every kernel under the "triton" backend of `atom.ops.registry`.
Each op keeps the exact signature and semantics of its torch reference in `atom.ops.<family>`.
"""

from atom.ops.triton_kernels import (  # noqa: F401
    activation,
    attention,
    dense,
    fp8_producers,
    mla,
    moe,
    moe_fp8,
    moe_routing,
    moe_swigluoai,
    norm,
    qk_norm_rope_cache,
    quant_fp8,
    rope,
    sampling,
)
