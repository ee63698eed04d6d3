"""The documentation points at things that exist.

For README.md, docs/**/*.md and src/**/README.md: every relative link resolves to a file (and its #anchor to a
heading, with GitHub's slugs); every repository path named in code (inline or in a block) exists; every command
in code runs something that exists: `python benchmarks/...` and `python examples/...` scripts,
`transformer-student` sub-commands and their options, `make` targets and `anomalib` sub-commands. The README
stays short. A negative test runs the same checks on a small broken tree to prove that they catch each fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import pytest

from anomalib_transformer_student.apps import cli

ROOT = Path(__file__).resolve().parents[2]
README_MAX_WORDS = 1300
ANOMALIB_SUBCOMMANDS = {"fit", "train", "test", "predict", "export", "validate", "benchmark"}
PATH_PREFIXES = ("benchmarks", "examples", "configs", "docs", "tests", "src")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(PATH_PREFIXES)})/[\w./*<>{{}}-]*)")
RELATIVE_PATH = re.compile(r"(?<![\w./-])(\.\./[\w./-]+)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*:?")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


def markdown_files(root: Path) -> list[Path]:
    """README.md, docs/**/*.md and every README.md under src/."""
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "src").rglob("README.md"))]
    return [path for path in files if path.is_file()]


def split_markdown(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The prose (code blocks blanked) and the fenced code blocks as ``(language, code)``."""
    prose: list[str] = []
    blocks: list[tuple[str, str]] = []
    fence: str | None = None
    language, code = "", []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, code = match.group(2), match.group(3).strip().lower(), []
            prose.append("")
        elif fence is not None and match and match.group(2).startswith(fence) and not match.group(3).strip():
            blocks.append((language, "\n".join(code)))
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def code_spans(prose: str) -> list[str]:
    """Inline code, whitespace (line breaks included) collapsed."""
    return [" ".join(match.group(2).split()) for match in CODE_SPAN.finditer(prose)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def link_problems(path: Path) -> Iterator[str]:
    """Relative links (and their #anchors) that do not resolve."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    prose = CODE_SPAN.sub("code", prose)
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            yield f"link to a missing file: {target}"
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            yield f"link to a missing heading: {target}"


def path_problems(path: Path, root: Path) -> Iterator[str]:
    """Repository paths named in code that do not exist."""
    prose, blocks = split_markdown(path.read_text(encoding="utf-8"))
    spans = code_spans(prose)
    for code in [*spans, *(block for _, block in blocks)]:
        for name in REPO_PATH.findall(code):
            name = name.rstrip(".,:;")
            if any(char in name for char in "*<>{}"):
                continue  # a pattern or a placeholder, not a path
            if not (root / name).exists():
                yield f"missing path: {name}"
    for code in spans:
        for name in RELATIVE_PATH.findall(code):
            name = name.rstrip(".,:;")
            if not (path.parent / name).exists():
                yield f"missing path: {name} (relative to {path.parent.name}/)"


@cache
def make_targets(makefile: Path) -> frozenset[str]:
    """The targets a Makefile defines."""
    if not makefile.is_file():
        return frozenset()
    return frozenset(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile.read_text(encoding="utf-8"), re.MULTILINE))


@cache
def subcommand_options(name: str) -> frozenset[str]:
    """The long options a ``transformer-student`` sub-command defines (read from its module's source)."""
    command = next(command for command in cli.COMMANDS if command.name == name)
    source = ROOT / "src" / Path(*command.module.split(".")).with_suffix(".py")
    return frozenset(re.findall(r"\"(--[\w-]+)\"", source.read_text(encoding="utf-8"))) | {"--help", "-h"}


def command_segments(code: str, shell: bool) -> Iterator[list[str]]:
    """The simple commands of a snippet as token lists, environment assignments and `time` dropped."""
    code = re.sub(r"\\\n\s*", " ", code)
    for line in code.splitlines():
        if shell:
            line = re.sub(r"(^|\s)#.*$", "", line)
        for segment in re.split(r"&&|\|\||;|\|", line):
            tokens = segment.split()
            while tokens and (ENV_ASSIGNMENT.fullmatch(tokens[0]) or tokens[0].endswith("time")):
                tokens.pop(0)
                while tokens and tokens[0].startswith("-"):
                    tokens.pop(0)
            if tokens:
                yield tokens


def command_problems(path: Path, root: Path) -> Iterator[str]:
    """Commands in code that name a missing script, sub-command, option, make target or anomalib sub-command."""
    prose, blocks = split_markdown(path.read_text(encoding="utf-8"))
    snippets = [(span, False) for span in code_spans(prose)]
    snippets += [(code, True) for language, code in blocks if language in SHELL_LANGUAGES]
    subcommands = {command.name for command in cli.COMMANDS}
    for code, shell in snippets:
        for tokens in command_segments(code, shell):
            program, arguments = tokens[0].rsplit("/", 1)[-1], tokens[1:]
            if program in {"python", "python3", "bash", "sh"}:
                if any(argument in {"-c", "-m"} for argument in arguments):
                    continue
                script = next((argument for argument in arguments if not argument.startswith("-")), "")
                if script.startswith(("benchmarks/", "examples/")) and not (root / script).is_file():
                    yield f"missing script: {program} {script}"
            elif program == "transformer-student" and arguments and not arguments[0].startswith("-"):
                sub = arguments[0]
                if PLACEHOLDER.fullmatch(sub):
                    continue  # e.g. `transformer-student COMMAND: error: ...`
                if sub not in subcommands:
                    yield f"unknown transformer-student sub-command: {sub}"
                    continue
                for option in arguments[1:]:
                    option = option.split("=", 1)[0]
                    if option.startswith("--") and option not in subcommand_options(sub):
                        yield f"unknown option of transformer-student {sub}: {option}"
            elif program == "make" and arguments and arguments[0] not in make_targets(root / "Makefile"):
                yield f"unknown make target: {arguments[0]}"
            elif program == "anomalib" and arguments and arguments[0] not in ANOMALIB_SUBCOMMANDS | {"--help"}:
                yield f"unknown anomalib sub-command: {arguments[0]}"


def problems(path: Path, root: Path = ROOT) -> list[str]:
    """Everything wrong with one Markdown file."""
    return [*link_problems(path), *path_problems(path, root), *command_problems(path, root)]


def word_count(path: Path) -> int:
    """Words as `wc -w` counts them, code blocks included."""
    return len(path.read_text(encoding="utf-8").split())


def _ids(paths: Iterable[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


DOCS = markdown_files(ROOT)


def test_the_docs_are_found() -> None:
    names = _ids(DOCS)
    assert "README.md" in names
    assert "docs/README.md" in names
    assert "src/anomalib_transformer_student/model/README.md" in names


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_links_paths_and_commands_exist(path: Path) -> None:
    found = problems(path)
    assert not found, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(found)


def test_readme_is_short() -> None:
    assert word_count(ROOT / "README.md") <= README_MAX_WORDS


def test_slugs_follow_github() -> None:
    assert slug("Training speed against anomalib's L2BT") == "training-speed-against-anomalibs-l2bt"
    assert slug("Tiling: speed") == "tiling-speed"
    assert slug("Measured on Intel Xeon (AMX)") == "measured-on-intel-xeon-amx"
    assert slug("The `transformer-student` command") == "the-transformer-student-command"


def test_the_checks_catch_each_fault(tmp_path: Path) -> None:
    """A small tree with one fault of each kind next to correct references: every fault, and only those, found."""
    (tmp_path / "Makefile").write_text("demo: venv\n\ttrue\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## A heading\n\n## A heading\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "real.py").write_text("")
    page = tmp_path / "README.md"
    page.write_text(
        "# Page\n\n## Good heading\n\n"
        "Good: [guide](docs/guide.md#a-heading), [second](docs/guide.md#a-heading-1), [here](#good-heading),\n"
        "[web](https://example.org/x), `benchmarks/real.py`, `make demo`, `transformer-student evaluate\n"
        "--curve authors`, `transformer-student COMMAND: error: ...`.\n\n"
        "Broken: [gone](docs/gone.md), [no anchor](docs/guide.md#no-such-heading), [here](#nowhere),\n"
        "`benchmarks/gone.py`, `make nothing`, `transformer-student evaluate --no-such-option`.\n\n"
        "```bash\n"
        "python benchmarks/real.py --runs 3   # fine\n"
        "OMP_NUM_THREADS=1 python benchmarks/missing.py\n"
        "anomalib train --model TransformerStudent && anomalib frobnicate --model TransformerStudent\n"
        "transformer-student no-such-job \\\n    --output x\n"
        "```\n"
    )
    assert sorted(problems(page, tmp_path)) == sorted(
        [
            "link to a missing file: docs/gone.md",
            "link to a missing heading: docs/guide.md#no-such-heading",
            "link to a missing heading: #nowhere",
            "missing path: benchmarks/gone.py",
            "missing path: benchmarks/missing.py",
            "missing script: python benchmarks/missing.py",
            "unknown make target: nothing",
            "unknown option of transformer-student evaluate: --no-such-option",
            "unknown anomalib sub-command: frobnicate",
            "unknown transformer-student sub-command: no-such-job",
        ]
    )
    long_page = tmp_path / "long.md"
    long_page.write_text("word " * (README_MAX_WORDS + 1))
    assert word_count(long_page) > README_MAX_WORDS
