"""Find a model's weights inside the checkpoints training code really writes.

A weights file is read without unpickling objects (`torch.load(weights_only=True)`, safetensors,
or a sharded safetensors index) and may be a container rather than a plain state_dict:

- a DataParallel / DistributedDataParallel `state_dict()`: every key starts with `module.`;
- `torch.compile(model).state_dict()`: every key starts with `_orig_mod.`;
- a training loop's `{"state_dict": {...}, "epoch": 3}`;
- a PyTorch Lightning `.ckpt`: `{"state_dict": {"model.conv1.weight": ...}, "optimizer_states": [...]}`;
- timm-style `{"model": ..., "model_ema": ...}` or `{"state_dict": ..., "state_dict_ema": ...}`.

A *reading* is a container (a path of keys from the top of the file) and a prefix to strip. Explicit
options win; whatever they leave open is detected, and detection accepts a reading only when it is
the one reading under which the model's keys are exactly the file's keys (never a partial or
guessed load). No reading, or several, is refused with the closest fix or the choices named.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from .errors import ConfigError

INDEX_SUFFIX = ".safetensors.index.json"
MAX_DEPTH = 3  # containers inside containers: Lightning keeps its weights one level down


@dataclass(frozen=True)
class UnwrapOptions:
    """How to find the weights in a file; None means detect."""

    checkpoint_key: Optional[str] = None  # path of keys to the weights, "/"-separated; "" = the top level
    strip_prefix: Optional[str] = None  # "" = strip nothing
    detect: bool = True  # False: what is not given is the top level and no prefix
    keep_dtype: bool = False  # True: the model takes the weights' dtype instead of casting them
    ignore_keys: tuple[str, ...] = ()  # weights (named as the model names them) starting with these are dropped

    @classmethod
    def from_settings(cls, settings: Any) -> "UnwrapOptions":
        """The options from EncoderSettings (or anything with the same attributes)."""
        return cls(settings.checkpoint_key, settings.strip_prefix, settings.checkpoint_detect,
                   settings.keep_weights_dtype, tuple(settings.ignore_keys))

    def drops(self, key: str) -> bool:
        """`key` (prefix already stripped) is one of the weights ignore_keys leaves out."""
        return key.startswith(self.ignore_keys)  # False for no prefixes


@dataclass(frozen=True)
class Reading:
    """One interpretation of a file: the container's key path and the prefix stripped from its keys."""

    path: tuple[str, ...]
    prefix: str

    def describe(self) -> str:
        parts = ([f"took `{'/'.join(self.path)}`"] if self.path else []) + (
            [f"stripped `{self.prefix}`"] if self.prefix else [])
        return ", ".join(parts) or "took the top level"

    def as_flags(self) -> str:
        """The build_mar.py flags that choose this reading."""
        parts = ([f"--checkpoint-key {'/'.join(self.path)}"] if self.path else []) + (
            [f"--strip-prefix {self.prefix}"] if self.prefix else [])
        return " ".join(parts) or "--checkpoint-key '' --strip-prefix ''"

    def as_settings(self) -> str:
        """The handler settings that choose this reading."""
        parts = ([f"checkpoint_key: {'/'.join(self.path)}"] if self.path else []) + (
            [f"strip_prefix: {self.prefix}"] if self.prefix else [])
        return ", ".join(parts) or "checkpoint_key: '', strip_prefix: ''"


@dataclass
class Unwrapped:
    """The weights found, how, and what was left out."""

    state: dict[str, torch.Tensor]
    reading: Reading
    ignored: list[str] = field(default_factory=list)  # entries outside the chosen weights
    dropped: list[str] = field(default_factory=list)  # weights left out by ignore_keys

    @property
    def whole_file(self) -> bool:
        """The weights are the file's top level itself: nothing taken, stripped or ignored."""
        return not self.reading.path and not self.reading.prefix and not self.ignored

    @property
    def is_plain(self) -> bool:
        """The file already was the plain state_dict: the whole file, and nothing dropped."""
        return self.whole_file and not self.dropped

    def summary(self) -> str:
        what = "a plain state_dict" if self.whole_file else self.reading.describe()
        text = f"{what}: {len(self.state)} tensors"
        for verb, names in (("ignored", self.ignored), ("dropped (ignore_keys)", self.dropped)):
            if names:
                text += f"; {verb} " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        return text


def read_weights(path: str, device: str = "cpu", shown_as: Optional[str] = None) -> Mapping[str, Any]:
    """The file's content, never unpickling objects: a mapping (state_dict or checkpoint container).

    `shown_as` is the name errors give the file (the user's own path, not a staged copy).
    """
    name = shown_as or path
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {name!r} does not exist")
    if path.endswith(INDEX_SUFFIX):
        return _read_sharded(path, device, name)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, device, name)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"weights file {name!r} was refused: it is not a plain state_dict that loads with "
            f"weights_only=True (objects are never unpickled). {_refusal_reason(exc)}"
        ) from exc
    if not isinstance(state, Mapping):
        raise ConfigError(f"weights file {name!r} holds a {type(state).__name__}, expected a state_dict mapping")
    return state


def _refusal_reason(exc: Exception) -> str:
    """torch's reason in one line: which global would have to be unpickled, when that is the reason."""
    text = str(exc)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        name = text.split(marker, 1)[1].split()[0]
        return (f"It holds a pickled `{name}`, which would have to be unpickled (that can run code). "
                f"Save only tensors and plain containers, e.g. torch.save(model.state_dict(), path).")
    return f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def _read_safetensors(path: str, device: str, name: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ConfigError("weights are .safetensors but the safetensors package is not installed") from exc
    try:
        return load_file(path, device=str(device))
    except Exception as exc:
        raise ConfigError(f"reading safetensors file {name!r} failed: {exc}") from exc


def _read_sharded(path: str, device: str, name: str) -> dict[str, torch.Tensor]:
    """Hugging Face's sharded layout: an index whose `weight_map` names the shard of every tensor."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"safetensors index {name!r} is not an index with a `weight_map`: {exc}") from exc
    folder, shown_folder = os.path.dirname(path), os.path.dirname(name)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ConfigError(f"safetensors index {name!r} names shard {shard!r}: shards are file names "
                              "beside the index, like model-00001-of-00002.safetensors")
        shard_path = os.path.join(folder, shard)
        shown = os.path.join(shown_folder, shard)
        if not os.path.isfile(shard_path):
            raise ConfigError(f"safetensors index {name!r} names shard {shard!r}, but {shown!r} does not exist")
        tensors = _read_safetensors(shard_path, device, shown)
        wanted = sorted(k for k, v in weight_map.items() if v == shard)
        absent = [k for k in wanted if k not in tensors]
        if absent:
            raise ConfigError(f"shard {shown!r} lacks {absent[:5]} that index {name!r} puts there")
        state.update({k: tensors[k] for k in wanted})
    return state


def unwrap(content: Mapping[str, Any], model_keys: Sequence[str], options: UnwrapOptions = UnwrapOptions(),
           source: str = "weights") -> Unwrapped:
    """The model's state_dict inside `content`, per `options`; refuses anything but one exact reading."""
    expected = set(model_keys)
    containers = dict(_containers(content))
    allowed_paths = list(containers)
    if options.checkpoint_key is not None:
        path = tuple(p for p in options.checkpoint_key.split("/") if p)
        if path not in containers:
            raise ConfigError(_no_such_container(content, path, source))
        allowed_paths = [path]
    elif not options.detect:
        allowed_paths = [()]
    matches = []
    for path in allowed_paths:
        tensors = _tensors(containers[path])
        prefixes = _prefix_candidates(tensors, expected)
        if options.strip_prefix is not None:
            prefixes = [options.strip_prefix]
        elif not options.detect:
            prefixes = [""]
        for prefix in prefixes:
            if _kept(_selected(tensors, prefix), options) == expected:
                matches.append(Reading(path, prefix))
    if len(matches) > 1:
        choices = "; ".join(f"{m.describe()} ({m.as_flags()})" for m in matches)
        raise ConfigError(
            f"{source} hold several complete sets of weights for this model: {choices}. Choose one with "
            f"--checkpoint-key / --strip-prefix (handler settings checkpoint_key, strip_prefix)"
        )
    if not matches:
        raise ConfigError(_mismatch(containers, expected, options, source))
    reading = matches[0]
    container = containers[reading.path]
    inside = [k for k in container if str(k).startswith(reading.prefix)]
    strays = [k for k in inside if not isinstance(container[k], torch.Tensor)]
    if strays:
        raise ConfigError(
            f"{source}: {', '.join(repr(k) for k in strays[:5])} sit among the weights "
            f"({reading.describe()}) but are {type(container[strays[0]]).__name__}, not tensors"
        )
    state = {k[len(reading.prefix):]: container[k] for k in inside}
    dropped = sorted(k for k in state if options.drops(k))
    for key in dropped:
        del state[key]
    return Unwrapped(state, reading, _ignored(content, reading), dropped)


def _containers(obj: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """Every mapping in the file (the top level first) up to MAX_DEPTH keys down."""
    yield path, obj
    if len(path) >= MAX_DEPTH:
        return
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Mapping):
            yield from _containers(value, path + (key,))


def _tensors(container: Mapping) -> dict[str, torch.Tensor]:
    return {k: v for k, v in container.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _selected(tensors: Mapping[str, torch.Tensor], prefix: str) -> set[str]:
    return {k[len(prefix):] for k in tensors if k.startswith(prefix)}


def _kept(keys: set[str], options: UnwrapOptions) -> set[str]:
    return {k for k in keys if not options.drops(k)}


def _prefix_candidates(tensors: Mapping[str, torch.Tensor], expected: set[str]) -> list[str]:
    """"" and every dotted prefix p for which some key here is p + a model key."""
    found = {""}
    for key in tensors:
        cut = key.find(".")
        while cut != -1:
            if key[cut + 1:] in expected:
                found.add(key[: cut + 1])
            cut = key.find(".", cut + 1)
    return sorted(found)


def _ignored(content: Mapping[str, Any], reading: Reading) -> list[str]:
    """Names of what the chosen reading leaves out: sibling entries on the way down, other prefixes."""
    ignored: list[str] = []
    node: Mapping = content
    for depth, key in enumerate(reading.path):
        ignored += ["/".join([*reading.path[:depth], str(k)]) for k in node if k != key]
        node = node[key]
    if reading.prefix:
        where = "/".join(reading.path)
        ignored += [f"{where}/{k}" if where else str(k) for k in node if not str(k).startswith(reading.prefix)]
    return ignored


def _no_such_container(content: Mapping[str, Any], path: tuple[str, ...], source: str) -> str:
    node: Any = content
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            here = "/".join(path[:depth]) or "the top level"
            entries = [repr(k) for k, v in node.items() if isinstance(v, Mapping)] if isinstance(node, Mapping) else []
            return (f"checkpoint_key {'/'.join(path)!r}: {source} have no mapping {key!r} at {here}; "
                    f"mappings there: {', '.join(entries) or 'none'}")
        node = node[key]
    return f"checkpoint_key {'/'.join(path)!r} in {source} is not a mapping"


def _mismatch(containers: dict, expected: set[str], options: UnwrapOptions, source: str) -> str:
    """Why nothing matched: the reading that was asked for, and the closest reading with its fix."""
    asked = Reading(tuple(p for p in (options.checkpoint_key or "").split("/") if p), options.strip_prefix or "")
    best, best_score = asked, -1
    for path, container in containers.items():
        tensors = _tensors(container)
        prefixes = set(_prefix_candidates(tensors, expected)) | _common_prefixes(tensors)
        for prefix in sorted(prefixes):
            selected = _kept(_selected(tensors, prefix), options)
            score = len(selected & expected) - len(selected - expected)
            if score > best_score or (score == best_score and Reading(path, prefix) == asked):
                best, best_score = Reading(path, prefix), score
    shown = asked if asked.path in containers else Reading((), "")
    shown_keys = _kept(_selected(_tensors(containers[shown.path]), shown.prefix), options)
    message = f"{source} do not match the model ({shown.describe()}): " + _key_diff(shown_keys, expected)
    if best == shown:
        return message + _drop_hint(shown_keys, expected)
    selected = _kept(_selected(_tensors(containers[best.path]), best.prefix), options)
    if selected == expected:
        tensors = _tensors(containers[best.path])
        lead = (f"Every key{' of `' + '/'.join(best.path) + '`' if best.path else ''} starts with `{best.prefix}`: every"
                if best.prefix and all(k.startswith(best.prefix) for k in tensors) else "Every")
        return (message + f". {lead} model key is found when you {_fix_words(best)}: "
                f"add {best.as_flags()} (handler settings {best.as_settings()})")
    return (message + f". The closest reading, {best.describe()}, matches {len(selected & expected)} of "
            f"{len(expected)} model keys ({best.as_flags()}): " + _key_diff(selected, expected)
            + "; a partial load is never done")


def _drop_hint(given: set[str], expected: set[str]) -> str:
    """When every model key is there with more beside it: the --ignore-keys flags that drop exactly the rest."""
    extra = given - expected
    if not extra or not expected <= given:
        return ""
    prefixes = set()
    for key in extra:  # the shortest dotted prefix of the key that no model key starts with, else the key
        cut = key.find(".")
        while cut != -1 and any(k.startswith(key[: cut + 1]) for k in expected):
            cut = key.find(".", cut + 1)
        prefixes.add(key[: cut + 1] if cut != -1 else key)
    prefixes = sorted(p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes))
    flags = " ".join(f"--ignore-keys {p}" for p in prefixes)
    return (f". Every model key is there, with {len(extra)} more the model does not have: "
            f"to drop exactly those, add {flags} (handler setting ignore_keys: {prefixes})")


def _fix_words(reading: Reading) -> str:
    parts = []
    if reading.path:
        parts.append(f"take `{'/'.join(reading.path)}`")
    if reading.prefix:
        parts.append(f"strip `{reading.prefix}`")
    return " and ".join(parts) or "read the top level as it is"


def _common_prefixes(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Dotted prefixes every key shares (`module.`, `module.backbone.`), for hints on partial matches."""
    keys = list(tensors)
    if not keys:
        return set()
    common = os.path.commonprefix(keys)
    found, cut = set(), common.find(".")
    while cut != -1:
        found.add(common[: cut + 1])
        cut = common.find(".", cut + 1)
    return found


def _key_diff(given: set[str], expected: set[str]) -> str:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    return (f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")


def dtype_changes(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], int]:
    """How many floating tensors of `state` differ in dtype from the model's: {(from, to): count}."""
    own = model.state_dict()
    changes: dict[tuple[str, str], int] = {}
    for key, tensor in state.items():
        target = own.get(key)
        if target is not None and tensor.is_floating_point() and target.is_floating_point() and tensor.dtype != target.dtype:
            pair = (str(tensor.dtype).replace("torch.", ""), str(target.dtype).replace("torch.", ""))
            changes[pair] = changes.get(pair, 0) + 1
    return changes


def weights_dtype(state: Mapping[str, torch.Tensor], source: str = "weights") -> Optional[torch.dtype]:
    """The one floating dtype of the weights (None without floating tensors); several are refused."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ConfigError(f"keep_weights_dtype: {source} mix dtypes {sorted(str(d) for d in dtypes)}; "
                          f"the model can take only one")
    return dtypes.pop() if dtypes else None


def keep_weights_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convert the model to the weights' dtype and cast its floating inputs to match."""
    model.to(dtype)

    def cast_inputs(module: torch.nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    model.register_forward_pre_hook(cast_inputs)
