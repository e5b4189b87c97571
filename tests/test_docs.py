"""The docs stay true where a machine can tell: the `lap` commands and options they show exist, the settings
they name exist, and the files they point to are in the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lap.cli import main
from lap.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")])
SECTIONS = {name: field.annotation for name, field in Settings.model_fields.items()
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")}


# `section.name` spans that are not settings: Ray's functions
NOT_SETTINGS = {("ray", name) for name in ("init", "get", "put", "remote", "shutdown", "kill", "get_actor", "wait")}


def text_of(path: Path) -> str:
    return path.read_text()


def lap_invocations(text: str) -> list[list[str]]:
    """Each `lap ...` command the text shows (in code spans and blocks), as words, up to a pipe or a quote."""
    found = []
    for code in re.findall(r"```.*?```|`[^`\n]+`", text, flags=re.S):
        code = code.strip("`")
        for match in re.finditer(r"(?:^|[\s'\"(/])(?:\.venv/bin/)?lap ((?:[^\s`'\"|;&)]+ ?)+)", code, flags=re.M):
            words = match[1].split()
            if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                found.append(words)
    return found


def command_for(words: list[str]):
    """The click command the words name, and the words left after it."""
    command = main
    rest = list(words)
    while rest and hasattr(command, "commands") and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_lap_command_and_option_shown_exists(path):
    problems = []
    for words in lap_invocations(text_of(path)):
        command, rest = command_for(words)
        if command is main:
            if words[0] not in main.commands:
                problems.append(f"`lap {words[0]}`: no such command")
            continue
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for word in rest:
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in known:
                problems.append(f"`lap {' '.join(words)}`: {option} is not an option of `{command.name}`")
    assert not problems, "\n".join(problems)


def test_every_command_answers_help():
    runner = CliRunner()
    for name, command in main.commands.items():
        subcommands = getattr(command, "commands", {})
        for words in ([name], *([name, sub] for sub in subcommands)):
            result = runner.invoke(main, [*words, "--help"])
            assert result.exit_code == 0 and "Usage:" in result.output, (words, result.output)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_setting_named_exists(path):
    problems = []
    for section, field in re.findall(r"`(\w+)\.(\w+)`", text_of(path)):
        model = SECTIONS.get(section)
        if field == "py" or (section, field) in NOT_SETTINGS:  # a file, or Ray's own API
            continue
        if model is not None and field not in model.model_fields:
            problems.append(f"{section}.{field}")
    assert not problems, f"settings named in {path.name} that lap/settings.py does not have: {problems}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_pointed_to_is_there(path):
    text = text_of(path)
    targets = {t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t}
    # paths of files in the repository (with an extension: `lap/runtime` is a secret's name), not patterns
    targets |= {t for t in re.findall(r"(?<![\w./-])((?:docs|deploy|benchmarks|lap|tests)/[\w./-]*\.[a-z]+)\b", text)
                if "NNNN" not in t}
    missing = [t for t in sorted(targets) if not ((path.parent / t).exists() or (REPO / t).exists())]
    assert not missing, f"{path.name} points to what is not in the repository: {missing}"


@pytest.mark.parametrize("path, name", [("/openapi.json", "ingest.json"), ("/v1/openapi.json", "output.json")])
def test_the_committed_openapi_documents_are_what_lap_serves(lap_up, settings, path, name):
    """docs/openapi/ holds the two OpenAPI documents for readers without a running LAP; they must not drift.
    `make openapi` (with LAP up on its default port) writes them again."""
    import httpx

    served = httpx.get(f"{settings.api_url}{path}", timeout=30)
    assert served.status_code == 200
    committed = json.loads((REPO / "docs" / "openapi" / name).read_text())
    assert served.json() == committed, f"docs/openapi/{name} differs from {path}: run `make openapi`"
