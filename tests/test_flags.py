"""One flag name, one meaning: every command's options as its --help prints them, compared across commands."""

from __future__ import annotations

import logging
from collections import defaultdict

import click
import pytest

from memscan.cli import COMMANDS, cli, main
from memscan.cli.options import PER_COMMAND, RENAMED


def commands() -> dict[str, click.Command]:
    """Every command and subcommand by its full name (`assoc sweep`)."""
    found: dict[str, click.Command] = {}
    context = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(context, name)
        subcommands = getattr(command, "commands", None)
        found.update({f"{name} {sub}": each for sub, each in subcommands.items()} if subcommands else {name: command})
    return found


def flag_uses() -> dict[str, list[tuple[str, str, object]]]:
    """flag -> [(command, help, default)] over every command's visible options."""
    uses: dict[str, list[tuple[str, str, object]]] = defaultdict(list)
    for name, command in commands().items():
        for option in command.params:
            if isinstance(option, click.Option) and not option.hidden:
                for flag in option.opts:
                    if flag.startswith("--"):
                        uses[flag].append((name, option.help or "", option.default))
    return uses


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_every_command_prints_its_help(capsys):
    for name in commands():
        code, out, _ = run(capsys, *name.split(), "--help")
        assert code == 0 and "-v, --verbose" in out and "-q, --quiet" in out, name


def test_a_flag_name_has_one_meaning_and_one_default():
    differing = {flag: uses for flag, uses in flag_uses().items()
                 if flag not in PER_COMMAND and len({(help, str(default)) for _, help, default in uses}) > 1}
    assert differing == {}


def test_every_flag_kept_per_command_is_used_by_several():
    uses = flag_uses()
    assert [flag for flag in PER_COMMAND if len(uses.get(flag, ())) < 2] == []


def test_device_takes_cuda_n_and_gpu_in_every_command(capsys):
    for name, command in commands().items():
        if any(isinstance(p, click.Option) and "--device" in p.opts for p in command.params):
            context = command.make_context(name, ["--device", "gpu", *_required(command)])
            assert context.params["device"] == "gpu", name
            context = command.make_context(name, ["--device", "cuda:1", *_required(command)])
            assert context.params["device"] == "cuda:1", name
            with pytest.raises(click.BadParameter, match=r"auto, cpu or cuda\[:N\]"):
                command.make_context(name, ["--device", "tpu", *_required(command)])


def _required(command: click.Command) -> list[str]:
    """Values for a command's required arguments and options, enough to parse it."""
    args = []
    for param in command.params:
        if param.required:
            args += ["x"] if isinstance(param, click.Argument) else [param.opts[0], "x"]
    return args


def test_the_old_spelling_of_a_renamed_flag_warns_and_still_works(capsys):
    for (name, old), new in RENAMED.items():
        command = commands()[name]
        context = command.make_context(name, [old, "7", *_required(command)])
        target = next(p.name for p in command.params if new in getattr(p, "opts", ()))
        assert str(context.params[target]) == "7"
        assert f"{old} is now {new}" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_and_quiet_work_before_and_after_the_command(capsys, tmp_path, where):
    for flag, level in (("-q", logging.WARNING), ("-v", logging.DEBUG)):
        args = [flag, "verify", str(tmp_path)] if where == "before" else ["verify", str(tmp_path), flag]
        run(capsys, *args)
        assert logging.getLogger().level == level
    logging.getLogger().setLevel(logging.WARNING)
