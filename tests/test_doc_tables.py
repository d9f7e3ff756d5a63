"""The docs' reference tables agree with the code: the error table of docs/api.md lists exactly the
(status, type) pairs the handler can answer, README's short error table only pairs from it, and the
settings table of docs/usage.md names exactly the fields of EncoderSettings.

The error pairs are read from the handler's source (every `RequestError(status, "Type", ...)` and
`bad_request(..., "Type")` call), not from a list kept beside it, so a new refusal fails here until
it is documented. No server needed."""
from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re

from image_embedder.settings import EncoderSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHSERVE = "(TorchServe)"  # a row for what TorchServe answers itself, before or around the handler


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


# -- the code -----------------------------------------------------------------------------------------

def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _module_strings(tree: ast.Module) -> dict[str, object]:
    """The module's `NAME = <constant>` assignments (kserve_v2's `KIND`, for one)."""
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) for target in node.targets if isinstance(target, ast.Name)}


def _value(node: ast.AST, constants: dict[str, object]) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def _bad_request_default() -> str:
    tree = ast.parse(_read("handler/image_embedder/errors.py"))
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "bad_request")
    return function.args.defaults[-1].value


def code_errors() -> tuple[set[tuple[int, str]], list[str]]:
    """Every (status, type) the handler's source can answer, and the calls whose pair can't be read
    (allowed only where an existing error is copied, `exc.status`/`self.kind`, or inside bad_request)."""
    pairs, unread = set(), []
    default = _bad_request_default()
    for path in sorted(glob.glob(os.path.join(REPO, "handler", "**", "*.py"), recursive=True)):
        tree = ast.parse(_read(path))
        constants = _module_strings(tree)
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name = _callee(call)
            args = list(call.args) + [k.value for k in call.keywords if k.arg in ("status", "kind")]
            if name == "bad_request":
                status, kind = 400, _value(args[1], constants) if len(args) > 1 else default
            elif name == "RequestError" and len(args) >= 2:
                status, kind = _value(args[0], constants), _value(args[1], constants)
            else:
                continue
            if isinstance(status, int) and isinstance(kind, str):
                pairs.add((status, kind))
                continue
            unreadable = [a for a in args[:2] if _value(a, constants) is None]
            copied = all(isinstance(a, ast.Attribute) for a in unreadable)  # RequestError(exc.status, exc.kind, ...)
            in_bad_request = path.endswith("errors.py") and all(isinstance(a, ast.Name) and a.id == "kind" for a in unreadable)
            if not (copied or in_bad_request):
                unread.append(f"{os.path.relpath(path, REPO)}:{call.lineno}")
    return pairs, unread


# -- the docs -----------------------------------------------------------------------------------------

def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading` (a markdown heading line), header and rule dropped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"#+\s+{re.escape(heading)}\s*", line))
    rows, seen_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            seen_table = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif seen_table:
            break
    return [row for row in rows[2:]]


def documented_errors(rows: list[list[str]]) -> set[tuple[int, str]]:
    """(status, type) of every row that is the handler's (not marked (TorchServe))."""
    pairs = set()
    for status_cell, type_cell, *_ in rows:
        if type_cell.startswith(TORCHSERVE):
            continue
        for status in re.findall(r"\d{3}", status_cell):
            pairs |= {(int(status), kind) for kind in re.findall(r"`([^`]+)`", type_cell)}
    return pairs


def test_every_error_the_handler_answers_is_read_from_the_code():
    pairs, unread = code_errors()
    assert not unread, f"calls whose status or type this test can't read: {unread}"
    # a sample the reader can check by eye against the handler: it must be found
    assert {(400, "InvalidNpy"), (400, "InvalidKServeV2"), (415, "UnsupportedMediaType"),
            (507, "OutOfMemory"), (500, "InternalError")} <= pairs


def test_api_error_table_lists_exactly_what_the_handler_answers():
    code, _ = code_errors()
    docs = documented_errors(table_after(_read("docs/api.md"), "Errors"))
    assert not code - docs, f"answered by the handler, missing from docs/api.md's error table: {sorted(code - docs)}"
    assert not docs - code, f"in docs/api.md's error table, never answered by the handler: {sorted(docs - code)}"


def test_readme_keeps_five_common_errors_and_links_to_the_table():
    text = _read("README.md")
    rows = table_after(text, "Errors")
    readme = documented_errors(rows)
    code, _ = code_errors()
    assert readme <= code, f"README's errors the handler never answers: {sorted(readme - code)}"
    assert len({kind for _, kind in readme}) <= 5, f"README lists {sorted(readme)}; keep the five most common, link the rest"
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    assert "docs/api.md#errors" in section


# -- settings -----------------------------------------------------------------------------------------

def documented_settings(rows: list[list[str]]) -> list[str]:
    """Every backticked name in the first column of the settings table (`scale`, `mean`, `std` share a row)."""
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row[0])]


def test_settings_table_names_exactly_the_settings_fields():
    names = documented_settings(table_after(_read("docs/usage.md"), "Settings"))
    fields = {f.name for f in dataclasses.fields(EncoderSettings)}
    assert len(names) == len(set(names)), f"documented twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
    assert not fields - set(names), f"settings missing from docs/usage.md's table: {sorted(fields - set(names))}"
    assert not set(names) - fields, f"in docs/usage.md's table, not a setting: {sorted(set(names) - fields)}"


def test_table_reader_takes_the_table_under_its_heading():
    text = "# A\n| x | y |\n|---|---|\n| 1 | `no` |\n## Errors\nintro\n\n| s | t |\n|---|---|\n| 400, 413 | `A`, `B` |\n| 503 | (TorchServe) `C` |\n\nafter\n| 9 | `Z` |\n"
    rows = table_after(text, "Errors")
    assert rows == [["400, 413", "`A`, `B`"], ["503", "(TorchServe) `C`"]]
    assert documented_errors(rows) == {(400, "A"), (400, "B"), (413, "A"), (413, "B")}


# -- the command list ---------------------------------------------------------------------------------

def test_usage_names_every_image_embedder_command():
    from image_embedder_tools.cli import COMMANDS

    section = _read("docs/usage.md").split("## The `image-embedder` command", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z-]+)`", section))
    assert not set(COMMANDS) - named, f"commands docs/usage.md does not name: {sorted(set(COMMANDS) - named)}"
    for script in re.findall(r"`(\w+\.py)`", section):  # the scripts it names exist
        assert os.path.exists(os.path.join(REPO, "scripts", script)), script


# -- facts that live in config files ------------------------------------------------------------------

def test_docs_state_the_build_batching_defaults_it_writes():
    """The build's batching (tools/image_embedder_tools/ts_defaults.py) as usage.md's --config-file row
    and performance.md's decision state it, so a change of default fails here until the docs follow."""
    from image_embedder_tools.ts_defaults import DEFAULT_TS_CONFIG

    usage = _read("docs/usage.md")
    row = next(line for line in usage.splitlines() if line.startswith("| `--config-file FILE`"))
    for key, value in DEFAULT_TS_CONFIG.items():
        assert f"`{key}: {value}`" in row, (key, row)
    decision = _read("docs/performance.md").split("**Decision**", 1)[1].split("\n\n", 1)[0]
    assert f"`batchSize` {DEFAULT_TS_CONFIG['batchSize']} / `maxBatchDelay` {DEFAULT_TS_CONFIG['maxBatchDelay']} ms" \
        in " ".join(decision.split()), decision
