"""Every request field of vLLM's OpenAI protocol (read from the installed vLLM's source, not imported)
is declared by atom-server as implemented, accepted without effect, or refused: none is silently
dropped. The HTTP side (each refused field -> 400 naming it) is in test_server_api.py."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest

from atom_server.protocol import (
    ACCEPTED_NO_OP,
    IMPLEMENTED_VLLM_FIELDS,
    REFUSED_CHAT_FIELDS,
    REFUSED_COMPLETION_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)


def vllm_fields(relpath: str, class_name: str) -> set[str]:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    names = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, ann = node.target.id, ast.unparse(node.annotation)
            if not name.startswith("_") and not ann.startswith("ClassVar"):
                names.add(name)
    return names


@pytest.mark.parametrize("relpath,class_name,ours,refused", [
    ("entrypoints/openai/chat_completion/protocol.py", "ChatCompletionRequest", ChatCompletionRequest,
     REFUSED_CHAT_FIELDS),
    ("entrypoints/openai/completion/protocol.py", "CompletionRequest", CompletionRequest,
     REFUSED_COMPLETION_FIELDS),
])
def test_every_vllm_field_is_declared(relpath, class_name, ours, refused):
    theirs = vllm_fields(relpath, class_name)
    assert len(theirs) > 40  # the parse found the class body
    missing = sorted(theirs - set(ours.model_fields))
    assert not missing, f"vLLM fields atom-server would silently drop: {missing}"
    accepted = set(ACCEPTED_NO_OP) & set(ours.model_fields)
    assert not accepted & set(refused)
    for name in refused:
        assert name in ours.model_fields


def test_sampler_side_fields_are_implemented():
    """Issue 19's sampler-side fields (and issue 18's structured outputs and tools) flipped from refused to
    implemented: declared with their types, refused nowhere, not in the no-op list either."""
    sampler = ("prompt_logprobs", "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "return_token_ids",
               "priority", "logit_bias", "request_id")
    assert set(sampler) <= set(IMPLEMENTED_VLLM_FIELDS)
    for name in IMPLEMENTED_VLLM_FIELDS:
        assert name not in REFUSED_CHAT_FIELDS and name not in REFUSED_COMPLETION_FIELDS, name
        assert name not in ACCEPTED_NO_OP, name
        assert name in ChatCompletionRequest.model_fields, name
        if name not in ("tools", "tool_choice", "include_reasoning", "reasoning_effort"):  # chat only
            assert name in CompletionRequest.model_fields, name
