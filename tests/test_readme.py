"""What the repository tells a reader holds on their machine: the README's opening commands
run as pasted, and no file points at a path of one developer's machine.

The first code block is the install-and-run command: a line of `export`s the reader fills in,
then `python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/parley run`. Each test
takes that block from README.md and runs it in `bash` against the fake Telegram and LLM on
127.0.0.1. Only the install steps are not run (they need a network and a minute): the test
checks they are still exactly the ones this test knows, and stands the test's own virtualenv,
where parley is installed, in for the `.venv` they create. The second block must be what
`.ci/run` runs.

References to material outside the repository (the shared reference notes the fakes follow)
are relative to the repository, `../shared/reference/...`: an absolute path is true on one
machine only.
"""

from __future__ import annotations

import re
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.telegram import FakeTelegram
from tests.support.process import REPO, ParleyProcess, child_env

README = REPO / "README.md"
# The install steps of the first command. Changing them in the README fails here on purpose:
# try the new steps on a machine with nothing but Python, then update this list.
INSTALL_STEPS = ["python3 -m venv .venv", ".venv/bin/pip install ."]
# What the reader is told to fill in, and the stand-in each gets here.
READER_VALUES = ("TELEGRAM_BOT_TOKEN", "OPENAI_API_KEY", "PARLEY_ACCESS__OWNERS")
OWNER_ID = 4242
STRANGER_ID = 5151


def code_blocks(text: str) -> list[str]:
    """The contents of every ```sh block, in order."""
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)]


@dataclass
class FirstCommand:
    """The README's install-and-run block, taken apart."""

    exports: dict[str, str]  # what the `export` line sets, verbatim
    install: list[str]  # the `&&` steps before parley starts
    run: list[str]  # the rest: starting parley

    @classmethod
    def from_readme(cls) -> FirstCommand:
        block = code_blocks(README.read_text(encoding="utf-8"))[0]
        lines = [line for line in block.splitlines() if line.strip()]
        exports: dict[str, str] = {}
        commands = []
        for line in lines:
            words = shlex.split(line)
            if words[0] == "export":
                for word in words[1:]:
                    name, sep, value = word.partition("=")
                    assert sep, f"README export without a value: {word!r}"
                    exports[name] = value
            else:
                commands.append(line)
        assert len(commands) == 1, f"the README's first block should be one command after the exports: {lines}"
        steps = [step.strip() for step in commands[0].split("&&")]
        starts = [i for i, step in enumerate(steps) if "bin/parley" in step]
        assert starts, f"the README's first command never starts parley: {commands[0]!r}"
        return cls(exports, steps[: starts[0]], steps[starts[0] :])

    def script(self, values: dict[str, str]) -> str:
        """The block as bash runs it: the export line with `values` filled in, then the run steps."""
        exports = " ".join(f"{name}={shlex.quote(values.get(name, value))}" for name, value in self.exports.items())
        return (f"export {exports}\n" if exports else "") + " && ".join(self.run) + "\n"


def environment(telegram: FakeTelegram, llm: FakeLLM) -> dict[str, str]:
    """A clean environment (no PARLEY_* or tokens of the developer's) that points parley at the fakes.

    These two variables are the test's plumbing, not something the README asks for.
    """
    return child_env({"PARLEY_TELEGRAM__API_BASE": telegram.url, "PARLEY_PROVIDER__BASE_URL": llm.base_url})


def sandbox(tmp_path: Path) -> Path:
    """A fresh directory whose `.venv` is the virtualenv running these tests (parley installed)."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "parley").exists(), f"no parley in {venv}: run the tests from a venv with `pip install -e .`"
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    return tmp_path


def parley_under(shell_pid: int) -> psutil.Process:
    """The `parley run` process bash started (bash itself, if it exec'd the last command)."""
    shell = psutil.Process(shell_pid)
    for proc in [shell, *shell.children(recursive=True)]:
        cmdline = proc.cmdline()
        if any(part.endswith("/parley") for part in cmdline) and "run" in cmdline:
            return proc
    raise AssertionError(f"no `parley run` under bash: {[p.cmdline() for p in shell.children(recursive=True)]}")


# --------------------------------------------------------------------------- the commands


def test_the_install_steps_are_the_ones_this_test_knows_and_parley_runs_from_the_venv() -> None:
    first = FirstCommand.from_readme()
    assert first.install == INSTALL_STEPS
    assert first.run == [".venv/bin/parley run"]
    assert sorted(first.exports) == sorted(READER_VALUES), "a new value for the reader needs a stand-in here"


def test_the_test_command_is_what_ci_runs() -> None:
    block = code_blocks(README.read_text(encoding="utf-8"))[1]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert block.strip().splitlines() == ci


async def test_pasted_verbatim_the_shell_accepts_it_and_parley_names_the_placeholder(
    tmp_path: Path, fast_telegram: FakeTelegram, fake_llm: FakeLLM
) -> None:
    """`<your-user-id>` used to be a shell redirection: `bash: your-user-id: No such file or directory`."""
    first = FirstCommand.from_readme()
    async with await ParleyProcess.start(
        [], cwd=sandbox(tmp_path), env=environment(fast_telegram, fake_llm),
        program=["bash", "-c", first.script({})],
    ) as proc:
        code = await proc.wait_exit(60)
    output = "\n".join(proc.lines)
    assert not [line for line in proc.stderr if line.startswith("bash")], output
    assert code == 2, output  # invalid configuration: nothing was contacted
    assert "parley: invalid configuration:" in proc.stderr, output
    owners = next(line for line in proc.stderr if "access.owners" in line)
    assert "to find yours, message the bot: it answers anyone without access with their id" in owners
    assert fast_telegram.calls == [] and fake_llm.requests == []


async def test_with_the_readers_values_it_runs_answers_the_owner_and_tells_a_stranger_their_id(
    tmp_path: Path, fast_telegram: FakeTelegram, fake_llm: FakeLLM
) -> None:
    first = FirstCommand.from_readme()
    values = {
        "TELEGRAM_BOT_TOKEN": fast_telegram.token,
        "OPENAI_API_KEY": fake_llm.api_key,
        "PARLEY_ACCESS__OWNERS": f"telegram:{OWNER_ID}",
    }
    async with await ParleyProcess.start(
        [], cwd=sandbox(tmp_path), env=environment(fast_telegram, fake_llm),
        program=["bash", "-c", first.script(values)],
    ) as proc:
        await proc.wait_for_line("parley is running", timeout=60)

        # What the README promises a stranger (and an owner who does not know their id yet).
        stranger = fast_telegram.user(STRANGER_ID, "Stranger")
        lobby = fast_telegram.private_chat(stranger)
        fast_telegram.user_says(lobby, stranger, "hello?")
        await fast_telegram.wait_for(lambda: len(fast_telegram.bot_texts(lobby.id)) == 1, timeout=20)
        (denial,) = fast_telegram.bot_texts(lobby.id)
        assert denial == (
            "🔒 You don't have access to this bot yet. "
            f"Ask its owner or an admin to run /allow telegram:{STRANGER_ID}"
        )
        await proc.wait_for_line(f"message from telegram:{STRANGER_ID} without access")
        readme = " ".join(README.read_text(encoding="utf-8").split())
        assert denial.replace(str(STRANGER_ID), "123456789") in readme  # quoted there word for word
        assert "message from telegram:123456789 without access" in readme

        owner = fast_telegram.user(OWNER_ID, "Owner")
        chat = fast_telegram.private_chat(owner)
        fake_llm.script(Reply.text("Hello from the README.", chunk=4))
        fast_telegram.user_says(chat, owner, "hi")
        await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Hello from the README."], timeout=20)

        parley_under(proc.proc.pid).send_signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.describe()
    assert not [line for line in proc.lines if line.startswith("bash") or "Traceback" in line], proc.describe()
    assert (tmp_path / "data" / "parley.db").exists()  # the default store, in the working directory


async def test_an_owner_who_does_not_know_their_id_learns_it_as_the_readme_says(
    tmp_path: Path, fast_telegram: FakeTelegram, fake_llm: FakeLLM
) -> None:
    """"Leave the owner out (`export PARLEY_ACCESS__OWNERS=`), start parley and send your bot a message"."""
    values = {"TELEGRAM_BOT_TOKEN": fast_telegram.token, "OPENAI_API_KEY": fake_llm.api_key,
              "PARLEY_ACCESS__OWNERS": ""}
    async with await ParleyProcess.start(
        [], cwd=sandbox(tmp_path), env=environment(fast_telegram, fake_llm),
        program=["bash", "-c", FirstCommand.from_readme().script(values)],
    ) as proc:
        await proc.wait_for_line("access.owners is empty", timeout=60)
        me = fast_telegram.user(OWNER_ID, "Me")
        chat = fast_telegram.private_chat(me)
        fast_telegram.user_says(chat, me, "who am I?")
        await fast_telegram.wait_for(lambda: len(fast_telegram.bot_texts(chat.id)) == 1, timeout=20)
        assert fast_telegram.bot_texts(chat.id)[0].endswith(f"/allow telegram:{OWNER_ID}")
        parley_under(proc.proc.pid).send_signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.describe()
    assert fake_llm.requests == []  # nothing reached the model


# --------------------------------------------------------------------------- paths


# A home or workspace directory: true on one machine only. (Written so this file does not match.)
_MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home/[^/\s]+|Users/[^/\s]+)/")
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".txt", ".service", ".sh", ".json"}


def _repository_text_files() -> list[Path]:
    skip = {"__pycache__", "data", "build", "dist"}
    files = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p in skip or p.endswith(".egg-info") or (p.startswith(".") and p not in (".ci", ".env.example"))
               for p in parts):
            continue
        if path.is_file() and (path.suffix in _TEXT_SUFFIXES or path.name in ("Dockerfile", ".env.example", "run")):
            files.append(path)
    return files


def test_no_file_names_an_absolute_path_of_one_machine() -> None:
    files = _repository_text_files()
    assert REPO / "tests" / "fakes" / "telegram.py" in files and REPO / ".ci" / "run" in files
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if _MACHINE_PATH.search(line)
    ]
    assert found == [], "refer to ../shared/reference/ (relative to the repository) instead:\n" + "\n".join(found)
