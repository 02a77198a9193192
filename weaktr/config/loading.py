"""Reading a configuration: YAML files, dotted ``--set`` overrides, checks, and a job's command line.

Every job takes ``--config FILE`` and any number of ``--set section.key=value``; an unknown key, a value of the
wrong type or a missing file is a :class:`ConfigError` naming the key or path, which :func:`parse_job_args` turns
into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from weaktr import storage
from weaktr.config.schema import PATH_KEYS, Config, ConfigError, per_worker_batch
from weaktr.logs import add_verbosity_flags, configure_from_args


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a library dataclass's own check (e.g. CRFParams): say which section
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'config'}': {err}") from None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(value if value is not None else {}, tp, path + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for inner in options[:-1]:  # str | list[str]: the first type the value fits
            try:
                return _coerce(value, inner, path)
            except ConfigError:
                pass
        return _coerce(value, options[-1], path)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"config key '{path}': expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if tp is dict:  # a free-form mapping (tune.space), checked by its user
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{path}': expected a mapping, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}': expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1]
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config key '{path}': unsupported type {tp}")
    raise ConfigError(f"config key '{path}': expected {tp.__name__}, got {value!r}")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{assignment}': expected KEY=VALUE")
    _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None, f"override '{assignment}'")


def _set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    """``data[a][b][c] = value`` for ``key`` "a.b.c", creating missing sections (``from_dict`` then names an
    unknown key); ``where`` names the setting in the error for a path through a value."""
    *sections, leaf = key.split(".")
    node = data
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{part}' is not a section")
    node[leaf] = value


def load_config(
    path: Optional[str | Path | typing.Sequence[str | Path]] = None, overrides: typing.Sequence[str] = (),
    cls: type = Config,
) -> Any:
    """Defaults ← YAML file(s), each over the one before (a recipe, then e.g. configs/backbones/eva02_s.yaml) ←
    overrides, validated against the dataclasses."""
    data = to_dict(cls())
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        _merge(data, loaded, "")
    for assignment in overrides:
        apply_override(data, assignment)
    return _checked(from_dict(data, cls))


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set (``{"train.lr": 3e-4}``), checked as a loaded config is."""
    data = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(data, key, value, f"config key '{key}'")
    return _checked(from_dict(data))


def _checked(cfg: Any) -> Any:
    if isinstance(cfg, Config):  # a global batch that does not split over the workers: say so now
        per_worker_batch(cfg.train.batch_size, cfg.train.num_workers, "train")
        per_worker_batch(cfg.seg_train.batch_size, cfg.seg_train.num_workers, "seg_train")
        if cfg.seg_train.init_encoder_from_phase1 and (cfg.seg_model.pretrained or cfg.seg_model.weights_path):
            raise ConfigError(
                "config key 'seg_train.init_encoder_from_phase1': the encoder starts from phase 1, so "
                "seg_model.pretrained and seg_model.weights_path must be unset"
            )
    return cfg


def _merge(base: dict, update: dict, prefix: str) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` (local or a URI, ``weaktr.storage``)."""
    from weaktr import storage

    storage.write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def job_arg_parser(description: str, resumes: Optional[str] = None) -> argparse.ArgumentParser:
    """A job's command line: ``--config``, ``--set`` and, for a job whose work survives it, ``--resume`` (continue
    the ``resumes`` of this config; without the flag, one that exists is refused: ``launch.check_resume``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=None,
                        help="YAML config file; repeat to layer one over another (e.g. a recipe, then "
                             "configs/backbones/eva02_s.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    if resumes:
        parser.add_argument("--resume", action="store_true",
                            help=f"continue the {resumes} of this config (interrupted, or to extend it)")
    add_verbosity_flags(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the config the job would run with (files, defaults and --set merged, paths made "
                             "absolute) and exit")
    return parser


def parse_job_args(parser: argparse.ArgumentParser, argv: Optional[typing.Sequence[str]] = None, cls: type = Config):
    """Parse a job's command line; a bad config exits with one line and code 2. The config's paths come back
    absolute (``resolve_paths``)."""
    args = parser.parse_args(argv)
    configure_from_args(args)
    try:
        cfg = load_config(args.config, args.overrides, cls)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    resolve_paths(cfg)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        sys.exit(0)
    return args, cfg


def get_value(cfg: Config, key: str) -> Any:
    """The value of a dotted ``section.name`` key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def resolve_paths(cfg: Config) -> None:
    """Make every path in ``cfg`` (``PATH_KEYS``) absolute against this process's directory, as the user meant
    them: Ray workers, actors and Tune trials run in directories of their own. URIs stay as they are."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        if value := getattr(getattr(cfg, section), name):
            setattr(getattr(cfg, section), name, storage.absolute(value))
