"""Run the README's ```bash blocks in order, as a new user would, and fail on a non-zero exit or a traceback.

Each line runs in bash from the repository root; exports, `. .venv/bin/activate` and `cd` carry over
to the next line (one shell state, as in one terminal). A line whose comment says "own terminal" runs
in the background for the rest of the check (a server, a worker, an event stream); when that comment
names an http://host:port address, the next line waits until it answers. A marker in the README just
before a block steers it:

    <!-- readme-check: skip REASON -->        the block is not run (GPU, cloud, hours of work); REASON is printed
    <!-- readme-check: set NAME=SHELL -->     NAME in the block's lines is replaced by SHELL's output (a run id)

`make demo` and `make test` lines are CI's own two steps (.ci/run runs them; a `make demo` line runs
only when demo-output/ is missing). At the end, flow runs that background workers started (a retrain
the publish triggered) are waited for, and every one must have completed.

Usage: python .ci/readme_blocks.py [README.md]
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import shutil
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*readme-check:\s*(skip|set)\s+(.*?)\s*-->")
TRACEBACK = "Traceback (most recent call last)"
# Tracebacks a background log may hold that the README documents rather than hides: Prefect's server on
# SQLite (the quick path of "Operations") logs these under concurrent writes; the README and
# infra/prefect/README.md say to switch to PostgreSQL for a served installation, and tests/test_deploy.py
# checks that a server on PostgreSQL logs no ERROR at all. They are counted and reported, not failed.
DOCUMENTED = {"prefect server start": "sqlite3.OperationalError: database is locked"}
LOGS = ROOT / "test-artifacts" / "readme-check"  # every line's output and each background log, kept for a look afterwards
LINE_TIMEOUT_S = 600
CI_STEPS = {"make demo", "make test"}


# Where a server the README starts says it is up, beside the address its comment names.
HEALTH = {"prefect server start": "/api/health"}


def blocks(readme: str) -> list[tuple[int, list[str], list[tuple[str, str]]]]:
    """(first line number, command lines, markers) of each ```bash block; backslash continuations joined."""
    out, lines, i = [], readme.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            markers = []
            j = i - 1
            while j >= 0 and (not lines[j].strip() or MARKER.search(lines[j])):
                if m := MARKER.search(lines[j]):
                    markers.insert(0, (m.group(1), m.group(2)))
                j -= 1
            body, start = [], i + 1
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            commands, pending = [], ""
            for line in body:
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                commands.append(pending + line)
                pending = ""
            out.append((start, commands, markers))
        i += 1
    return out


def command_and_comment(line: str) -> tuple[str, str]:
    """The command and its trailing comment (a `#` outside quotes, after whitespace)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].strip(), line[k + 1:].strip()
    return line.strip(), ""


class Shell:
    """One terminal's state (exported variables, working directory) carried from line to line."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.state = folder / "state.sh"
        self.state.write_text(f"cd {shlex.quote(str(ROOT))}\n")
        self.background: list[tuple[str, subprocess.Popen, Path]] = []
        self.groups: list[int] = []  # process groups of every line: a `cmd &` line's child lives in one

    def _script(self, command: str, keep_state: bool) -> str:
        save = (f'\n__rc=$?; export -p > {self.state}.new; echo "cd $(printf %q "$PWD")" >> {self.state}.new; '
                f'mv {self.state}.new {self.state}; exit $__rc') if keep_state else ""
        return f"source {self.state}\n{command}{save}"

    def run(self, command: str) -> tuple[int, str]:
        proc = subprocess.Popen(["bash", "-c", self._script(command, True)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.groups.append(proc.pid)
        try:
            output, _ = proc.communicate(timeout=LINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return 124, f"timed out after {LINE_TIMEOUT_S} s"
        return proc.returncode, output

    def start(self, command: str) -> Path:
        log = self.folder / f"background-{len(self.background)}.log"
        proc = subprocess.Popen(["bash", "-c", self._script(f"exec {command}", False)], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((command, proc, log))
        self.groups.append(proc.pid)
        return log

    def value(self, name: str) -> str | None:
        code, out = self.run(f'printf %s "${{{name}:-}}"')
        return (out or None) if code == 0 else None

    def stop(self) -> None:
        for pgid in reversed(self.groups):
            for sig in (signal.SIGINT, signal.SIGKILL):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                time.sleep(0.5 if sig == signal.SIGINT else 0)


def wait_http(url: str, timeout_s: float = 120) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return True
        except OSError:
            time.sleep(1)
    return False


def flow_runs(api: str) -> list[dict]:
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=json.dumps({"limit": 200}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def settle_flow_runs(api: str, timeout_s: float = 420) -> list[str]:
    """Wait until no flow run is pending or running; the problems: runs that did not complete."""
    deadline = time.time() + timeout_s
    while True:
        runs = flow_runs(api)
        busy = [r for r in runs if r["state_type"] in ("PENDING", "RUNNING", "CANCELLING")
                or (r["state_type"] == "SCHEDULED" and r["state_name"] != "Scheduled")]  # Late, AwaitingConcurrencySlot
        if not busy or time.time() > deadline:
            break
        time.sleep(3)
    ended: dict[str, int] = {}
    for r in runs:
        ended[r["state_name"]] = ended.get(r["state_name"], 0) + 1
    print(f"flow runs on the README's Prefect server: {dict(sorted(ended.items()))}", flush=True)
    problems = [f"flow run {r['name']} is {r['state_name']}" for r in busy]
    problems += [f"flow run {r['name']} ended {r['state_name']}" for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
    return problems


def tracebacks(text: str, documented: str | None) -> tuple[list[str], int]:
    """(the tracebacks in a log that are not the documented one, how many are), each with its log context."""
    starts = [m.start() for m in re.finditer(re.escape(TRACEBACK), text)]
    chunks = [text[max(0, a - 500):b] for a, b in zip(starts, starts[1:] + [len(text)])]
    known = [c for c in chunks if documented and documented in c[:20000]]
    return [c for c in chunks if c not in known], len(known)


def main(readme_path: Path) -> int:
    failures: list[str] = []
    started = time.time()
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    shell = Shell(LOGS)
    wait_for: str | None = None
    try:
        for start, commands, markers in blocks(readme_path.read_text()):
            skip = [reason for kind, reason in markers if kind == "skip"]
            if skip:
                print(f"README:{start}: skipped ({skip[0]})", flush=True)
                continue
            placeholders = dict(spec.split("=", 1) for kind, spec in markers if kind == "set")
            for number, line in enumerate(commands, start):
                command, comment = command_and_comment(line)
                if not command:
                    continue
                for name, expression in placeholders.items():  # evaluated when used: the line before may make it
                    if re.search(rf"\b{re.escape(name)}\b", command):
                        value = shell.run(f"printf %s {expression}")[1].strip()
                        command = re.sub(rf"\b{re.escape(name)}\b", value, command)
                if wait_for:
                    if not wait_http(wait_for):
                        failures.append(f"README:{number}: {wait_for} never answered")
                    wait_for = None
                if command in CI_STEPS and not (command == "make demo" and not (ROOT / "demo-output" / "dataset").exists()):
                    print(f"README:{number}: {command} (CI's own step, already run)", flush=True)
                    continue
                if comment.startswith("own terminal"):
                    log = shell.start(command)
                    print(f"README:{number}: {command} (in the background, log {log.name})", flush=True)
                    if m := re.search(r"http://[\w.:-]+", comment):
                        wait_for = m.group(0) + HEALTH.get(command.split(" --")[0], "")
                    continue
                t0 = time.time()
                code, output = shell.run(command)
                (LOGS / f"line-{number:04d}.log").write_text(f"$ {command}\n{output}")
                print(f"README:{number}: {command} -> exit {code} in {time.time() - t0:.0f} s", flush=True)
                if code != 0 or TRACEBACK in output:
                    print(output[-6000:], flush=True)
                    failures.append(f"README:{number}: {command}: " + (f"exit {code}" if code else "printed a traceback"))
        api = shell.value("PREFECT_API_URL")
        if api and any("worker" in c for c, _, _ in shell.background):
            for problem in settle_flow_runs(api):
                failures.append(f"after the README: {problem}")
    finally:
        shell.stop()
        for command, _, log in shell.background:
            unexplained, documented = tracebacks(log.read_text(errors="replace"), DOCUMENTED.get(command))
            if documented:
                print(f"{command}: {documented} traceback(s) of {DOCUMENTED[command]!r} in {log} (documented: see DOCUMENTED)", flush=True)
            if unexplained:
                print(f"--- {command}: a traceback in {log}\n{unexplained[0][:6000]}", flush=True)
                failures.append(f"background `{command}` logged {len(unexplained)} traceback(s)")
    print(f"README check: {len(failures)} failure(s) in {time.time() - started:.0f} s", flush=True)
    for f in failures:
        print("  " + f, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md"))
