"""A chat-template worker process: renders chat templates with transformers' own renderer (Jinja's
immutable sandbox), away from the API server's event loop, under a memory limit, and killable.

Started by atom_server.serving.chat_templates as `python -m atom_server.serving.chat_template_worker`.
Protocol on stdin/stdout: 4-byte big-endian length + msgpack map, one reply per job:
    job   {"template", "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
           "kwargs", "max_chars"}
    reply {"text": str} | {"error": str, "kind": "template" | "memory" | "size"}
The parent enforces the time bound (it kills a worker that does not answer in time).
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import sys

import msgspec

MEMORY_ENV = "ATOM_TEMPLATE_WORKER_MEMORY_BYTES"
_HEADER = struct.Struct(">I")


def _data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_memory(extra: int) -> None:
    """RLIMIT_DATA (heap and anonymous mappings, not the mapped libraries): what is in use now plus extra."""
    limit = _data_bytes() + extra
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _read_exact(stream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when workers stop
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol
    inp = sys.stdin.buffer
    from transformers.utils.chat_template_utils import render_jinja_template

    _limit_memory(int(os.environ.get(MEMORY_ENV, str(1 << 30))))
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    out.write(_HEADER.pack(0))  # ready
    out.flush()
    while True:
        header = _read_exact(inp, _HEADER.size)
        if header is None:
            return 0
        body = _read_exact(inp, _HEADER.unpack(header)[0])
        if body is None:
            return 0
        try:
            job = decoder.decode(body)
            rendered, _ = render_jinja_template(
                conversations=[job["messages"]], tools=job.get("tools"), documents=job.get("documents"),
                chat_template=job["template"], continue_final_message=job.get("continue_final_message", False),
                add_generation_prompt=job.get("add_generation_prompt", False), **(job.get("kwargs") or {}))
            text = rendered[0]
            if len(text) > job["max_chars"]:
                reply = {"error": f"the rendered prompt has {len(text)} characters, more than the limit of "
                                  f"{job['max_chars']}", "kind": "size"}
            else:
                reply = {"text": text}
        except MemoryError:
            reply = {"error": "rendering the chat template ran out of its memory limit", "kind": "memory"}
        except RecursionError:
            reply = {"error": "the chat template recursed too deeply", "kind": "template"}
        except Exception as e:  # a template error is the request's fault (roles, content, template code)
            reply = {"error": f"{type(e).__name__}: {e}", "kind": "template"}
        data = encoder.encode(reply)
        out.write(_HEADER.pack(len(data)) + data)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
