"""The README's examples run as written: every `nextlat ...` line parses, the cheap ones run on a tiny trained run
(its path put in place of runs/pathstar-demo), and so does the Python example."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nextlat.cli import build_parser, main
from nextlat.training.loop import Trainer

README = Path(__file__).parent.parent / "README.md"
DEMO = "runs/pathstar-demo"
CHEAP = {"recipes", "config", "eval", "generate", "bench-decode"}  # no training


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """The ``nextlat`` command lines of the README's bash blocks, as argument lists (comments and pipes cut off)."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("nextlat "):
                lexer = shlex.shlex(line, posix=True, punctuation_chars="|")
                lexer.commenters, lexer.whitespace_split = "#", True
                words = list(lexer)
                out.append(words[1 : words.index("|") if "|" in words else None])
    return out


COMMANDS = _commands()


def test_the_readme_has_examples():
    assert {argv[0] for argv in COMMANDS} >= CHEAP | {"train", "sweep", "experiment", "bench-train"}
    assert len(_blocks("python")) == 1


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_command_line_parses(argv):
    build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny run shaped like pathstar-demo's (the README's prompt needs node ids up to 20)."""
    from conftest import TINY_RUN

    from nextlat.config import with_settings
    from nextlat.registry import config_from_dict

    run = tmp_path_factory.mktemp("readme") / "pathstar-demo"
    Trainer(config_from_dict(with_settings(TINY_RUN, {"task.num_nodes": 50, "train.steps": 2})), out_dir=run).fit()
    return run


@pytest.mark.parametrize("argv", [a for a in COMMANDS if a[0] in CHEAP and all(w == DEMO or "runs/" not in w for w in a)],
                         ids=" ".join)
def test_cheap_commands_run_on_a_tiny_run(argv, demo_run, capsys):
    assert main([str(demo_run) if w == DEMO else w for w in argv]) == 0, capsys.readouterr().err


def test_the_python_example_runs(demo_run, capsys):
    code = _blocks("python")[0].replace(f'"{DEMO}"', repr(str(demo_run)))
    exec(compile(code, "README.md", "exec"), {})
    assert "drafts accepted per round" in capsys.readouterr().out
