"""The README and docs/ are a contract: every command in them is run or checked here.

The commands are READ from README.md and docs/*.md (never restated here), so editing a page or the
CLI without the other fails this test. Only fenced ```bash (or sh/shell/console/zsh) blocks hold
commands. Which rule covers a block is said by a marker, an HTML comment (invisible on the rendered
page) on the last non-blank line before the block's opening fence:

* ``<!-- check: run -->``: RUN. Every command runs in order (README first, then docs/ pages in
  name order), in a scratch copy of the checkout: world -> caption -> pretrain -> eval -> cam ->
  explore; each server command (`alip serve`, `serve run`) is started, must answer /healthz and a
  text embedding, and is stopped. No Ray noise (NOISE) may reach their console. (slow)
* ``<!-- check: local-cluster -->``: exactly one block, RUN AS ONE SHELL SCRIPT: `ray start --head`
  on its own ports, the token steps, `ray job submit` of caption.py, pretrain.py and evaluate.py,
  with a fresh HOME so the token really is created by the block's step; then a client WITHOUT
  RAY_AUTH_MODE=token is shown to be refused, as docs/cluster.md says. (slow)
* ``<!-- check: parse -->``: too expensive or impossible to run here (a real `ray up` cluster and
  S3, benchmarks of minutes to an hour, `make demo` / `make test` / `make bench`, the GPU machine's
  command). The block must pass `bash -n`, and EACH command is checked, without running it, by
  the first rule below that matches (leading `NAME=value` assignments are set aside first):
    - `make T...`: every target T exists (`make -n T` in the checkout exits 0);
    - `export NAME=value ...`: only assignments (the shell's syntax check covers them);
    - `[.venv/bin/]alip SUB args`: `alip.cli` runs until its first `parse_args` returns, then stops;
      the arguments must parse (SystemExit(2) on an unknown flag), `--help` must exit 0;
    - `[.venv/bin/]python[3] SCRIPT.py args` (bench/, ray_jobs/, scripts/): the script's `--help`
      exits 0 with a usage line, and `args` must be accepted by its argparse the same way (the
      script is stopped as soon as its parser returns: nothing is measured or trained);
    - `[.venv/bin/]ray SUB... args`: Ray's own click parser accepts the subcommand and its
      options; for `ray job submit ... -- ENTRYPOINT`, the entrypoint is checked by these rules too;
    - `[.venv/bin/]serve SUB args`: Ray Serve's click parser, the same way.
  A command no rule matches (pipes, `&&`, `for`, `source`, another program) FAILS the test: run it
  in a `run` block, or give it a rule here.
A bash block without a marker, or with an unknown one, FAILS the test.

Only processes this test started are stopped: each shell runs in its own session, and at the end
every process of that session is killed (never `ray stop`, which would stop every Ray here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SERVER_COMMANDS = (re.compile(r"(^|\s|/)alip serve\b"), re.compile(r"(^|\s|/)serve run\b"))
SERVE_URL = "http://127.0.0.1:8000"
# Ray's known-harmless noise that alip.ray_setup silences (item 7 of issue 15): none may reach the
# console of a README command. Real warnings are not in this list.
NOISE = ("Failed to query Ray Train Controller actor state", "PreemptionWatcher poll failed",
         "Exception in thread PlacementGroupCleanerMonitor", "Token authentication is enabled for this Ray cluster",
         "logging_progress.py", "Starting execution of Dataset", "Found multiple active Ray instances")
KINDS = ("run", "local-cluster", "parse")
SHELL_LANGS = ("bash", "sh", "shell", "console", "zsh")
MARKER = re.compile(r"^<!--\s*check:\s*(\S+)\s*-->$")


# ------------------------------------------------------------------------------ reading the pages

@dataclass(frozen=True)
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    kind: str | None   # the marker's rule; None when the block has no marker
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md first, then docs/*.md in name order: the order `run` blocks run in."""
    return [README] + sorted(DOCS.glob("*.md"))


def shell_blocks(page: Path) -> list[Block]:
    """The page's shell code blocks, each with the rule its marker names."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in SHELL_LANGS:
            continue
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        out.append(Block(page, start + 1, marker.group(1) if marker else None, "\n".join(body) + "\n"))
    return out


def all_blocks() -> list[Block]:
    return [b for p in pages() for b in shell_blocks(p)]


def commands(block: str) -> list[str]:
    """Shell commands of a block: backslash continuations joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def readme_commands() -> list[str]:
    """The commands of every `run` block, in order (the README's pipeline first)."""
    return [c for b in all_blocks() if b.kind == "run" for c in commands(b.text)]


def cluster_blocks() -> tuple[list[str], list[str]]:
    """(the `ray job submit` commands of `parse` blocks: a real cluster's, never run here;
    the commands of the one `local-cluster` block)."""
    blocks = all_blocks()
    local = [b for b in blocks if b.kind == "local-cluster"]
    assert len(local) == 1, f"exactly one `<!-- check: local-cluster -->` block, found {[b.where for b in local]}"
    remote = [c for b in blocks if b.kind == "parse" for c in commands(b.text)
              if _words(c)[:3] == ["ray", "job", "submit"]]
    return remote, commands(local[0].text)


def _words(command: str) -> list[str]:
    """The command's words, `NAME=value` assignments in front set aside, `.venv/bin/` dropped."""
    words = shlex.split(command, comments=True)
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words = words[1:]
    if words and words[0].startswith(".venv/bin/"):
        words = [words[0][len(".venv/bin/"):]] + words[1:]
    return words


def _python_args(command: str, script: str) -> list[str] | None:
    """The arguments after `python ray_jobs/<script>` of a `ray job submit` command."""
    words = _words(command)
    if words[:3] != ["ray", "job", "submit"] or "--" not in words:
        return None
    entry = words[words.index("--") + 1:]
    return entry[2:] if entry[:2] == ["python", f"ray_jobs/{script}"] else None


# ------------------------------------------------------------------------------ the `parse` rule

PYTHONS = ("python", "python3", "python3.11")
OPERATOR = re.compile(r"^[();<>|&]+$")


def parse_checks(command: str) -> list[tuple] | None:
    """How a `parse` block's command is checked without running it: a list of
    ("make", target) | ("export",) | (how, target, argv, expect) with how in script/module/click and
    expect "parsed" or "exit 0"; None when no rule covers the command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    if any(OPERATOR.match(tok) for tok in lexer):
        return None  # pipes, &&, ;, redirections: not a single parseable command
    words = _words(command)
    if not words:
        return None
    prog, args = words[0], tuple(words[1:])
    expect = "exit 0" if ("--help" in args or "-h" in args) else "parsed"
    if prog == "make":
        return [("make", t) for t in args] if args and not any(t.startswith("-") for t in args) else None
    if prog == "export":
        return [("export",)] if args and all(re.match(r"^[A-Za-z_]\w*=", a) for a in args) else None
    if prog == "alip":
        return [("module", "alip.cli", args, expect)] if args else None
    if prog in PYTHONS:
        if len(args) >= 2 and args[0] == "-m":
            return [("module", args[1], args[2:], expect)]
        if args and args[0].endswith(".py") and (ROOT / args[0]).is_file():
            return [("script", args[0], ("--help",), "exit 0"), ("script", args[0], args[1:], expect)]
        return None
    if prog == "ray":
        if args[:2] != ("job", "submit") or "--" not in args:
            return [("click", "ray.scripts.scripts:cli", args, expect)]
        head, entry = args[:args.index("--")], args[args.index("--") + 1:]
        sub = parse_checks(shlex.join(entry)) if entry else None
        if sub is None:
            return None  # an entrypoint no rule covers
        return [("click", "ray.scripts.scripts:cli", args, "exit 0" if "--help" in head else "parsed")] + sub
    if prog == "serve":
        return [("click", "ray.serve.scripts:cli", args, expect)]
    return None


# Runs in a child process: each check runs the program only until its argument parser returns.
PARSE_HARNESS = r"""
import argparse, contextlib, importlib, io, json, runpy, sys

class Parsed(BaseException):
    pass

_parse_args = argparse.ArgumentParser.parse_args

def parse_args(self, args=None, namespace=None):
    raise Parsed(_parse_args(self, args, namespace))

argparse.ArgumentParser.parse_args = parse_args

def click_parse(group, argv):
    import click
    ctx = group.make_context(group.name or "cli", list(argv))
    while isinstance(ctx.command, click.Group):
        name, cmd, rest = ctx.command.resolve_command(ctx, ctx.protected_args + ctx.args)
        ctx = cmd.make_context(name, rest, parent=ctx)

results = []
for how, target, argv in json.load(sys.stdin):
    out, status = io.StringIO(), "ran to the end without parsing its arguments"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            sys.argv = [target, *argv]
            if how == "script":
                runpy.run_path(target, run_name="__main__")
            elif how == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                module, attr = target.split(":")
                click_parse(getattr(importlib.import_module(module), attr), argv)
                status = "parsed"
    except Parsed:
        status = "parsed"
    except SystemExit as e:
        status = f"exit {0 if e.code is None else e.code}"
    except Exception as e:
        code = getattr(e, "exit_code", None)  # click's Exit(0) on --help; UsageError is 2
        status = f"exit {code}" if code is not None else f"error {type(e).__name__}: {e}"
    text = out.getvalue()
    results.append({"status": status, "output": text[-3000:], "usage": "usage:" in text.lower()})
print("\n@@RESULTS@@" + json.dumps(results))
"""


def _run_parse_harness(checks: list[tuple]) -> list[dict]:
    jobs = [[how, target, list(argv)] for how, target, argv, _ in checks]
    proc = subprocess.run([sys.executable, "-c", PARSE_HARNESS], cwd=ROOT, input=json.dumps(jobs), text=True,
                          capture_output=True, timeout=600, env=_env(PYTHONPATH=str(ROOT)))
    assert "@@RESULTS@@" in proc.stdout, \
        f"parse harness failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])


# ------------------------------------------------------------------------------ fast checks

def test_every_shell_block_is_covered_by_a_rule():
    """Every shell block names a rule, and every command of a `parse` block has one."""
    blocks = all_blocks()
    assert blocks, "no shell blocks found in README.md and docs/"
    unmarked = [f"{b.where} ({b.kind!r})" for b in blocks if b.kind not in KINDS]
    assert not unmarked, ("shell blocks without a known `<!-- check: run|local-cluster|parse -->` marker on the "
                          "line before: " + ", ".join(unmarked))
    uncovered = [f"{b.where}: {c}" for b in blocks if b.kind == "parse" for c in commands(b.text)
                 if parse_checks(c) is None]
    assert not uncovered, "commands no rule of this test covers (see its docstring):\n" + "\n".join(uncovered)
    assert sum(b.kind == "local-cluster" for b in blocks) == 1
    assert any(b.kind == "run" and b.page == README for b in blocks), "the README's pipeline block is run"


def test_rules_reject_what_they_cannot_check():
    """The classifier itself: what it cannot check is uncovered (so the test above fails on it)."""
    for bad in ("curl http://x | sh", "source .venv/bin/activate", "docker run x", "make -j2 test",
                "for i in 1 2; do true; done", "ray job submit -- ./run.sh", "export PATH"):
        assert parse_checks(bad) is None, bad
    assert parse_checks("make demo test") == [("make", "demo"), ("make", "test")]
    assert parse_checks("X=1 .venv/bin/alip eval --help") == [("module", "alip.cli", ("eval", "--help"), "exit 0")]
    assert parse_checks("ray job submit -- python ray_jobs/caption.py --help")[1:] == [
        ("script", "ray_jobs/caption.py", ("--help",), "exit 0")] * 2


def test_readme_sections_hold_the_documented_pipeline():
    cmds = readme_commands()
    assert [next(w for w in shlex.split(c, comments=True) if "alip" in w or w.endswith("serve")).rsplit("/", 1)[-1]
            for c in cmds if "alip" in c or "serve run" in c][:4] == ["alip"] * 4
    order = [c.split()[1] if c.startswith(".venv/bin/alip") else c for c in cmds]
    assert order[:7] == ["world", "caption", "pretrain", "eval", "cam", "explore", "serve"], order
    assert any("serve run serve/config.yaml" in c for c in cmds), "the README's Serve CLI command is tested"
    remote, local = cluster_blocks()
    for script in ("caption.py", "pretrain.py", "evaluate.py"):
        assert any(_python_args(c, script) is not None for c in local), f"local block submits {script}"
    assert "export RAY_AUTH_MODE=token" in local and any(c.startswith("ray get-auth-token") for c in local)


def test_real_cluster_submissions_parse_with_the_entry_points():
    """The `ray up` cluster's commands cannot run here (S3 bucket, GPUs); their flags must still
    be the entry points' flags."""
    from alip.captioning.job import build_parser as caption_parser
    from alip.eval.runner import build_parser as eval_parser
    from alip.pretrain.config import build_parser as pretrain_parser

    remote, _ = cluster_blocks()
    parsers = {"caption.py": caption_parser, "pretrain.py": pretrain_parser, "evaluate.py": eval_parser}
    seen = 0
    for command in remote:
        for script, parser in parsers.items():
            args = _python_args(command, script)
            if args is None or "--help" in args:
                continue
            parser().parse_args(args)  # SystemExit(2) on an unknown or malformed flag
            seen += 1
    assert seen >= 1, "the pages show at least one real cluster job submission"


def test_parse_blocks_are_accepted_by_their_programs_parsers():
    """Every `parse` block passes `bash -n`, and each of its commands is accepted by its program's
    own parser (make targets, alip's CLI, the scripts' argparse, Ray's and Serve's click CLIs)."""
    blocks = [b for b in all_blocks() if b.kind == "parse"]
    failures, harness = [], []
    for b in blocks:
        syntax = subprocess.run(["bash", "-n"], input=b.text, text=True, capture_output=True)
        if syntax.returncode:
            failures.append(f"{b.where}: bash -n: {syntax.stderr.strip()}")
        for c in commands(b.text):
            for check in parse_checks(c) or []:
                if check[0] == "make":
                    r = subprocess.run(["make", "-n", check[1]], cwd=ROOT, capture_output=True, text=True)
                    if r.returncode:
                        failures.append(f"{b.where}: {c}: no make target {check[1]!r}: {r.stderr.strip()}")
                elif check[0] != "export":
                    harness.append((b, c, check))
    unique = list(dict.fromkeys(check for _, _, check in harness))
    results = dict(zip(unique, _run_parse_harness(unique))) if unique else {}
    for b, c, check in harness:
        got = results[check]
        ok = got["status"] == check[3] and (check[3] != "exit 0" or check[0] == "click" or got["usage"])
        if not ok:
            failures.append(f"{b.where}: {c}\n  {check[0]} {check[1]} {' '.join(check[2])}: expected {check[3]}, "
                            f"got {got['status']}\n{got['output'][-1500:]}")
    assert not failures, "\n".join(failures)
    assert any(check[1] == "bench/bench_learning.py" for _, _, check in harness), "the benchmark commands are checked"


# ------------------------------------------------------------------------------ running them

def _scratch_checkout(dest: Path) -> Path:
    """The checkout's files (tracked + untracked, not ignored) and a .venv that points at ours."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # A real .venv folder (so .gitignore keeps it out of `ray job submit --working-dir .`) whose
    # entries link to the project's venv.
    (dest / ".venv").mkdir()
    for entry in (ROOT / ".venv").iterdir():
        if entry.name in ("bin", "lib", "lib64", "include", "pyvenv.cfg", "share"):
            (dest / ".venv" / entry.name).symlink_to(entry)
    return dest


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTEST_CURRENT_TEST"}
    env.update(extra)
    return env


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != sid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
            if state != "Z":
                pids.append(int(entry))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """Stop every process of the shell's session (ours alone: start_new_session made the shell
    its leader; Ray's daemons started from it stay in it): SIGINT, then SIGTERM, then SIGKILL."""
    sid = proc.pid
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        alive = _session_members(sid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _session_members(sid):
            proc.poll()  # reap the shell itself
            time.sleep(0.5)


def _run(command: str, cwd: Path, env: dict, timeout: float) -> str:
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"README command timed out after {timeout}s: {command}\n{out[-4000:]}")
    finally:
        _kill_session(proc)
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{out[-6000:]}"
    return out


def _get_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _serve_and_query(command: str, cwd: Path, env: dict, timeout: float = 240) -> dict:
    """Start a server command, wait for /healthz, embed a text, stop it; returns what it answered."""
    assert _port_free(8000), "port 8000 is taken: another server runs on this machine"
    log = cwd / f"serve-{int(time.time() * 1000)}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        health = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command} exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            try:
                health = _get_json(SERVE_URL + "/healthz", timeout=5)
                break
            except OSError:
                time.sleep(2)
        assert health is not None, f"{command}: no /healthz within {timeout}s\n{log.read_text()[-4000:]}"
        emb = _get_json(SERVE_URL + "/v1/embeddings/text", {"texts": ["a red circle", "a blue star"]})
        return {"health": health, "embeddings": emb["embeddings"], "log": log.read_text()}
    finally:
        _kill_session(proc)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return _scratch_checkout(tmp_path_factory.mktemp("readme"))


@pytest.mark.slow
def test_readme_commands_run_as_written(workspace):
    from alip.data.dataset import read_dataset

    env = _env()
    consoles = {}
    servers = []
    for command in readme_commands():
        if any(p.search(command) for p in SERVER_COMMANDS):
            servers.append((command, _serve_and_query(command, workspace, env)))
        else:
            consoles[command] = _run(command, workspace, env, timeout=600)

    # what each stage left behind
    world = json.loads((workspace / "data/world/_world.json").read_text())
    captioned = read_dataset(str(workspace / "data/world-captioned"))
    assert captioned.num_rows == world["n"] and all(captioned.column("caption").to_pylist())
    export = workspace / "runs/my-run/export"
    assert (export / "open_clip_config.json").is_file() and (export / "open_clip_model.safetensors").is_file()
    results = json.loads((workspace / "runs/eval/results.json").read_text())
    zeroshot = next(iter(results["models"].values()))["results"]["zeroshot"]
    assert set(zeroshot) >= {"world-shape", "world-colour"} and all(0 <= r["top1"] <= 1 for r in zeroshot.values())
    assert len(servers) >= 2, "both the alip serve and the serve run command were started"
    for command, answer in servers:
        assert answer["health"]["status"] == "ok", (command, answer["health"])
        vectors = answer["embeddings"]
        assert len(vectors) == 2 and len(vectors[0]) == 64  # alip-tiny's embedding width
        assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-3  # unit-normalised

    # a clean console (issue 15 item 7): our progress lines, none of Ray's known-harmless noise
    console = "\n".join(consoles.values())
    assert "[ray] starting a private local Ray" in console and "[pretrain]" in console and "[caption]" in console
    noisy = [line for line in console.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "Ray noise on the console of the README commands:\n" + "\n".join(noisy[:20])


@pytest.mark.slow
def test_cluster_block_submits_the_jobs_to_a_local_ray_start(workspace, tmp_path):
    from alip.data.dataset import read_dataset

    _, local = cluster_blocks()
    ports = sorted({int(p) for c in local if c.startswith("ray start") for p in re.findall(r"port[= ](\d+)", c)})
    temp_dirs = [m for c in local if c.startswith("ray start") for m in re.findall(r"--temp-dir[= ](\S+)", c)]
    assert ports, "the README's ray start names its ports"
    busy = [p for p in ports if not _port_free(p)]
    assert not busy, f"ports {busy} of the README's `ray start` are taken by another process on this machine"
    if not (workspace / "data/world/_world.json").is_file():  # this test alone: the Commands' world first
        _run(readme_commands()[0], workspace, _env(), timeout=300)

    home = tmp_path / "home"  # a fresh HOME: the README's own step must create the token
    home.mkdir()
    script = "set -ex -o pipefail\n" + "\n".join(local) + "\n" + \
        "env -u RAY_AUTH_MODE ray job list > refused.log 2>&1 && exit 42 || true\n"
    env = _env(HOME=str(home))
    try:
        out = _run(script, workspace, env, timeout=900)
    finally:
        for d in temp_dirs:  # the README's own Ray temp dir: logs and sockets of the stopped Ray
            shutil.rmtree(d, ignore_errors=True)
    assert (home / ".ray" / "auth_token").is_file()

    captioned = read_dataset(str(workspace / "data/world-captioned-job"))
    world = json.loads((workspace / "data/world/_world.json").read_text())
    assert captioned.num_rows == world["n"]
    assert (workspace / "runs/job-run/export/open_clip_config.json").is_file()
    results = json.loads((workspace / "runs/eval-job/results.json").read_text())
    assert "world-shape" in next(iter(results["models"].values()))["results"]["zeroshot"]
    # each job attached to the cluster it was submitted to (its GCS port), and said so
    gcs_port = next(int(p) for c in local if c.startswith("ray start") for p in re.findall(r"--port[= ](\d+)", c))
    attached = re.findall(r"\[ray\] attached to the Ray cluster at \S+:(\d+)", out)
    assert len(attached) == 3 and set(attached) == {str(gcs_port)}, out[-3000:]
    assert out.count("succeeded") >= 3, out[-3000:]
    # and the README's warning holds: without RAY_AUTH_MODE=token the client is refused
    refused = (workspace / "refused.log").read_text()
    assert "Missing authentication token" in refused or "401" in refused, refused[-2000:]
