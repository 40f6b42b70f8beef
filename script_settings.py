"""Command-line flags built from a script's constants block: NAME -> --name-with-dashes, typed like its default.

    SETTINGS = [name for name in list(globals()) if name.isupper()]
    constants = {name: globals()[name] for name in SETTINGS}
    settings = apply_flags(build_parser(__doc__, constants).parse_args(argv), constants)

Booleans take true/false, lists take one or more values; a flag left out keeps the constant.
"""

import argparse


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(doc, constants):
    """argparse from a constants block; the script's docstring (first paragraph) is the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in constants.items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=parse_bool, default=None, metavar="true|false")
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=None)
        else:
            parser.add_argument(flag, type=type(default), default=None)
    return parser


def apply_flags(args, settings):
    """A copy of `settings` with every flag that was given on the command line applied."""
    settings = dict(settings)
    for name in settings:
        value = getattr(args, name.lower(), None)
        if value is not None:
            settings[name] = value
    return settings
