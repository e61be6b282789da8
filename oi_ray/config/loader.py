"""Load a spec file plus ``key=value`` overrides into a typed, validated ExperimentConfig.

Precedence: schema defaults < spec file < overrides. Unknown keys and badly typed values
fail before anything runs, naming the full dotted key.
"""

import dataclasses
import difflib
import io
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from oi_ray import storage
from oi_ray.config.schema import ExperimentConfig
from oi_ray.config.validate import resolve_derived, validate, warn_inert_keys
from oi_ray.errors import ConfigError

RESOLVED_SPEC_NAME = "spec.yaml"  # the resolved spec each task saves beside its results
MAX_SUGGESTIONS = 3  # "did you mean" candidates for an unknown key


SpecPaths = str | Path | Sequence[str | Path] | None


def load_config(spec_paths: SpecPaths, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read the spec file(s) (TAO spec YAML; of several, each later one's keys win, e.g. a
    dataset spec then a training recipe), apply dotlist ``overrides`` and validate."""
    if spec_paths is None:
        paths: list[str] = []
    elif isinstance(spec_paths, str | Path):
        paths = [str(spec_paths)]
    else:
        paths = [str(path) for path in spec_paths]
    specs = [(_read_spec(path), path) for path in paths]
    return _typed_config(specs or [(OmegaConf.create({}), "spec")], overrides)


def config_from_mapping(spec: dict[str, Any], source: str,
                        values: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Validate a spec given as plain data (e.g. application arguments in a Serve config),
    exactly as a spec file, after setting the dotted keys of ``values`` (e.g. a sweep trial's
    parameters); ``source`` names it in errors."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: the spec must be a mapping of sections, not {type(spec).__name__}")
    node = OmegaConf.create(spec)
    for key, value in (values or {}).items():
        OmegaConf.update(node, key, value, merge=False)
    return _typed_config([(node, source)], ())


def _typed_config(specs: list[tuple[DictConfig, str]], overrides: Sequence[str]) -> ExperimentConfig:
    """Merge ``specs`` (each with the name errors give it; later ones win) and ``overrides`` onto
    the schema, then validate."""
    dotlist = _parse_overrides(overrides)
    source = " + ".join(name for _, name in specs)

    misplaced = [
        *(problem for spec, name in specs for problem in _structure_problems(spec, ExperimentConfig, name)),
        *_structure_problems(dotlist, ExperimentConfig, "override"),
    ]
    if misplaced:
        raise ConfigError(_bullet("unknown or misplaced spec keys", misplaced))

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), *(node for node, _ in specs),
                                 dotlist)
        override_keys = {item.partition("=")[0].strip() for item in overrides}
        for key in override_keys & set(_mapping_fields(dotlist, ExperimentConfig)):
            # `dataset.input_map={...}` replaces the mapping; `dataset.input_map.X=3` adds to it.
            OmegaConf.update(merged, key, OmegaConf.select(dotlist, key), merge=False)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe_type_error(error)) from None
    try:
        config = typing.cast(ExperimentConfig, OmegaConf.to_object(merged))
    except InterpolationResolutionError as error:
        reason = error.msg.splitlines()[0]
        raise ConfigError(f"{error.full_key}: cannot resolve interpolation: {reason}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(_describe_type_error(error)) from None

    resolve_derived(config)
    problems = validate(config)
    if problems:
        raise ConfigError(_bullet(f"invalid spec {source}", problems))
    warn_inert_keys(config)
    return config


def to_yaml(config: ExperimentConfig) -> str:
    """The fully resolved config as YAML (what ``--print-config`` shows and runs save)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def save_resolved_spec(config: ExperimentConfig, folder: str | Path) -> str:
    """Record the run: write the resolved spec as ``folder/spec.yaml`` (atomically; ``folder``
    a path or a URI); return where.

    The file is a complete spec: ``oi-ray <task> -e folder/spec.yaml`` repeats the run.
    """
    path = storage.join(str(folder), RESOLVED_SPEC_NAME)
    storage.write_atomically(path, to_yaml(config).encode())
    return path


def _read_spec(path: str) -> DictConfig:
    """The spec file at ``path``: a local path, or a URI (a fragment ``oi-ray pack`` wrote into a bucket)."""
    try:
        payload = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"spec file not found: {path}") from None
    try:
        spec = OmegaConf.load(io.BytesIO(payload))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(spec, DictConfig):
        raise ConfigError(f"{path}: the spec must be a mapping of sections, not a list")
    return spec


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {error}") from None


def _structure_problems(node: DictConfig, schema: type, source: str, prefix: str = "") -> Iterator[str]:
    """Yield a message per key the dataclass ``schema`` lacks and per section given a scalar."""
    hints = typing.get_type_hints(schema)
    valid = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = _suggestions(str(key), prefix, valid)
            if not close:
                hint = f"valid keys: {', '.join(valid)}"
            elif len(close) == 1:
                hint = f"did you mean '{close[0]}'?"
            else:
                hint = f"did you mean one of {', '.join(map(repr, close))}?"
            yield f"{dotted} ({source}): {hint}"
            continue
        value = node._get_node(key)
        entries = _dict_entry_dataclass(hints[key])
        if entries is not None and isinstance(value, DictConfig):  # a mapping of sections, e.g. search_space
            for name in value:
                entry = value._get_node(name)
                if isinstance(entry, DictConfig):
                    yield from _structure_problems(entry, entries, source, f"{dotted}.{name}.")
            continue
        child = _dataclass_of(hints[key])
        if child is None:
            continue
        if isinstance(value, DictConfig):
            yield from _structure_problems(value, child, source, f"{dotted}.")
        elif value._value() is not None:
            yield f"{dotted} ({source}): is a section; expected a mapping of keys, got {value._value()!r}"


def _suggestions(key: str, prefix: str, valid_here: Sequence[str]) -> list[str]:
    """Dotted keys the user probably meant by ``prefix + key``.

    First keys anywhere in the schema whose last part is ``key`` (a bare ``num_epochs`` ->
    ``train.num_epochs``), then a close name in the same section, then keys anywhere whose
    last part is close to ``key``.
    """
    everywhere = list(_schema_keys(ExperimentConfig))
    same_name = [dotted for dotted in everywhere if dotted.rsplit(".", 1)[-1] == key]
    if same_name:
        return same_name[:MAX_SUGGESTIONS]
    here = difflib.get_close_matches(key, valid_here, n=1, cutoff=0.6)
    if here:
        return [f"{prefix}{here[0]}"]
    by_name: dict[str, list[str]] = {}
    for dotted in everywhere:
        by_name.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    close = difflib.get_close_matches(key, list(by_name), n=MAX_SUGGESTIONS, cutoff=0.75)
    return [dotted for name in close for dotted in by_name[name]][:MAX_SUGGESTIONS]


def _schema_keys(schema: type, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the schema, sections included."""
    for field, hint in typing.get_type_hints(schema).items():
        yield f"{prefix}{field}"
        child = _dataclass_of(hint)
        if child is not None:
            yield from _schema_keys(child, f"{prefix}{field}.")


def _mapping_fields(node: DictConfig, schema: type, prefix: str = "") -> Iterator[str]:
    """Dotted keys in ``node`` whose schema type is a plain mapping (``dict[...]``)."""
    hints = typing.get_type_hints(schema)
    for key in node:
        hint = hints[key]
        child = _dataclass_of(hint)
        value = node._get_node(key)
        if child is not None and isinstance(value, DictConfig):
            yield from _mapping_fields(value, child, f"{prefix}{key}.")
        elif dict in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            yield f"{prefix}{key}"


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (unwrapping ``X | None``), or None for leaves and dicts."""
    if typing.get_origin(hint) is dict:
        return None
    candidates = typing.get_args(hint) or (hint,)
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate):
            return typing.cast(type, candidate)
    return None


def _dict_entry_dataclass(hint: Any) -> type | None:
    """For a ``dict[str, SomeDataclass]`` field, the dataclass of its values."""
    if typing.get_origin(hint) is dict:
        value = typing.get_args(hint)[1]
        return value if dataclasses.is_dataclass(value) else None
    return None


def _describe_type_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "spec"
    message = getattr(error, "msg", None) or str(error)
    return f"{key}: {message.splitlines()[0]}"


def _bullet(title: str, lines: Sequence[str]) -> str:
    return f"{title}:\n" + "\n".join(f"  - {line}" for line in lines)
