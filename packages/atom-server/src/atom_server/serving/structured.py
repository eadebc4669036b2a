"""A request's structured-output constraint: from response_format, structured_outputs, vLLM's guided_* fields
or the tools a tool_choice forces (required / a named function), checked here so that a constraint that does
not compile, or two of them together, is a 400 naming the field before anything reaches the engine."""

from __future__ import annotations

from atom_server.engine.structured_output import grammar_of, parse_json_schema
from atom_server.protocol import GUIDED_FIELDS
from atom_server.sampling_params import StructuredOutputsParams
from atom_server.serving.errors import bad_request

_GUIDED_KIND = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}


def _spec(param: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except (TypeError, ValueError) as e:
        raise bad_request(f"{param}: {e}", param=param) from e


def _schema(param: str, value) -> dict:
    try:
        return parse_json_schema(value)
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param=param) from e


def requested_constraints(req) -> list[tuple[str, StructuredOutputsParams]]:
    """(field, spec) for every structured-output field the request sets."""
    found = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", _spec("response_format", json_object=True)))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.json_schema if rf.json_schema is not None else None
        if schema is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema",
                              param="response_format")
        found.append(("response_format", _spec("response_format", json=_schema("response_format", schema))))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        kw = so.model_dump(exclude_none=True, by_alias=True)
        if "json" in kw:
            kw["json"] = _schema("structured_outputs", kw["json"])
        found.append(("structured_outputs", _spec("structured_outputs", **kw)))
    for name in GUIDED_FIELDS:
        value = getattr(req, name, None)
        if value is not None:
            if name == "guided_json":
                value = _schema(name, value)
            found.append((name, _spec(name, **{_GUIDED_KIND[name]: value})))
    return found


def tool_choice_constraint(tools: list, tool_choice) -> StructuredOutputsParams | None:
    """vLLM's schemas: "required" -> a non-empty array of {"name": one of the tools, "parameters": its schema};
    a named function -> that function's parameters."""
    if tool_choice == "required":
        variants = [{"properties": {"name": {"type": "string", "enum": [t.function.name]},
                                    "parameters": t.function.parameters or {"type": "object"}},
                     "required": ["name", "parameters"]} for t in tools]
        schema = {"type": "array", "minItems": 1,
                  "items": {"type": "object", "anyOf": variants} if len(variants) > 1 else
                  {"type": "object", **variants[0]}}
        return StructuredOutputsParams(json=schema)
    if tool_choice is not None and not isinstance(tool_choice, str):
        fn = next(t.function for t in tools if t.function.name == tool_choice.function.name)
        return StructuredOutputsParams(json=fn.parameters or {"type": "object"})
    return None


def harmony_tool_constraint(tools: list, tool_choice) -> StructuredOutputsParams:
    """gpt-oss's forced calls in its own format (vLLM's harmony structural tag): an optional analysis message, then
    a commentary message to functions.NAME whose JSON body matches that function's parameters; "required" takes
    any of the tools, a named function that one."""
    names = [t.function.name for t in tools] if tool_choice == "required" else [tool_choice.function.name]
    params = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
    return StructuredOutputsParams(harmony_calls=[[name, params[name]] for name in names])


async def structured_outputs_of(ctx, req, forced: tuple[str, StructuredOutputsParams] | None = None
                                ) -> StructuredOutputsParams | None:
    """The request's one constraint (or None), compiled once here (without the vocabulary) to check it."""
    found = requested_constraints(req)
    if forced is not None:
        found.append(forced)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise bad_request(f"only one structured-output constraint may be given per request, got {names}",
                          param=found[1][0])
    param, spec = found[0]
    try:
        await ctx.preprocess.run(grammar_of, spec)
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param=param) from e
    return spec
