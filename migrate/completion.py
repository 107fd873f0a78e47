"""Shell completion scripts for `kcr-migrate completion bash|zsh`, generated from the parser
itself, so that they know every subcommand, option and option value the installed version has.

``spec()`` reads the parser into plain data (``Command``/``Option``); ``bash()`` and ``zsh()``
render it. The scripts complete subcommands, options (each subcommand's own; without one, the
top level's and the migrate form's), option values (choices, files for FILE, nothing for the
rest), and positionals: files, pids, host names. Like the parser, they take options anywhere:
the first word that is a subcommand's name (or looks like PID@HOST) picks the subcommand.
"""
from __future__ import annotations

import argparse
import re
from typing import Iterable

from migrate.cli import COMMANDS, build_parser, subparsers
from transport.frozen import frozen


@frozen
class Option:
    strings: tuple[str, ...]
    help: str
    takes_value: bool
    metavar: str
    choices: tuple[str, ...]
    files: bool               # the value is a path
    repeatable: bool


@frozen
class Command:
    name: str                 # "" for the top level (with the migrate form's options)
    help: str
    options: tuple[Option, ...]
    positionals: tuple[str, ...]   # what each completes: "file", "pid", "host", "choice:a b", "" (nothing)


def _option(action: argparse.Action) -> Option:
    metavar = action.metavar if isinstance(action.metavar, str) else (action.dest or "").upper()
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    return Option(tuple(action.option_strings), action.help if isinstance(action.help, str) else "",
                  action.nargs != 0, metavar, choices, "FILE" in metavar,
                  isinstance(action, argparse._AppendAction))


def _positional(action: argparse.Action) -> str:
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    if action.choices:
        return "choice:" + " ".join(str(c) for c in action.choices)
    if "FILE" in metavar:
        return "file"
    if action.dest == "pid":
        return "pid"
    if metavar == "HOST" or "@" in metavar:
        return "host"
    return ""


def _command(name: str, help: str, parser: argparse.ArgumentParser) -> Command:
    options = tuple(_option(a) for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS)
    positionals = tuple(_positional(a) for a in parser._actions
                        if not a.option_strings and not isinstance(a, argparse._SubParsersAction))
    return Command(name, help, options, positionals)


def spec() -> list[Command]:
    """The top level (``""``: its own options and the migrate form's), then each subcommand."""
    parser = build_parser()
    subs = subparsers(parser)
    top = _command("", "", parser)
    if "migrate" in subs:
        migrate = _command("migrate", "", subs["migrate"])
        known = {s for o in top.options for s in o.strings}
        top = Command("", "", top.options + tuple(o for o in migrate.options if not known & set(o.strings)),
                      migrate.positionals)
    return [top] + [_command(name, COMMANDS[name][0], p) for name, p in subs.items()]


# --- bash ---------------------------------------------------------------------------------------

def _words(items: Iterable[object]) -> str:
    return " ".join(str(i) for i in items)


def _bash_positional(kinds: tuple[str, ...]) -> str:
    lines = []
    for kind in dict.fromkeys(k for k in kinds if k):
        if kind == "file":
            lines.append('compopt -o filenames 2>/dev/null; COMPREPLY+=( $(compgen -f -- "$cur") )')
        elif kind == "pid":
            lines.append('COMPREPLY+=( $(compgen -W "$(command ps -eo pid= 2>/dev/null)" -- "$cur") )')
        elif kind == "host":
            lines.append('if [[ "$cur" == *@* ]]; then COMPREPLY+=( $(compgen -A hostname -P "${cur%%@*}@" -- '
                         '"${cur#*@}") ); else COMPREPLY+=( $(compgen -A hostname -- "$cur") ); fi')
        elif kind.startswith("choice:"):
            lines.append(f'COMPREPLY+=( $(compgen -W "{kind[7:]}" -- "$cur") )')
    return "; ".join(lines) or ":"


def bash(commands: list[Command]) -> str:
    names = [c.name for c in commands if c.name]
    options = {s: o for c in commands for o in c.options for s in o.strings}
    valued = [(s, o) for s, o in options.items() if o.takes_value]
    files = [s for s, o in valued if o.files and not o.choices]
    others = [s for s, o in valued if not o.files and not o.choices]
    values = [f'        {s}) COMPREPLY=( $(compgen -W "{_words(o.choices)}" -- "$cur") ); return ;;'
              for s, o in valued if o.choices]
    if files:
        values.append(f'        {"|".join(files)}) compopt -o filenames 2>/dev/null; '
                      'COMPREPLY=( $(compgen -f -- "$cur") ); return ;;')
    if others:                  # a number, a rate, a PATH on another host: nothing to offer
        values.append(f'        {"|".join(others)}) COMPREPLY=(); return ;;')
    ordered = commands[1:] + commands[:1]           # the top level last: its pattern is *
    option_cases = [f'        {c.name or "*"}) opts="{_words(s for o in c.options for s in o.strings)}" ;;'
                    for c in ordered]
    word_cases = [f'        {c.name}) {_bash_positional(c.positionals)} ;;' for c in commands[1:]]
    word_cases.append('        *) COMPREPLY=( $(compgen -W "$commands" -- "$cur") ) ;;')
    return f"""# bash completion for kcr-migrate (generated by `kcr-migrate completion bash`)
_kcr_migrate() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" cmd="" commands="{_words(names)}" opts i
    (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    if [[ "$cur" == "=" ]]; then cur=""; fi
    if [[ "$prev" == "=" ]] && (( COMP_CWORD > 1 )); then prev="${{COMP_WORDS[COMP_CWORD-2]}}"; fi
    for (( i = 1; i < COMP_CWORD; i++ )); do
        case "${{COMP_WORDS[i]}}" in
            {"|".join(names)}) cmd="${{COMP_WORDS[i]}}"; break ;;
            -*) ;;
            *@*) cmd=migrate; break ;;
        esac
    done
    COMPREPLY=()
    case "$prev" in
{chr(10).join(values)}
    esac
    if [[ "$cur" == -* ]]; then
        case "$cmd" in
{chr(10).join(option_cases)}
        esac
        COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
        return
    fi
    case "$cmd" in
{chr(10).join(word_cases)}
    esac
}}
complete -F _kcr_migrate kcr-migrate
"""


# --- zsh ----------------------------------------------------------------------------------------

def _zsh_text(text: str, limit: int = 70) -> str:
    """A description zsh's _arguments and _describe take as it is: no quotes, brackets or
    colons, one short clause."""
    text = re.split(r"[;(]", text)[0].strip().rstrip(",.").replace("'", "\u2019")
    text = re.sub(r"[\[\]\\:`$]", "", text)
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _zsh_action(o: Option) -> str:
    if o.choices:
        return f"({_words(o.choices)})"
    return "_files" if o.files else " "


def _zsh_specs(c: Command) -> list[str]:
    out = []
    for o in c.options:
        for s in o.strings:
            spec = f"{'*' if o.repeatable else ''}{s}[{_zsh_text(o.help)}]"
            if o.takes_value:
                spec += f":{re.sub(r'[:]', '-', o.metavar) or 'value'}:{_zsh_action(o)}"
            out.append(f"'{spec}'")
    for kind in c.positionals:
        action = {"file": "_files", "pid": "_pids", "host": "_hosts"}.get(kind, " ")
        if kind.startswith("choice:"):
            action = f"({kind[7:]})"
        out.append(f"':{kind.split(':')[0] or 'argument'}:{action}'")
    return out


def zsh(commands: list[Command]) -> str:
    names = [c.name for c in commands if c.name]
    described = "\n".join(f"    '{c.name}:{_zsh_text(c.help)}'" for c in commands if c.name)
    top = commands[0]
    top_specs = _zsh_specs(Command("", "", top.options, ()))
    cases = []
    for c in commands[1:]:
        cases.append(f"    ({c.name})\n      _arguments -s : \\\n        " + " \\\n        ".join(_zsh_specs(c)) + " ;;")
    return f"""#compdef kcr-migrate
# zsh completion for kcr-migrate (generated by `kcr-migrate completion zsh`)
_kcr_migrate() {{
  local -a commands
  commands=(
{described}
  )
  local cmd= i state
  for (( i = 2; i < CURRENT; i++ )); do
    case ${{words[i]}} in
      ({"|".join(names)}) cmd=${{words[i]}}; words[i]=(); (( CURRENT-- )); break ;;
      (-*) ;;
      (*@*) cmd=migrate; break ;;
    esac
  done
  case $cmd in
{chr(10).join(cases)}
    (*)
      _arguments -s : \\
        {" ".join(top_specs)} \\
        '1:command or PID@HOST:->first'
      if [[ $state == first ]]; then
        _describe -t commands 'kcr-migrate command' commands
      fi ;;
  esac
}}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
  _kcr_migrate "$@"
else
  compdef _kcr_migrate kcr-migrate
fi
"""


SCRIPTS = {"bash": bash, "zsh": zsh}      # by shell, as `kcr-migrate completion` names them
