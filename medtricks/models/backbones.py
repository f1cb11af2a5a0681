"""Backbone factory: any timm model or MONAI 2D net, with verified pretrained weights.

:func:`create_model` builds the network, loads the requested weights (strictly: every tensor name
and shape is checked, nothing falls back to random init), converts the first convolution to
``in_chans`` (for gray input: the RGB kernels summed, weighted so that a gray image gives the same
outputs as the RGB model on the replicated image; see :func:`adapt_input_channels`), then
replaces the classifier for ``num_classes``. The model carries ``model.medtricks_info``: where
its weights came from (with the file's sha256) and the normalization the data layer must use.

Example::

    >>> from medtricks.models import create_model, get_data_config
    >>> model = create_model("efficientnet_lite0", weights="imagenet", num_classes=2, in_chans=1)
    >>> get_data_config(model)
    {'mean': (0.5,), 'std': (0.5,), 'input_size': (1, 224, 224)}
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from medtricks.errors import ConfigError
from medtricks.models import weights as zoo
from medtricks.models.layout import classifier_names, find_backbone, first_convs, stage_of_parameter
from medtricks.models.model_names import ALIASES, MONAI_ARCHS, resolve_model_name
from medtricks.models.state_dict import (
    default_key_map,
    load_strict,
    normalize_state_dict,
    parse_file_spec,
    read_state_dict,
)
from medtricks.models.tweaks import add_attention
from medtricks.models.vit_locality import check_locality, locality_kwargs, use_locality_attention

# ALIASES, MONAI_ARCHS, resolve_model_name (names.py), stage_of_parameter and find_backbone
# (layout.py) live below this module and are re-exported: they were defined here before.
__all__ = [
    "ALIASES",
    "MONAI_ARCHS",
    "resolve_model_name",
    "create_model",
    "get_data_config",
    "stage_of_parameter",
    "find_backbone",
    "channel_stats",
    "adapt_input_channels",
]


# ------------------------------------------------------------------------------------ building
def _build_monai(name: str, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    from monai.networks import nets

    if name == "monai:densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=in_chans, out_channels=num_classes, **kwargs)
    depth = name[len("monai:resnet") :]
    # torchvision's ResNet layout (7x7/2 stem, no downsample bias) so torchvision and
    # Stylized-ImageNet weights load tensor for tensor; MONAI's defaults are for 3D volumes.
    options = dict(
        spatial_dims=2,
        n_input_channels=in_chans,
        num_classes=num_classes,
        conv1_t_size=7,
        conv1_t_stride=2,
        bias_downsample=False,
        shortcut_type="B",
    )
    options.update(kwargs)
    return getattr(nets, f"resnet{depth}")(**options)


def _build(
    name: str, *, num_classes: int, in_chans: int, drop_rate: float, kwargs: dict, pretrained_file: Optional[str] = None
) -> nn.Module:
    """A fresh model; with ``pretrained_file`` (timm only) loaded by timm's pretrained loader."""
    if name.startswith("monai:"):
        if drop_rate:
            raise ConfigError(
                f"drop_rate={drop_rate} is not supported for {name}; MONAI nets take "
                "their own dropout options through model.kwargs (e.g. dropout_prob "
                "for monai:densenet121)"
            )
        return _build_monai(name, num_classes, in_chans, kwargs)
    import timm

    if pretrained_file is None:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **kwargs
        )
    # timm's own loader: applies the model's checkpoint filter and loads strictly (num_classes and
    # in_chans equal the checkpoint's, so no key is dropped or adapted).
    return timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": pretrained_file},
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        **kwargs,
    )


def _reset_head(model: nn.Module, name: str, num_classes: int) -> None:
    if not name.startswith("monai:"):
        model.reset_classifier(num_classes)
        return
    path = MONAI_ARCHS[name]["classifier"]
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes))


def _head_classes(state_dict: dict, classifiers: tuple[str, ...]) -> Optional[int]:
    for classifier in classifiers:
        weight = state_dict.get(f"{classifier}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization for ``in_chans`` inputs from a pretrained model's per-channel statistics.

    1 channel: the mean of the channel means and of the channel stds, rounded to 6 decimals
    (ImageNet: ``(0.449,)``, ``(0.226,)``); :func:`adapt_input_channels` builds the gray stem for
    exactly these values. More channels: cycled, as ``adapt_input_conv`` repeats kernels.

    Example: ``channel_stats((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1)`` → ``((0.5,), (0.5,))``.
    """
    if len(mean) == in_chans:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if in_chans == 1:
        return (round(sum(mean) / len(mean), 6),), (round(sum(std) / len(std), 6),)
    return (
        tuple(float(mean[i % len(mean)]) for i in range(in_chans)),
        tuple(float(std[i % len(std)]) for i in range(in_chans)),
    )


def _default_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int]]:
    if name.startswith("monai:"):
        return zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, (224, 224)
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, (224, 224)
    return tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size[1:])


def _check_args(num_classes: Any, in_chans: Any, drop_rate: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise ConfigError(f"in_chans must be a positive integer (1 for gray, 3 for RGB), got {in_chans!r}")
    if not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")


def create_model(
    name: str,
    *,
    weights: str = "none",
    num_classes: int = 2,
    in_chans: int = 1,
    drop_rate: float = 0.0,
    attention: Optional[str] = None,
    attention_stages: Optional[list[int]] = None,
    spt: bool = False,
    lsa: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build ``name`` with ``weights``, a ``num_classes`` head and ``in_chans`` input channels.

    Args:
        name: any timm model name (``resnet50``, ``resnet50d``, ``seresnet50``, ``name.tag``);
            ``efficientnet_lite0|1|2`` are aliases of ``tf_efficientnet_lite0|1|2`` (``timm:NAME`` skips
            aliases); ``monai:densenet121`` and ``monai:resnet18|34|50`` build MONAI 2D nets.
        weights: ``none`` (random init, the only way to get one), ``imagenet``, ``sin``,
            ``sin_in``, ``sin_in_in`` (ResNet-50, Geirhos et al. 2019), or
            ``file:/path/ckpt.pth[#sha256=HEX]`` (a state dict, possibly under ``state_dict``, with
            ``module.`` prefixes; loaded with ``torch.load(weights_only=True)``).
        num_classes: classifier outputs; the pretrained head is kept only if it already has this
            many outputs, else replaced after the weights are loaded.
        in_chans: input channels; for 1 the pretrained RGB stem becomes a gray stem that gives
            the same outputs on a gray image as the RGB model on its replicated channels (see
            :func:`adapt_input_channels`).
        drop_rate: dropout before the classifier (timm models).
        attention: ``"se"`` or ``"cbam"`` inserts zero-gated attention into late stages (see
            :func:`medtricks.models.tweaks.add_attention`); ``attention_stages`` picks the stages.
        spt, lsa: Shifted Patch Tokenization / Locality Self-Attention (Lee et al. 2021) for a timm
            ViT/DeiT (:mod:`medtricks.models.vit_locality`); other models are refused. SPT needs
            ``weights="none"``; LSA with pretrained weights converts the loaded attention layers (the
            temperature starts at their fixed scale).
        **timm_kwargs: passed to ``timm.create_model`` (or the MONAI constructor).

    Returns:
        The model, with ``model.medtricks_info`` (plain dict: ``name, weights, weights_source,
        weights_sha256, mean, std, input_size, in_chans, num_classes, head, input_adaptation,
        attention, attention_blocks, spt, lsa``).

    Raises:
        ValueError: bad argument, weights that do not fit, hash mismatch.
        WeightsUnavailableError: weights not cached and not downloadable (the message says where
            to put the file).
    """
    _check_args(num_classes, in_chans, drop_rate)
    if not isinstance(weights, str) or not weights:
        raise ConfigError(
            f"weights must be 'none', one of {', '.join(zoo.WEIGHT_NAMES)} or "
            f"'file:/path[#sha256=HEX]', got {weights!r}"
        )
    resolved = resolve_model_name(name)
    kwargs = dict(timm_kwargs)
    # SPT/LSA layers go to timm's constructor (refused before anything is built or fetched for a
    # non-ViT or SPT with pretrained weights); LSA on pretrained weights is converted after the load.
    kwargs.update(locality_kwargs(resolved, spt=spt, lsa=lsa, weights=weights, kwargs=kwargs))
    mean, std, size = _default_stats(resolved)
    source, sha256, head, adaptation = None, None, "random", None

    if weights == "none":
        model = _build(resolved, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, kwargs=kwargs)
        inserted = _insert_attention(model, attention, attention_stages)
    else:
        if weights.startswith("file:"):
            path, expected = parse_file_spec(weights)
            sha256 = zoo.check_file_hash(path, expected, what=f"weights {weights!r}")
            source, key_map, timm_hub = str(path.resolve()), default_key_map(resolved), False
        else:
            entry = zoo.entry_for(weights, resolved)
            path, sha256 = zoo.resolve_entry_file(entry)
            mean, std = entry.mean, entry.std
            source, key_map, timm_hub = entry.source, entry.key_map, entry.timm_hub
        what = f"weights {weights!r} ({path.name})"
        if timm_hub:
            # timm hub weights: timm's own loader (its checkpoint filters), strict because the
            # head size and input channels equal the checkpoint's; both are adapted after.
            cfg_classes, src_chans = _timm_pretrained_shape(resolved)
            model = _build(
                resolved,
                num_classes=cfg_classes,
                in_chans=src_chans,
                drop_rate=drop_rate,
                kwargs=kwargs,
                pretrained_file=str(path),
            )
            head = "pretrained"
            if cfg_classes != num_classes:
                model.reset_classifier(num_classes)
                head = "new"
            inserted = _insert_attention(model, attention, attention_stages)
        else:
            model, head, src_chans, inserted = _from_state_dict(
                resolved,
                read_state_dict(path),
                key_map=key_map,
                num_classes=num_classes,
                drop_rate=drop_rate,
                kwargs=kwargs,
                attention=attention,
                attention_stages=attention_stages,
                what=what,
            )
        if src_chans != in_chans:
            src_mean, src_std = channel_stats(tuple(mean), tuple(std), src_chans)
            adaptation = adapt_input_channels(
                model, in_chans, src_mean, src_std, first_convs=first_convs(model, resolved)
            )

    if lsa and weights != "none":
        use_locality_attention(model)
    check_locality(model, resolved, spt=spt, lsa=lsa)
    mean, std = channel_stats(tuple(mean), tuple(std), in_chans)
    model.medtricks_info = {
        "name": resolved,
        "weights": weights,
        "weights_source": source,
        "weights_sha256": sha256,
        "mean": mean,
        "std": std,
        "input_size": (in_chans, *size),
        "in_chans": in_chans,
        "num_classes": num_classes,
        "head": head,
        "input_adaptation": adaptation,
        "attention": attention,
        "attention_blocks": [row["module"] for row in inserted],
        "spt": bool(spt),
        "lsa": bool(lsa),
    }
    return model


def _timm_pretrained_shape(name: str) -> tuple[int, int]:
    """(classes, input channels) of timm's pretrained weights for ``name``."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    classes = int(cfg.num_classes) if cfg is not None and cfg.num_classes else 1000
    chans = int(cfg.input_size[0]) if cfg is not None and cfg.input_size else 3
    return classes, chans


def _insert_attention(model: nn.Module, attention: Optional[str], stages: Optional[list[int]]) -> list[dict]:
    if attention is None:
        if stages is not None:
            raise ConfigError("attention_stages is set but attention is None; set attention='se' or 'cbam'")
        return []
    return add_attention(model, kind=attention, stages=stages)


def _from_state_dict(
    resolved: str,
    state_dict: dict,
    *,
    key_map: Optional[str],
    num_classes: int,
    drop_rate: float,
    kwargs: dict,
    attention: Optional[str],
    attention_stages: Optional[list[int]],
    what: str,
) -> tuple[nn.Module, str, int, list[dict]]:
    """Build ``resolved`` shaped like the checkpoint and load it strictly.

    Returns ``(model, head, checkpoint input channels, attention rows)``; the head is replaced
    when the checkpoint's class count differs from ``num_classes``.
    """
    # Build once (ImageNet-shaped: 1000 classes, 3 channels) to learn the target names, map the
    # checkpoint onto them, then rebuild with the checkpoint's own head size and input channels so
    # every tensor loads as is.
    probe = _build(resolved, num_classes=1000, in_chans=3, drop_rate=drop_rate, kwargs=kwargs)
    mapped = normalize_state_dict(state_dict, probe.state_dict(), key_map)
    classifiers = classifier_names(probe, resolved)
    stems = first_convs(probe, resolved)
    ckpt_classes = _head_classes(mapped, classifiers)
    src_chans = next(
        (
            int(mapped[f"{c}.weight"].shape[1])
            for c in stems
            if f"{c}.weight" in mapped and mapped[f"{c}.weight"].ndim == 4
        ),
        3,
    )
    model = _build(
        resolved, num_classes=ckpt_classes or num_classes, in_chans=src_chans, drop_rate=drop_rate, kwargs=kwargs
    )
    inserted = _insert_attention(model, attention, attention_stages)
    model_sd = model.state_dict()
    # Zero-gated attention added here may be absent from the checkpoint (it starts as identity);
    # a headless (backbone-only) checkpoint leaves the new head random.
    allow = {f"{row['module']}.{k}" for row in inserted for k in model.get_submodule(row["module"]).state_dict()}
    if ckpt_classes is None:
        allow |= {k for k in model_sd for c in classifiers if k.startswith(c + ".")}
    load_strict(model, mapped, what=what, allow_missing=allow)
    head = "pretrained"
    if ckpt_classes is None:
        head = "new"
    elif ckpt_classes != num_classes:
        _reset_head(model, resolved, num_classes)
        head = "new"
    return model, head, src_chans, inserted


# ------------------------------------------------------------------------------------ gray stem
def _stem_bn(model: nn.Module, conv: nn.Module, in_chans: int, size: int = 64) -> Optional[tuple[str, nn.Module]]:
    """The BatchNorm that directly consumes ``conv``'s output, found by tracing one small forward."""
    conv_out: list[torch.Tensor] = []
    found: list[str] = []

    def on_conv(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        conv_out.append(output)

    def watcher(name: str):
        def on_bn(module: nn.Module, inputs: tuple) -> None:
            if conv_out and not found and inputs[0] is conv_out[0]:
                found.append(name)

        return on_bn

    hooks = [conv.register_forward_hook(on_conv)]
    hooks += [
        module.register_forward_pre_hook(watcher(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size))
    except Exception:  # noqa: BLE001 - e.g. a fixed-input-size model: then no BN fold is possible
        return None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return (found[0], model.get_submodule(found[0])) if found else None


def adapt_input_channels(
    model: nn.Module, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...], first_convs: tuple[str, ...]
) -> str:
    """Convert a pretrained model's input convolution(s) in place from ``len(mean)`` channels to ``in_chans``.

    RGB → gray (``in_chans=1``) is made exact: for a gray image ``g`` the 3-channel model sees
    ``(g - m_c) / s_c`` per channel. With ``m = mean(m_c)``, ``s = mean(s_c)`` (what
    :func:`channel_stats` returns for the 1-channel data pipeline), the 1-channel kernel is
    ``s * sum_c W_c / s_c`` and the remaining per-output-channel constant
    ``sum_c sum(W_c) (m_c - m) / s_c`` is folded into the conv bias or into the running mean of the
    BatchNorm that follows the conv. The 1-channel model then equals the 3-channel one on the
    replicated image at every position whose receptive field avoids the stem's zero padding;
    at the border the padded zeros stand for ``m`` instead of ``m_c``, so equality is exact
    everywhere when all ``m_c`` are equal (e.g. EfficientNet-Lite's 0.5), otherwise close
    (about 1-2 % relative logit difference for ImageNet statistics). With equal ``s_c`` and
    ``m_c`` this is exactly timm's ``adapt_input_conv`` (sum of the RGB kernels).

    Other channel counts use timm's ``adapt_input_conv`` (repeat and rescale; approximate).

    Returns a one-line description of what was done (logged in ``medtricks_info``).
    """
    from timm.models import adapt_input_conv

    done = []
    for conv_name in first_convs:
        conv = model.get_submodule(conv_name)
        if not isinstance(conv, nn.Conv2d) or conv.weight.ndim != 4:
            raise ConfigError(f"cannot adapt input layer {conv_name!r} ({type(conv).__name__}) to {in_chans} channels")
        src = conv.weight.shape[1]
        exact = (
            in_chans == 1
            and src == len(mean)
            and conv.groups == 1
            and type(conv).__name__ in ("Conv2d", "Conv2dSame", "Conv2dSameExport")
        )
        if not exact:
            weight = adapt_input_conv(in_chans, conv.weight.detach(), base_chans=src)
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype))
            conv.in_channels = in_chans
            done.append(f"{conv_name}: timm adapt_input_conv {src}->{in_chans} channels (approximate)")
            continue
        weight = conv.weight.detach().double()
        m = torch.tensor(mean, dtype=torch.float64)
        s = torch.tensor(std, dtype=torch.float64)
        m1, s1 = channel_stats(tuple(mean), tuple(std), 1)
        kernel_sums = weight.sum((2, 3))  # (out, in)
        offset = (kernel_sums * (m / s)).sum(1) - m1[0] * (kernel_sums / s).sum(1)
        target = None
        if offset.abs().max() > 0 and conv.bias is None:
            target = _stem_bn(model, conv, src)
        new_weight = (weight / s[None, :, None, None]).sum(1, keepdim=True) * s1[0]
        with torch.no_grad():
            conv.weight = nn.Parameter(new_weight.to(conv.weight.dtype))
            conv.in_channels = 1
            if offset.abs().max() == 0:
                how = "exact (equal channel means)"
            elif conv.bias is not None:
                conv.bias -= offset.to(conv.bias.dtype)
                how = "mean offset folded into its bias"
            elif target is not None:
                bn_name, bn = target
                bn.running_mean += offset.to(bn.running_mean.dtype)
                how = f"mean offset folded into {bn_name}.running_mean"
            else:
                how = "mean offset NOT folded (no bias or BatchNorm after it): approximate"
        done.append(f"{conv_name}: RGB->gray std-weighted kernel sum, {how}")
    return "; ".join(done)


# ------------------------------------------------------------------------------------ configs
def get_data_config(model: nn.Module) -> dict[str, tuple]:
    """``{"mean", "std", "input_size"}`` the data layer must use for ``model`` (or its backbone).

    Example: ``get_data_config(create_model("resnet18"))`` →
    ``{'mean': (0.449,), 'std': (0.226,), 'input_size': (1, 224, 224)}``.
    """
    _, backbone = find_backbone(model)
    info = getattr(backbone, "medtricks_info", None)
    if info is not None:
        return {"mean": tuple(info["mean"]), "std": tuple(info["std"]), "input_size": tuple(info["input_size"])}
    import timm.data

    cfg = timm.data.resolve_model_data_config(backbone)
    in_chans = cfg["input_size"][0]
    mean, std = channel_stats(tuple(cfg["mean"]), tuple(cfg["std"]), in_chans)
    return {"mean": mean, "std": std, "input_size": tuple(cfg["input_size"])}
