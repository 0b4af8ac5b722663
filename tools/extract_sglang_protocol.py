#!/usr/bin/env python
"""Record the SGLang HTTP protocol the rollout engine speaks, read from SGLang's own source.

    pip download --no-deps sglang==0.5.23 -d /tmp/sgl && \\
        python tools/extract_sglang_protocol.py /tmp/sgl/sglang-0.5.23-*.whl

Importing SGLang's modules needs GPU-only packages, so this parses them with ``ast``: the
routes of ``srt/entrypoints/http_server.py`` (path, methods, request class of the handler),
the fields and default expressions of those request classes in ``srt/managers/io_struct.py``
(inherited fields included), of ``SamplingParams`` in ``srt/sampling/sampling_params.py``, and
the allow-list of ``SafeUnpickler`` in ``srt/utils/common.py`` (what a weight payload may
reference; the CPU stand-in server unpickles with it).
Writes ``tests/fixtures/sglang_protocol.json`` with the SGLang version and the sha256 of each
file read (plus ``tokenizer_manager.py``, where the n > 1 output order lives), so an SGLang
upgrade shows up as a fixture diff. tests/test_sglang_protocol.py checks every request the
engine sends against it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import run_tool  # noqa: E402
from megatron_sppo.errors import UserError  # noqa: E402
from megatron_sppo.fileio import write_text_atomic  # noqa: E402

FILES = {"http_server": "sglang/srt/entrypoints/http_server.py",
         "io_struct": "sglang/srt/managers/io_struct.py",
         "sampling_params": "sglang/srt/sampling/sampling_params.py",
         "tokenizer_manager": "sglang/srt/managers/tokenizer_manager.py",
         "common": "sglang/srt/utils/common.py"}
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sglang_protocol.json"


def read_sources(wheel: Path) -> tuple[str, dict[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [p for p in FILES.values() if p not in names]
        if missing:
            raise UserError(f"{wheel} lacks {', '.join(missing)}: give an SGLang wheel")
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        version = next(line.split(":", 1)[1].strip() for line in
                       z.read(meta).decode().splitlines() if line.startswith("Version:"))
        return version, {k: z.read(p).decode() for k, p in FILES.items()}


def class_fields(tree: ast.Module) -> dict[str, dict]:
    """Every class's annotated fields ``{name: default source or None}``, bases included."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    cache: dict[str, dict] = {}

    def fields(name: str) -> dict:
        if name in cache:
            return cache[name]
        node, out = classes[name], {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[stmt.target.id] = ast.unparse(stmt.value) if stmt.value else None
        cache[name] = out
        return out

    return {name: fields(name) for name in classes}


def safe_unpickler_globals(tree: ast.Module) -> list[list[str]]:
    """``SafeUnpickler.ALLOWED_GLOBALS``: the (module, name) pairs a payload may reference."""
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    value = next(s.value for s in cls.body if isinstance(s, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "ALLOWED_GLOBALS" for t in s.targets))
    return sorted(map(list, ast.literal_eval(value)))


def routes(tree: ast.Module) -> dict[str, dict]:
    """``{path: {"methods": [...], "request": class or None}}`` of the app's literal routes."""
    out = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and isinstance(deco.func.value, ast.Name) and deco.func.value.id == "app"
                    and deco.args and isinstance(deco.args[0], ast.Constant)):
                continue
            kind = deco.func.attr
            methods = ([kind.upper()] if kind in ("get", "post", "put") else
                       next((ast.literal_eval(k.value) for k in deco.keywords
                             if k.arg == "methods"), ["GET"]))
            request = None
            for arg in node.args.args:
                text = ast.unparse(arg.annotation) if arg.annotation else ""
                if "ReqInput" in text or "AbortReq" in text:
                    request = text.removeprefix("Annotated[").split(",")[0].strip("]")
            out[deco.args[0].value] = {"methods": sorted(methods), "request": request}
    return out


def extract(args: argparse.Namespace) -> None:
    version, sources = read_sources(Path(args.wheel))
    io_classes = class_fields(ast.parse(sources["io_struct"]))
    served = routes(ast.parse(sources["http_server"]))
    requests = sorted({r["request"] for r in served.values() if r["request"]})
    fixture = {
        "sglang_version": version,
        "sha256": {key: hashlib.sha256(text.encode()).hexdigest()
                   for key, text in sources.items()},
        "routes": served,
        "requests": {name: io_classes[name] for name in requests if name in io_classes},
        "sampling_params": class_fields(ast.parse(sources["sampling_params"]))["SamplingParams"],
        "safe_unpickler_globals": safe_unpickler_globals(ast.parse(sources["common"])),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: SGLang {version}, {len(served)} routes, {len(fixture['requests'])} "
          "request classes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", help="an sglang-*.whl (pip download --no-deps sglang==X)")
    parser.add_argument("--out", default=str(OUT))
    sys.exit(run_tool(extract, parser.parse_args()))
