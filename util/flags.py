"""Command-line flags that several commands share: flag types (argparse's type=), and flags declared as dataclass
fields, a field's metadata holding its flag's help and argparse options (type, choices, metavar), so that one
dataclass is the flags, the config file and the checks of both."""
import argparse
import typing


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def flag_type(f, ints=int):
    """The argparse type of a field's flag: its metadata's, else its annotation's (Optional[float] -> float)."""
    if "type" in f.metadata:
        return f.metadata["type"]
    kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
    return ints if kind is int else kind


def add_flag(parser, f, default, kind):
    """--name-of-the-field, with the field's help, choices and metavar; kind: its type (flag_type)."""
    options = {key: f.metadata[key] for key in ("choices", "metavar") if key in f.metadata}
    if "choices" not in options and kind is not str:
        options["type"] = kind
    parser.add_argument(f"--{f.name.replace('_', '-')}", default=default, help=f.metadata.get("help"), **options)
