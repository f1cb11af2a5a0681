"""A frozen, cached prefix (issue 29): compute the frozen early stages once per image and view, train the rest.

Fine-tuning hardly moves a pretrained network's early blocks (CKA of EfficientNet-Lite0's ``blocks.1.1``
with its ImageNet self: 0.935), yet on a CPU they cost most of every step. With those stages frozen
(``model.freeze``), their output depends only on the augmented image, so ``train.cache_frozen: {views: K}``
draws K augmented views of every training image once (view ``v`` seeded from the run's seed and ``v``),
runs the frozen prefix over them in eval mode and keeps the features (half precision by default);
epoch ``e`` trains the unfrozen rest on view ``e mod K``. Validation runs the rest on the cached
features of the (deterministic) eval transform. Resume is exact: the views are redrawn from the same
seeds, so a resumed run trains on the same features as one that never stopped.

What it gives up, and refuses rather than silently changes: augmentation is K fixed draws instead of a
fresh one every epoch; batch-level tricks that change images or look at them (mixup/cutmix, adversarial
training, DRLoc, distillation, pseudo-labels), a trained resizer in front of the backbone, progressive
resizing and data-parallel training cannot run on cached features.

The split is by forward order: the longest run of leading units (stem pieces, then every block) whose
parameters are all frozen. It is checked once on real inputs: ``rest(prefix(x)) == model(x)`` in eval
mode, so an architecture whose forward is not that plain sequence is refused instead of trained wrong.

Example::

    >>> import torch
    >>> from medtricks.models import create_model, freeze_model
    >>> model = create_model("resnet18", num_classes=2)
    >>> _ = freeze_model(model, [0, 1, 2])
    >>> split = split_frozen_prefix(model, sample=torch.randn(2, 1, 64, 64))
    >>> split.cut                                         # the first trainable unit
    'layer3.0'
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from medtricks.errors import ConfigError
from medtricks.train.engine import seed_everything
from medtricks.train.inference import autocast_context
from medtricks.tricks.base import Trick

__all__ = [
    "FrozenSplit",
    "split_frozen_prefix",
    "with_fused_frozen_norms",
    "SuffixModel",
    "CachedViews",
    "build_cached_views",
    "check_cacheable",
    "cache_bytes",
]


@dataclass
class FrozenSplit:
    """Where a model is cut: ``units`` in forward order (name, module), the first ``n_frozen`` of them
    frozen; ``tail`` runs what follows the last unit (head conv, pooling, classifier)."""

    units: list[tuple[str, nn.Module]]
    n_frozen: int
    tail: Callable[[torch.Tensor], torch.Tensor]

    @property
    def cut(self) -> str:
        """Name of the first unit that trains ("head" when every unit is frozen)."""
        return self.units[self.n_frozen][0] if self.n_frozen < len(self.units) else "head"

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        for _, unit in self.units[: self.n_frozen]:
            x = unit(x)
        return x

    def inference_prefix(self) -> nn.Module:
        """A copy of the prefix for computing the cache: timm's ``FrozenBatchNorm`` (two elementwise passes, a
        memory-bound cost on a CPU) turned back into eval-mode BatchNorm (one fused kernel; the same
        normalisation with the same statistics, equal to float rounding): EfficientNet-Lite0's prefix ~1.8x
        faster on the 2-core CPU."""
        import copy

        from timm.utils.model import unfreeze_batch_norm_2d

        prefix = nn.Sequential(*[copy.deepcopy(unit) for _, unit in self.units[: self.n_frozen]])
        prefix = unfreeze_batch_norm_2d(prefix).eval()
        for parameter in prefix.parameters():
            parameter.requires_grad_(False)
        return prefix

    def rest(self, x: torch.Tensor) -> torch.Tensor:
        for _, unit in self.units[self.n_frozen :]:
            x = unit(x)
        return self.tail(x)


def _units_and_tail(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], Callable]:
    """The forward sequence of the families medtricks ships (timm EfficientNet/MobileNet, ResNet)."""

    def blocks_of(prefix: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
        units = []
        for stage_name, stage in container.named_children():
            if isinstance(stage, nn.Sequential):
                units += [(f"{prefix}.{stage_name}.{n}", block) for n, block in stage.named_children()]
            else:
                units.append((f"{prefix}.{stage_name}", stage))
        return units

    names = dict(model.named_children())
    if {"conv_stem", "bn1", "blocks"} <= set(names) and hasattr(model, "forward_head"):
        units = [("conv_stem", model.conv_stem), ("bn1", model.bn1)] + blocks_of("blocks", model.blocks)
        if "conv_head" in names and "bn2" in names and type(model).__name__ == "EfficientNet":
            return units, lambda x: model.forward_head(model.bn2(model.conv_head(x)))
        return units, model.forward_head  # MobileNetV3: conv_head sits in forward_head
    if {"conv1", "bn1", "layer1", "layer4"} <= set(names) and hasattr(model, "forward_head"):
        units = [(n, names[n]) for n in ("conv1", "bn1", "act1", "maxpool") if n in names]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            units += [(f"{layer}.{n}", block) for n, block in names[layer].named_children()]
        return units, model.forward_head
    raise ConfigError(
        f"train.cache_frozen: {type(model).__name__} is not a family whose forward medtricks can cut "
        "(timm EfficientNet/MobileNet or ResNet); remove train.cache_frozen for this model"
    )


def _frozen(module: nn.Module) -> bool:
    """No trainable parameter and no BatchNorm that would update running statistics in train mode."""
    if any(p.requires_grad for p in module.parameters()):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules())


def split_frozen_prefix(model: nn.Module, *, sample: Optional[torch.Tensor] = None, atol: float = 1e-4) -> FrozenSplit:
    """Cut ``model`` after its longest run of frozen leading units (see the module docstring).

    ``sample`` (a small input batch): check that the cut reproduces ``model(sample)`` in eval mode.
    Raises :class:`ConfigError` when nothing at the front is frozen or the check fails."""
    units, tail = _units_and_tail(model)
    n_frozen = 0
    while n_frozen < len(units) and _frozen(units[n_frozen][1]):
        n_frozen += 1
    if n_frozen == 0:
        raise ConfigError(
            "train.cache_frozen needs frozen early stages, but model.freeze freezes nothing at the "
            f"front of {type(model).__name__} (its first unit {units[0][0]} trains); freeze the "
            "stem and early stages, e.g. model.freeze: [0, 1, 2, 3]"
        )
    split = FrozenSplit(units, n_frozen, tail)
    if sample is not None:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                whole, cut = model(sample), split.rest(split.prefix(sample))
        finally:
            model.train(was_training)
        if whole.shape != cut.shape or not torch.allclose(whole, cut, atol=atol, rtol=1e-3):
            raise ConfigError(
                f"train.cache_frozen: cutting {type(model).__name__} before {split.cut} does not "
                "reproduce its forward pass (the architecture is not a plain sequence of blocks); "
                "remove train.cache_frozen for this model"
            )
    return split


def with_fused_frozen_norms(model: nn.Module) -> nn.Module:
    """``model`` itself, or, when it holds timm ``FrozenBatchNorm`` layers (``model.freeze``), an eval-mode copy
    with them turned back into BatchNorm: the same outputs to float rounding, ~1.8x faster frozen stages on a
    CPU. For inference only (the final evaluation); the model that is saved keeps its frozen layers."""
    import copy

    from timm.utils.model import FrozenBatchNorm2d, FrozenBatchNormAct2d, unfreeze_batch_norm_2d

    if not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in model.modules()):
        return model
    fused = unfreeze_batch_norm_2d(copy.deepcopy(model)).eval()
    for parameter in fused.parameters():
        parameter.requires_grad_(False)
    return fused


class SuffixModel(nn.Module):
    """Trains on cached features: runs the unfrozen units and the head of ``model`` (shared, not copied).

    ``model`` is a child, so ``train()``/``eval()`` reach the head's dropout; the prefix never runs here."""

    def __init__(self, model: nn.Module, split: FrozenSplit):
        super().__init__()
        self.model = model
        self.split = split

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.split.rest(features.float() if features.dtype != torch.float32 else features)


def suffix_of(model: nn.Module, n_frozen: int) -> SuffixModel:
    """The :class:`SuffixModel` of another copy of the architecture (EMA's averaged weights) cut at the same unit."""
    units, tail = _units_and_tail(model)
    return SuffixModel(model, FrozenSplit(units, n_frozen, tail))


class CachedViews(torch.utils.data.Dataset):
    """``dataset[i] -> (features of view e mod K of image i, target)`` for the epoch ``e`` set with
    :meth:`set_epoch` (the engine calls it before every epoch)."""

    def __init__(self, store: torch.Tensor, targets: Sequence[int]):
        if store.dim() < 2 or store.shape[1] != len(targets):
            raise ValueError(f"store of shape {tuple(store.shape)} does not hold {len(targets)} images per view")
        self.store, self.targets = store, list(int(t) for t in targets)
        self.views, self.view = store.shape[0], 0

    def set_epoch(self, epoch: int) -> None:
        self.view = int(epoch) % self.views

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.store[self.view, index], self.targets[index]


def cache_bytes(views: int, n_images: int, feature_shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(views * n_images * math.prod(feature_shape) * torch.empty((), dtype=dtype).element_size())


def build_cached_views(
    split: FrozenSplit,
    dataset,
    *,
    views: int,
    seed_of_view: Callable[[int], int],
    dtype: torch.dtype = torch.float16,
    device: torch.device = torch.device("cpu"),
    batch_size: int = 64,
    num_workers: int = 0,
    channels_last: bool = False,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "caching frozen prefix",
) -> CachedViews:
    """Run the frozen prefix over ``views`` augmented passes of ``dataset`` (in index order; pass ``v`` seeded
    with ``seed_of_view(v)``) and keep the features on the CPU in ``dtype``."""
    n = len(dataset)
    prefix = split.inference_prefix().to(device)
    if channels_last:
        prefix.to(memory_format=torch.channels_last)
    store: Optional[torch.Tensor] = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=views * n, desc=desc, unit="img", leave=False, dynamic_ncols=True)
    for view in range(views):
        seed = seed_of_view(view)
        seed_everything(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)  # worker seeds (and so their augmentation draws) follow the view's seed
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=generator
        )
        start = 0
        with torch.inference_mode():
            for images, _ in loader:
                images = images.to(device)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast_context(device, amp_dtype):
                    features = prefix(images)
                if store is None:
                    store = torch.empty((views, n, *features.shape[1:]), dtype=dtype)
                store[view, start : start + len(features)] = features.to("cpu", dtype)
                start += len(features)
                if bar is not None:
                    bar.update(len(features))
    if bar is not None:
        bar.close()
    assert store is not None, "empty dataset"
    if not torch.isfinite(store).all():  # float16 overflow: features beyond +-65504
        raise ConfigError(
            "train.cache_frozen: the cached features overflow float16; set train.cache_frozen.dtype: float32"
        )
    # Only a dataset without ``targets`` is read again for its labels (a default argument would read every one).
    targets = dataset.targets if hasattr(dataset, "targets") else [int(dataset[i][1]) for i in range(n)]
    return CachedViews(store, targets)


_IMAGE_HOOKS = ("transform_batch", "extra_loss")


def check_cacheable(*, tricks: Sequence[Any], resizer: bool, progressive: bool, world_size: int) -> None:
    """Refuse, with the reason, what cannot train on cached features (see the module docstring)."""
    reasons = []
    touching = [
        t.name for t in tricks if any(getattr(type(t), hook, None) is not getattr(Trick, hook) for hook in _IMAGE_HOOKS)
    ]
    if touching:
        reasons.append(
            f"trick(s) {', '.join(touching)} change or look at the images of every batch, which the cache "
            "replaces by frozen-prefix features"
        )
    if resizer:
        reasons.append("model.resizer trains in front of the backbone, so nothing at the front is frozen")
    if progressive:
        reasons.append("schedule.progressive_resize changes the image size every epoch, the cache holds one size")
    if world_size > 1:
        reasons.append("data-parallel training (torchrun) is not supported on cached features yet")
    if reasons:
        raise ConfigError(
            "train.cache_frozen cannot be used here: "
            + "; ".join(reasons)
            + ". Remove train.cache_frozen (or the conflicting setting)."
        )


def warn_single_view(views: int, augment: str) -> None:
    if views > 1 and augment == "none":
        warnings.warn(
            f"train.cache_frozen.views={views} with data.augment=none: every view is the same image; "
            "one view is enough",
            RuntimeWarning,
            stacklevel=3,
        )
