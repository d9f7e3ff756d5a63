"""The docs run: every ```bash and ```python block of README.md, then of docs/*.md in the readers'
order (the README's Documentation table), executed in order in ONE bash session against a real
TorchServe started the way the README says; each page starts from the README's server (restarted
when the page before changed it), so a page depends on the README alone, and pages can be ordered
for readers.

The convention the docs follow (what this file checks):
- ```bash and ```python blocks run; ```python blocks as `.venv/bin/python - <<'PY'`, same cwd.
- ```bash no-run blocks are shown, not run; each must start with a command in NO_RUN_COMMANDS
  (tools this machine lacks, or `scripts/test.sh`, which is what runs this file).
- ```bash https / ```python https blocks talk to a TorchServe serving HTTPS, which this session does not
  start: tests/test_tls_server.py runs them, in order, against its own (docs/security.md#https).
- Output examples go in ```text blocks; every fence names its language; no `...` in a runnable block;
  the interpreter is spelled `.venv/bin/python` (and `.venv/bin/torchserve`).
- The session runs in a scratch copy of the working tree (tracked and untracked-not-ignored files,
  `.venv` symlinked) with a private TMPDIR, `set -euo pipefail`, and ports 8080/8081/8082 and gRPC's
  7070/7071 rewritten to free ones (config.properties and the blocks), so it never meets another server.
- `curl` fails on an HTTP error (it runs with `--fail-with-body`), unless the command asks for the
  status itself with `-w`/`--write-out`: an example that shows an error prints its status code.
Whatever happens, every TorchServe the docs started in the scratch copy is stopped at the end.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

import pytest

from image_embedder_testkit import background
from image_embedder_testkit.background import Lane
from image_embedder_testkit.scratch import free_ports, rewrite_ports, scratch_copy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = ("bash", "python")
# `scripts/test.sh` runs the whole suite, this file included: running it from the docs would recurse
# (CI runs it anyway, .ci/run). The others need a cluster, a container daemon or a chart repository.
NO_RUN_COMMANDS = ("kubectl", "docker", "helm", "scripts/test.sh")
# A fence whose language looks like a shell or Python but is not spelled bash/python would be skipped
# silently: refuse it.
MISSPELT = {"sh", "shell", "console", "zsh", "py", "python3", "pycon", "shell-session"}
RUN_TIMEOUT = 540  # seconds for the whole session (three TorchServe starts, a dozen builds); under the 600 s test timeout
# Flag -> the test file that runs such blocks instead of this session.
RUN_ELSEWHERE = {"https": "tests/test_tls_server.py"}
BARE_INTERPRETER = re.compile(r"(?:^|(?<!-m)[\s;&|(`$])(python3?|pip3?|torchserve)(?=\s|$)", re.M)


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is (file, 1-based number among the file's fences, line) and what."""

    path: str
    number: int
    line: int
    language: str
    flags: tuple[str, ...]
    text: str

    @property
    def runnable(self) -> bool:
        """Run in this file's session."""
        return self.language in RUNNABLE and not {"no-run", *RUN_ELSEWHERE} & set(self.flags)

    @property
    def code(self) -> bool:
        """Run somewhere: here or by the test RUN_ELSEWHERE names."""
        return self.language in RUNNABLE and "no-run" not in self.flags

    def where(self) -> str:
        return f"{self.path} block {self.number} (line {self.line}, ```{' '.join((self.language,) + self.flags)})"


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")


def parse_blocks(path: str, text: str) -> list[Block]:
    """Every fenced block of a markdown text, indentation of the opening fence removed."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = len(match.group(1)), match.group(2), match.group(3).strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and not lines[i].strip()[len(fence):].strip()):
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip())):])
            i += 1
        i += 1  # the closing fence
        words = info.split()
        blocks.append(Block(path, len(blocks) + 1, start, words[0] if words else "", tuple(words[1:]),
                            "\n".join(body) + "\n"))
    return blocks


def doc_files(root: str = REPO) -> list[str]:
    """README.md first, then docs/*.md in the order the README's Documentation table lists them (the
    readers' order), any page it doesn't list last; relative to `root`."""
    docs = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        table = f.read().split("\n## Documentation", 1)[-1].split("\n## ", 1)[0]
    listed = [d for d in dict.fromkeys(re.findall(r"\]\((docs/[\w-]+\.md)\)", table)) if d in docs]
    return ["README.md"] + listed + [d for d in docs if d not in listed]


def all_blocks(root: str = REPO) -> list[Block]:
    blocks = []
    for rel in doc_files(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            blocks.extend(parse_blocks(rel, f.read()))
    return blocks


# -- the rules, checked without a server --------------------------------------------------------------

def test_every_fence_names_a_language_and_shell_blocks_are_bash_or_python():
    problems = [f"{b.where()}: name the language (```text for output)" for b in all_blocks() if not b.language]
    problems += [f"{b.where()}: spell it ```bash or ```python, or it is never run" for b in all_blocks()
                 if b.language in MISSPELT]
    assert not problems, "\n".join(problems)


def test_no_run_blocks_only_hold_commands_this_machine_cannot_run():
    problems = []
    for block in all_blocks():
        if "no-run" not in block.flags:
            continue
        first = next((ln.strip() for ln in block.text.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
        if not first.startswith(NO_RUN_COMMANDS):
            problems.append(f"{block.where()} starts with {first!r}: only {', '.join(NO_RUN_COMMANDS)} may be no-run")
    assert not problems, "\n".join(problems)


def test_blocks_run_elsewhere_are_code_and_their_runner_exists():
    problems = [f"{b.where()}: ```{flag} blocks are run by {runner}, which does not exist"
                for b in all_blocks() for flag, runner in RUN_ELSEWHERE.items()
                if flag in b.flags and not os.path.exists(os.path.join(REPO, runner))]
    problems += [f"{b.where()}: only bash and python blocks can be run elsewhere" for b in all_blocks()
                 if set(RUN_ELSEWHERE) & set(b.flags) and not b.code]
    assert not problems, "\n".join(problems)


def test_runnable_blocks_are_complete_and_use_the_venv():
    problems = []
    for block in all_blocks():
        if not block.code:
            continue
        if "..." in block.text:
            problems.append(f"{block.where()}: `...` in a block that runs; write the whole command")
        if block.language == "bash":
            code = "\n".join(ln for ln in block.text.splitlines() if not ln.lstrip().startswith("#"))
            for match in BARE_INTERPRETER.finditer(code):
                problems.append(f"{block.where()}: `{match.group(1)}` -> spell it .venv/bin/{match.group(1)}")
    assert not problems, "\n".join(problems)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without its fenced blocks (a `# comment` in a block is no heading, `[a](b)` no link)."""
    return re.sub(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", "", text, flags=re.M | re.S)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = prose(text)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def test_relative_links_point_at_files_and_headings_that_exist():
    problems = []
    for rel in doc_files():
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            text = f.read()
        for target in LINK.findall(prose(text)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not os.path.exists(os.path.join(REPO, dest)):
                problems.append(f"{rel}: link to {target}: {dest} does not exist")
                continue
            if anchor and dest.endswith(".md"):
                with open(os.path.join(REPO, dest), encoding="utf-8") as f:
                    if anchor not in anchors(f.read()):
                        problems.append(f"{rel}: link to {target}: no heading #{anchor} in {dest}")
    assert not problems, "\n".join(problems)


def test_pages_stay_within_their_bounds():
    """README a front door (<= 10 KB), docs/ each fact once, linked from elsewhere (<= 90 KB in all)."""
    sizes = {rel: os.path.getsize(os.path.join(REPO, rel)) for rel in doc_files()}
    readme = sizes.pop("README.md")
    assert readme <= 10_000, f"README.md is {readme} bytes; at most 10 000: depth belongs in docs/"
    assert sum(sizes.values()) <= 90_000, f"docs/*.md are {sum(sizes.values())} bytes in all; at most 90 000: link, don't repeat"


def test_parser_finds_fences_their_language_and_indented_bodies():
    text = "intro\n```bash\necho 1\n```\n- item\n\n  ```python\n  print(2)\n  ```\n```text\n$ out\n```\n```bash no-run\nkubectl get pods\n```\n"
    blocks = parse_blocks("x.md", text)
    assert [(b.language, b.flags, b.text, b.line) for b in blocks] == [
        ("bash", (), "echo 1\n", 2), ("python", (), "print(2)\n", 7), ("text", (), "$ out\n", 10),
        ("bash", ("no-run",), "kubectl get pods\n", 13)]
    assert [b.runnable for b in blocks] == [True, True, False, False]
    assert BARE_INTERPRETER.search("cd x && python3 y.py") and BARE_INTERPRETER.search("pip install x")
    assert not BARE_INTERPRETER.search(".venv/bin/python -m pip install x")


# -- the run ------------------------------------------------------------------------------------------

# Between pages, each page gets the README's server back: if the page before restarted TorchServe
# or rotated its keys (key_file.json differs from the README's), the README's start is made again.
# So a page depends on the README alone, not on the pages before it, and pages can run (and be read)
# in any order.
README_SERVER = """
if [ -z "${DOCS_README_KEYS:-}" ]; then
  DOCS_README_KEYS=$(mktemp); cp key_file.json "$DOCS_README_KEYS"
elif ! cmp -s key_file.json "$DOCS_README_KEYS"; then
  .venv/bin/torchserve --stop --foreground > /dev/null 2>&1 || true
  rm -f key_file.json
  GOMP_SPINCOUNT=10000 .venv/bin/torchserve --start --ncs --ts-config config.properties --log-config log4j2.xml \\
    --model-store model_store --models encoder=encoder.mar > out/torchserve.out 2>&1
  source scripts/ready.sh encoder
  cp key_file.json "$DOCS_README_KEYS"
fi
"""

SESSION_PREAMBLE = """set -euo pipefail
# An HTTP error fails the command, unless it asks for the status itself (-w / --write-out).
curl() {
  local arg
  for arg in "$@"; do
    case "$arg" in -w|--write-out|--write-out=*) command curl "$@"; return;; esac
  done
  command curl --fail-with-body "$@"
}
"""


def session_script(blocks: list[Block], folder: str, ports: list[str]) -> str:
    """The one bash session: each block written to its own file and sourced after a marker line; before
    each page after the README, the README's server (README_SERVER)."""
    lines = [SESSION_PREAMBLE]
    for index, block in enumerate(blocks):
        if index and block.path != blocks[index - 1].path and blocks[0].path == "README.md":
            lines.append(f"source {os.path.join(folder, 'readme_server.sh')}")  # a page starts from the README's server
        text = rewrite_ports(block.text, ports)
        if block.language == "python":
            text = f".venv/bin/python - <<'__DOCS_PY__'\n{text}__DOCS_PY__\n"
        path = os.path.join(folder, f"{index:03d}.sh")
        with open(path, "w") as f:
            f.write(text)
        # the marker on its own line, even after curl's output; the seconds so far show slow blocks
        lines += [f"printf '\\n@@@ block {index}\\n'", f"echo \"[{block.path} block {block.number}, $SECONDS s]\"",
                  f"source {path}"]
    with open(os.path.join(folder, "readme_server.sh"), "w") as f:
        f.write(README_SERVER)
    lines.append("printf '\\n@@@ end\\n'")
    return "\n".join(lines) + "\n"


def stop_servers(scratch: str, env: dict) -> None:
    """`torchserve --stop` for every pid file the run left, each with its own TMPDIR."""
    pid_files = [os.path.join(folder, ".model_server.pid") for folder, _, files in os.walk(scratch)  # not into .venv
                 if ".model_server.pid" in files]
    for pid_file in pid_files + glob.glob(os.path.join(env["TMPDIR"], ".model_server.pid")):
        tmp = os.path.dirname(pid_file)
        subprocess.run([os.path.join(scratch, ".venv", "bin", "torchserve"), "--stop", "--foreground"], cwd=scratch,
                       env=dict(env, TMPDIR=tmp, TEMP=tmp), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)


def failure_report(blocks: list[Block], output: str, why: str, scratch: str) -> str:
    started = [int(n) for n in re.findall(r"^@@@ block (\d+)$", output, flags=re.M)]
    if not started:
        return f"{why} before the first block:\n{output[-4000:]}"
    block = blocks[started[-1]]
    tail = output.split(f"@@@ block {started[-1]}\n", 1)[-1]
    log = ""
    for rel in ("out/torchserve.out", "logs/model_log.log"):
        if os.path.exists(os.path.join(scratch, rel)):
            with open(os.path.join(scratch, rel), errors="replace") as f:
                log += f"\n--- {rel} (tail)\n" + "".join(f.readlines()[-30:])
    return (f"{block.where()} {why}\n--- the block\n{block.text}--- its output\n{tail[-6000:]}{log}")


def run_blocks(blocks: list[Block], folder: str, ports: list[str], scratch: str, timeout: float = RUN_TIMEOUT,
               lane: Optional[Lane] = None) -> tuple[str, Optional[str]]:
    """Run the blocks in one bash session in `scratch` (its TMPDIR and scripts under `folder`); returns the
    output and, if a block failed, the report naming it. `lane`: the background lane, which kills the
    session if the test session ends first."""
    tmp, script_dir = os.path.join(folder, "tmp"), os.path.join(folder, "blocks")
    for path in (tmp, script_dir):
        os.mkdir(path)
    script = session_script(blocks, script_dir, ports)
    env = dict(os.environ, TMPDIR=tmp, TEMP=tmp, PYTHONDONTWRITEBYTECODE="1")
    log_path = os.path.join(folder, "session.out")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", script], cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if lane:
            lane.track(proc)
        try:
            rc, why = proc.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, why = proc.wait(), f"did not finish within the whole run's {timeout} s"
        finally:
            if lane:
                lane.untrack(proc)
            stop_servers(scratch, env)
    with open(log_path, errors="replace") as f:
        output = f.read()
    if why is None and (rc != 0 or not output.rstrip().endswith("@@@ end")):
        why = f"failed with exit status {rc}"
    return output, None if why is None else failure_report(blocks, output, why, scratch)


def run_session(blocks: list[Block], tmp_path, ports: list[str], scratch: str, timeout: float = RUN_TIMEOUT) -> str:
    """run_blocks, failing the test with the report naming the block that failed."""
    output, failure = run_blocks(blocks, str(tmp_path), ports, scratch, timeout)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return output


def run_every_block(lane: Lane, folder: str) -> tuple[str, Optional[str], int, float]:
    """The docs run in a scratch copy of the tree: (output, failure report or None, blocks, seconds)."""
    blocks = [b for b in all_blocks() if b.runnable]
    scratch = os.path.join(folder, "repo")
    os.mkdir(scratch)
    ports = free_ports(5)
    scratch_copy(scratch, ports)
    started = time.time()
    output, failure = run_blocks(blocks, folder, ports, scratch, lane=lane)
    return output, failure, len(blocks), time.time() - started


DOCS_RUN = background.job("docs run", run_every_block)


def test_a_failing_block_is_reported_with_its_file_number_text_and_output(tmp_path):
    text = "```bash\nWHO=docs\n```\n```python\nprint('python ran')\n```\n```bash\necho \"hello $WHO\"\nfalse\necho never\n```\n"
    blocks = parse_blocks("docs/x.md", text)
    os.symlink(os.path.realpath(os.path.join(REPO, ".venv")), tmp_path / ".venv")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_session(blocks, tmp_path, free_ports(5), str(tmp_path), timeout=60)
    report = str(failure.value)
    assert report.startswith("docs/x.md block 3 (line 7, ```bash) failed with exit status 1"), report
    assert "echo never" in report and "hello docs" in report and "never\n" not in report.split("its output")[1]
    assert "python ran" in (tmp_path / "session.out").read_text()


@pytest.mark.server
@pytest.mark.background(DOCS_RUN.name)
def test_every_runnable_block_runs_in_order():
    """The whole docs run (started beside the suite, image_embedder_testkit.background): every block passes."""
    output, failure, count, seconds = DOCS_RUN.result()
    print(output)  # shown with -s: what every block printed
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    print(f"{count} blocks ran in {seconds:.0f} s")
