"""`fused-sam --help` and every subcommand's help render as plain text: no reStructuredText or Markdown
markup (double backticks, backticks, roles such as :func:) leaks from the docstrings they are built from."""
import importlib.util
import re

import pytest

from fused_sam.cli import COMMANDS, main

MARKUP = re.compile(r"``|`|:(func|class|mod|meth|attr|ref):")


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_the_command_names_every_subcommand_in_plain_text(capsys):
    text = _help(["--help"], capsys)
    assert not MARKUP.search(text), text
    for command in COMMANDS:
        assert f"\n  {command} " in text, text


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_is_plain_text(command, capsys):
    if command == "check" and importlib.util.find_spec("fused_sam.check") is None:
        pytest.skip("fused_sam.check is not on this branch")
    text = _help([command, "--help"], capsys)
    assert text.startswith(f"usage: fused-sam {command}") and not MARKUP.search(text), text
