"""Command-line flags built from a script's constants block: NAME -> --name-with-dashes, typed like its default.

    SETTINGS = [name for name in list(globals()) if name.isupper()]
    constants = {name: globals()[name] for name in SETTINGS}
    settings = apply_flags(build_parser(__doc__, constants).parse_args(argv), constants)

Booleans take true/false, lists take one or more values; a flag left out keeps the constant. `--help` shows the
script's docstring, then each flag with the comment of its constant and its default, grouped under the comment
lines that head the constants block's sections (read from the script's source, `read_constant_comments`).
"""

import argparse
import ast
import inspect
import io
import re
import tokenize

RULE = re.compile(r"#\s*-{3,}\s*$")  # a `# -----` line that opens or closes a constants block
CONTINUATION = re.compile(r"#\s{2,}\S")  # a comment line indented after its `#` continues the comment above


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def read_constant_comments(source):
    """({NAME: comment}, {NAME: (section title, section text)}) of a module's top-level constants.

    A constant's comment is the one on its line (on its last line when it spans several), continued by comment
    lines below it that are indented after the `#`. A section starts at comment lines directly above a constant
    (not a `# ----` rule), `# title: text`, and holds the constants down to the next section.
    """
    comments_by_line = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments_by_line[token.start[0]] = (token.start[1], token.string)
    lines = source.splitlines()

    def comment_only(number):
        return number in comments_by_line and not lines[number - 1][:comments_by_line[number][0]].strip()

    comments, sections, section = {}, {}, None
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        header, number = [], node.lineno - 1
        while comment_only(number) and not RULE.match(comments_by_line[number][1]) \
                and not CONTINUATION.match(comments_by_line[number][1]):
            header.insert(0, comments_by_line[number][1].lstrip("#").strip())
            number -= 1
        if header:
            title, _, text = " ".join(header).partition(": ")
            section = (title, text)
        sections[name] = section
        own = comments_by_line.get(node.end_lineno) or comments_by_line.get(node.lineno)
        if own is None:
            continue
        text, number = [own[1].lstrip("#").strip()], node.end_lineno + 1
        while comment_only(number) and CONTINUATION.match(comments_by_line[number][1]):
            text.append(comments_by_line[number][1].lstrip("#").strip())
            number += 1
        comments[name] = " ".join(text)
    return comments, sections


def format_default(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value) if value == "" else str(value)


def build_parser(doc, constants, source=None, notes=None):
    """argparse from a constants block; the script's docstring is the description.

    `source` is the script's file, whose comments become each flag's help (default: the file of the caller);
    `notes` adds a text to some flags' help ({NAME: text}, e.g. the value another preset gives).
    """
    if source is None:
        source = inspect.currentframe().f_back.f_globals.get("__file__")
    comments, sections = {}, {}
    if source:
        with open(source, encoding="utf-8") as handle:
            comments, sections = read_constant_comments(handle.read())
    parser = argparse.ArgumentParser(description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for name, default in constants.items():
        flag = "--" + name.lower().replace("_", "-")
        section = sections.get(name)
        if section not in groups:
            groups[section] = parser.add_argument_group(*section) if section else parser
        help_text = " ".join(part for part in (comments.get(name, ""), f"(default: {format_default(default)}"
                                               + (f"; {notes[name]}" if notes and name in notes else "") + ")") if part)
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            groups[section].add_argument(flag, type=parse_bool, default=None, metavar="true|false", help=help_text)
        elif isinstance(default, list):
            groups[section].add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            groups[section].add_argument(flag, type=type(default), default=None, help=help_text)
    return parser


def given_flags(args, settings):
    """Names of the settings whose flag was given on the command line."""
    return [name for name in settings if getattr(args, name.lower(), None) is not None]


def apply_flags(args, settings):
    """A copy of `settings` with every flag that was given on the command line applied."""
    settings = dict(settings)
    for name in given_flags(args, settings):
        settings[name] = getattr(args, name.lower())
    return settings
