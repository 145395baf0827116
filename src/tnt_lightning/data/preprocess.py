"""Which preprocessing a backbone expects: mean, std, crop and interpolation, and where they came from.

A pretrained backbone only gives its accuracy on inputs prepared as in its own training: an AugReg
ViT expects mean = std = 0.5 and a 0.9 crop, a CLIP ViT OpenAI's statistics, DeiT ImageNet's with
DeiT's 0.875 crop. ``data.preprocess`` says where the values come from:

* ``model`` (the default): timm's pretrained configuration of ``model.timm_name`` (its tag decides,
  a name without a tag takes timm's default tag), with the keys the model config pins
  (``model.preprocess``: the paper's DeiT configs pin DeiT's official 0.875 crop) applied on top;
  a model timm has no pretrained configuration for takes its pinned keys over DeiT's values;
* ``deit``: DeiT's evaluation recipe (ImageNet mean and std, bicubic resize to 256, crop 224);
* ``given``: every key below, given by the user.

A key set under ``data.preprocess`` always overrides the source's value for that key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from ..errors import ConfigError
from ..results.identity import DEIT_PREPROCESSING, PREPROCESS_KEYS

PREPROCESS_SOURCES = ("model", "deit", "given")
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class Preprocessing:
    """Resolved preprocessing values and a sentence saying where they came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str
    interpolation: str
    origin: str

    def values(self) -> dict[str, Any]:
        """The values alone (lists, as in a config), without the origin."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "origin"}

    def describe(self) -> str:
        """One line for the log: the values and their origin."""
        mean = ", ".join(f"{v:.4g}" for v in self.mean)
        std = ", ".join(f"{v:.4g}" for v in self.std)
        return (
            f"mean ({mean}), std ({std}), crop_pct {self.crop_pct:g} ({self.crop_mode}), "
            f"{self.interpolation}; from {self.origin}"
        )

    def for_channels(self, channels: int) -> Preprocessing:
        """The same preprocessing for one-channel images: mean and std averaged over the channels."""
        if channels != 1 or len(self.mean) == 1:
            return self
        mean, std = (sum(self.mean) / len(self.mean),), (sum(self.std) / len(self.std),)
        return Preprocessing(mean, std, self.crop_pct, self.crop_mode, self.interpolation, self.origin)

    def eval_transform(self, image_size: int) -> transforms.Compose:
        """timm's evaluation transform for these values: resize to ``image_size / crop_pct`` (or as
        ``crop_mode`` says), centre crop ``image_size``, to tensor, normalise."""
        return create_transform(input_size=image_size, is_training=False, **self.values())


def pretrained_preprocessing(timm_name: str) -> tuple[dict[str, Any], str]:
    """The preprocessing values of timm's pretrained configuration for ``timm_name``, and its full
    name with the tag (metadata timm ships: no weights are read).

    Raises:
        ConfigError: timm knows no pretrained configuration of that name or tag.
    """
    from timm.models import get_pretrained_cfg

    try:
        pretrained = get_pretrained_cfg(timm_name)
    except RuntimeError as e:  # an unknown tag
        raise ConfigError(f"model.timm_name={timm_name!r}: {e}") from e
    if pretrained is None:
        raise ConfigError(f"model.timm_name={timm_name!r} has no pretrained configuration in timm")
    resolved = resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items() if k in PREPROCESS_KEYS}
    arch = timm_name.split(".", 1)[0]
    return values, f"{arch}.{pretrained.tag}" if pretrained.tag else arch


def resolve_preprocessing(
    preprocess: Mapping[str, Any],
    timm_name: str | None = None,
    pinned: Mapping[str, Any] | None = None,
    model_name: str = "the model",
) -> Preprocessing:
    """The preprocessing ``data.preprocess`` asks for, for a backbone with ``timm_name``.

    Args:
        preprocess: ``data.preprocess``: ``source`` and any of :data:`PREPROCESS_KEYS`.
        timm_name: the backbone's timm model name, tag included, or None (a model built from
            ``model.arch``).
        pinned: the model config's own ``model.preprocess`` values (applied over timm's).
        model_name: the model's config name, for messages.

    Returns:
        The resolved :class:`Preprocessing`.

    Raises:
        ConfigError: an unknown source or key, a ``given`` source with keys missing, or a value out
            of range.
    """
    preprocess = dict(preprocess)
    source = preprocess.pop("source", "model")
    preprocess.pop("origin", None)
    if source not in PREPROCESS_SOURCES:
        raise ConfigError(f"data.preprocess.source={source!r} is not one of {list(PREPROCESS_SOURCES)}")
    unknown = sorted(set(preprocess) - set(PREPROCESS_KEYS))
    if unknown:
        raise ConfigError(
            f"data.preprocess has unknown keys {unknown}; allowed: {['source', *PREPROCESS_KEYS]}"
        )
    given = {k: v for k, v in preprocess.items() if v is not None}
    pinned = {k: v for k, v in (pinned or {}).items() if v is not None}
    if source == "deit":
        values, origin = dict(DEIT_PREPROCESSING), "DeiT's evaluation recipe (data.preprocess.source=deit)"
    elif source == "given":
        missing = [k for k in PREPROCESS_KEYS if k not in given]
        if missing:
            raise ConfigError(f"data.preprocess.source=given needs every key; missing: {missing}")
        values, origin = {}, "the values given in data.preprocess"
    elif timm_name is not None:
        values, full_name = pretrained_preprocessing(timm_name)
        origin = f"timm's pretrained config of {full_name}"
        if pinned:
            values.update(pinned)
            origin += f", with {sorted(pinned)} pinned by model={model_name}"
    else:
        values = {**DEIT_PREPROCESSING, **pinned}
        origin = f"model={model_name} (no timm pretrained config: DeiT's values"
        origin += f", {sorted(pinned)} pinned by its config)" if pinned else ")"
    if given and source != "given":
        origin += f", with {sorted(given)} set in data.preprocess"
    values.update(given)
    return _checked(values, origin)


def _checked(values: dict[str, Any], origin: str) -> Preprocessing:
    mean, std = _floats(values["mean"], "mean"), _floats(values["std"], "std")
    if len(mean) != len(std):
        raise ConfigError(f"data.preprocess: mean {list(mean)} and std {list(std)} differ in length")
    if any(s <= 0 for s in std):
        raise ConfigError(f"data.preprocess.std={list(std)} must be positive")
    crop_pct = values["crop_pct"]
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float) or not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"data.preprocess.crop_pct={crop_pct!r} is not allowed: a number in (0, 1]")
    if values["crop_mode"] not in CROP_MODES:
        raise ConfigError(
            f"data.preprocess.crop_mode={values['crop_mode']!r} is not one of {list(CROP_MODES)}"
        )
    if values["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(
            f"data.preprocess.interpolation={values['interpolation']!r} is not one of {list(INTERPOLATIONS)}"
        )
    return Preprocessing(mean, std, float(crop_pct), values["crop_mode"], values["interpolation"], origin)


def _floats(value: Any, key: str) -> tuple[float, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (1, 3)
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"data.preprocess.{key}={value!r} is not allowed: a list of 1 or 3 numbers")
    return tuple(float(v) for v in value)
