"""YAML configuration with bundled presets and command-line overrides.

An app keeps its presets in ``roga_cuda/apps/<app>/presets/``. ``default.yaml`` is the
schema: it lists every key with its default value (and so its type). Every other preset,
a user file (``path``) and the ``overrides`` are merged over it in that order, and may
only set keys that ``default.yaml`` has: an unknown key is an error naming the key, where
it came from, and the closest known keys.

Overrides are ``a.b=value`` strings. A key without a dot may also be a leaf name that is
unique in the schema (``lr=0.01`` for ``optim.lr``). Values are parsed by the type of the
default: ``bool`` accepts true/false/yes/no/on/off/1/0, ``int`` and ``float`` the usual
literals (``1e-3`` too), ``str`` is taken verbatim, lists and dicts as YAML
(``domains=[df,fs]``); ``null``/``none`` sets any key to None, and a key whose default is
None takes any YAML value.

Renamed keys: ``presets/_renamed_keys.yaml`` (optional) maps old dotted names to new ones
(``optimizer: method``). Old names in presets, files (e.g. the ``config.yaml`` of an
earlier run) and overrides still work and give a :class:`FutureWarning` naming the new key.
"""
import copy
import difflib
import os
import re
import warnings

import yaml

__all__ = ["Config", "ConfigError", "load_config", "save_config", "preset_dir", "list_presets", "parse_override"]


class ConfigError(ValueError):
    """Bad configuration: unknown key, wrong type, unreadable file, unknown preset."""


class Config(dict):
    """A nested dict whose keys are also attributes (``cfg.optim.lr``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; keys: {sorted(self)}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _wrap(d):
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


def preset_dir(app):
    """``roga_cuda/apps/<app>/presets``; ``app`` may also be a path to a presets folder."""
    if os.sep in app or (os.altsep and os.altsep in app):
        return app
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), app, "presets")


def list_presets(app):
    d = preset_dir(app)
    if not os.path.isdir(d):
        return []
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml") and not f.startswith("_"))


RENAMED_FILE = "_renamed_keys.yaml"


def _renamed(pdir):
    """{old dotted key: new dotted key} of an app (empty when it has no rename file)."""
    path = os.path.join(pdir, RENAMED_FILE)
    return {str(k): str(v) for k, v in _read_yaml(path).items()} if os.path.isfile(path) else {}


def _warn_renamed(old, new, where):
    warnings.warn(f"config key {old!r} (from {where}) is now called {new!r}; the old name still works for now",
                  FutureWarning, stacklevel=4)


def _apply_renames(data, renamed, where):
    """``data`` (a nested dict from a file) with renamed keys moved to their new place."""
    if not renamed:
        return data
    out = copy.deepcopy(data)

    def walk(d, prefix):
        for k in list(d):
            key = f"{prefix}{k}"
            if key in renamed:
                v = d.pop(k)
                _warn_renamed(key, renamed[key], where)
                node = out
                *parents, leaf = renamed[key].split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = v
            elif isinstance(d[k], dict):
                walk(d[k], key + ".")
                if not d[k] and any(r.startswith(key + ".") for r in renamed):
                    del d[k]  # a section that held only renamed keys (e.g. ``log:``)

    walk(out, "")
    return out


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value, default, where):
    """Convert ``value`` (from YAML or a command-line string) to the type of ``default``."""
    if value is None or default is None:
        return value
    from_str = isinstance(value, str) and not isinstance(default, str)
    if from_str and value.strip().lower() in ("null", "none", "~"):
        return None
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
                return str(value).strip().lower() in _TRUE
            raise ValueError("expected true/false")
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError("expected an integer, got a boolean")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("expected an integer")
                return int(value)
            return int(value) if isinstance(value, int) else int(str(value).strip().replace("_", ""))
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError("expected a number, got a boolean")
            return float(value)
        if isinstance(default, str):
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
        if isinstance(default, (list, dict)):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(default, list) and isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, type(default)) and value is not None:
                raise ValueError(f"expected a {type(default).__name__}")
            return value
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: cannot use {value!r} for a {type(default).__name__} setting ({e})") from None
    return value


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key


def _unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} (from {where}){hint}")


def _merge(base, upd, where, prefix=""):
    """Merge ``upd`` into ``base`` in place; keys must exist in ``base`` (the schema)."""
    for k, v in upd.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise _unknown(key, list(_leaves(base, prefix)) + list(base), where)
        if isinstance(base[k], dict) and base[k]:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {key} is a section (keys {sorted(base[k])}), got {v!r}")
            _merge(base[k], v, where, key + ".")
        else:
            base[k] = _coerce(v, base[k], f"{where}: {key}")


def parse_override(text, schema, renamed=None):
    """``'a.b=value'`` -> (('a', 'b'), value converted to the schema's type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    if renamed and key in renamed:
        _warn_renamed(key, renamed[key], f"override {text!r}")
        key = renamed[key]
    path = key.split(".")
    if len(path) == 1 and key not in schema:  # a unique leaf name is a shortcut
        matches = [leaf for leaf in _leaves(schema) if leaf.split(".")[-1] == key]
        if len(matches) == 1:
            path = matches[0].split(".")
        elif len(matches) > 1:
            raise ConfigError(f"override {text!r}: {key!r} is ambiguous, write one of {', '.join(matches)}")
    node = schema
    for i, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            raise _unknown(".".join(path[:i + 1]), list(_leaves(schema)), f"override {text!r}")
        if i < len(path) - 1:
            node = node[part]
    default = node[path[-1]]
    if isinstance(default, dict) and default:
        raise ConfigError(f"override {text!r}: {key} is a section; set one of its keys, e.g. {key}.{next(iter(default))}=...")
    if default is None:  # no type to go by: read the value as YAML (numbers, lists, null, strings)
        return tuple(path), _yaml_scalar(raw, text)
    return tuple(path), _coerce(raw, default, f"override {text!r}")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _yaml_scalar(raw, text):
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value as YAML ({e})") from None
    if isinstance(v, str) and _FLOAT.match(v.strip()):  # YAML 1.1 reads 1e-3 as a string
        return float(v)
    return v


def load_config(preset=None, path=None, overrides=(), *, app):
    """Resolve ``<app>/presets/default.yaml`` <- preset <- file(s) ``path`` <- ``overrides``.

    Returns a :class:`Config`. ``preset`` is a bundled preset name (see
    :func:`list_presets`) or a path to a YAML file; ``path`` a file or a list of files
    (or of dicts, e.g. a checkpoint's stored config) merged in order."""
    pdir = preset_dir(app)
    default_path = os.path.join(pdir, "default.yaml")
    if not os.path.isfile(default_path):
        raise ConfigError(f"app {app!r} has no presets/default.yaml (looked in {pdir})")
    cfg = _read_yaml(default_path)
    renamed = _renamed(pdir)
    if preset not in (None, "", "default"):
        ppath = preset if (os.sep in preset or preset.endswith((".yaml", ".yml"))) else os.path.join(pdir, preset + ".yaml")
        if not os.path.isfile(ppath) or os.path.basename(ppath).startswith("_"):
            raise ConfigError(f"unknown preset {preset!r} for {app}; bundled presets: {', '.join(list_presets(app))}")
        where = f"preset {preset!r}"
        _merge(cfg, _apply_renames(_read_yaml(ppath), renamed, where), where)
    for f in ([path] if isinstance(path, (str, os.PathLike, dict)) else (path or ())):
        if isinstance(f, dict):  # e.g. the config stored in a checkpoint
            where, data = "the stored config", f
        else:
            where, data = f"config file {f}", _read_yaml(f)
        _merge(cfg, _apply_renames(data, renamed, where), where)
    for text in overrides or ():
        keys, value = parse_override(text, cfg, renamed)
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return _wrap(cfg)


def save_config(cfg, path):
    """Write the resolved config as YAML (the run folder's ``config.yaml``)."""
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
    return path
