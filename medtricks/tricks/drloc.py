"""DRLoc, the dense relative localization loss (Liu et al., NeurIPS 2021, "Efficient Training of Visual
Transformers with Small Datasets"), as a trick: ``tricks.drloc: {lambda: 0.1, pairs: 64, mode: l1}`` (the keys:
:mod:`medtricks.tricks.keys.drloc`).

A self-supervised term added to the classification loss: the backbone must make its final embeddings
say *where* they are, which ViTs trained on little data do not learn by themselves. For every image,
``pairs`` pairs of positions ``(i, j)``, ``(k, l)`` are drawn uniformly (with replacement, as the
authors' code) on the final ``H x W`` grid of embeddings; the two ``C``-dim embeddings are concatenated
(``2C``) and a small MLP (``2C → 512 → 512 → 2``, ReLU, as the authors' code) predicts their offset::

    l1:  target ((i - k) / H, (j - l) / W)       loss  mean |prediction - target|   (the paper's)
    ce:  target classes (i - k + H - 1, j - l + W - 1) of 2H-1 / 2W-1 per axis, one linear output per
         axis on the shared 512-d trunk; loss  CE_rows + CE_cols              (the code's "ce" mode)

The offsets are normalised by the grid size, as the authors' code (``deltaxy /= H``; their grids are
square, here rows by ``H`` and columns by ``W``), so the target lies in ``(-1, 1)``. The batch loss
gains ``lambda · loss``; ``lambda: 0`` (the default) is off.

**Which models.** Any timm model whose ``forward_features`` keeps a spatial grid: ViT/DeiT tokens
``[B, prefix + N, C]`` (the class, distillation and register tokens -- ``model.num_prefix_tokens`` --
are dropped and the rest reshaped to ``model.patch_embed.grid_size``), Swin's ``[B, H, W, C]`` (timm's
``output_fmt`` ``NHWC``) and CNN feature maps ``[B, C, H, W]``; behind a learnable resizer too. A grid
smaller than 2 x 2 (a ResNet at 32 px) or features without one are refused when the trick meets the
model, naming it (:func:`token_grid`).

**No second forward pass.** When the trick meets the model it runs one probe image through
``forward_features`` with a forward hook on every module and finds the module whose output *is* the
features (ViT and Swin: ``norm``; ResNet: ``layer4``; EfficientNet: ``bn2``). During training a hook
on that module, armed in ``transform_batch`` and removed after the training forward has gone through it,
keeps the features of that forward for ``extra_loss``; so the term costs the MLP only. A model
whose features come out of no module (a reshape after the last module) gets ``forward_features``
run a second time in ``extra_loss`` (said once as a warning and in the ``drloc.features`` param).
The hook exists only between ``transform_batch`` and the training forward: EMA's copy of the model, the
attacks of adversarial training and validation never see it.

**The head lives in the trick, not in the model.** It is built in ``on_model`` (``C`` from the probe),
its initial weights drawn from the experiment seed in a forked RNG (switching DRLoc on does not move
any other random draw). The trick hands it to the run through the ``extra_modules`` point: its
parameters join the run's optimizer (same optimizer, learning rate and schedule, weight decay with
no-bias-decay, gradient clipping, AMP's GradScaler), and the optimizer state in ``last.pt`` covers
them; the head's weights are in the trick's ``state_dict``, so a resumed run is exact (the pairs are
drawn from torch's global generator, which the engine re-seeds every epoch). ``best.pt``, the
exported model and everything that loads a finished run never contain the head.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medtricks.errors import ConfigError
from medtricks.models.resizer import ResizerModel
from medtricks.tricks.keys.drloc import MODES, DrlocConfig, DrlocKeys

__all__ = [
    "DrlocConfig",
    "Drloc",
    "DrlocHead",
    "token_grid",
    "features_to_grid",
    "sample_positions",
    "pair_features",
    "relative_targets",
    "drloc_loss",
    "MODES",
]

HIDDEN = 512  # the authors' MLP width
_HEAD_SEED_OFFSET = 20_211  # the head's initial weights: experiment seed + this, in a forked RNG


# --------------------------------------------------------------------------------------------
# the grid of embeddings
# --------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(backbone, resizer or None): the module with ``forward_features`` and what feeds it."""
    if isinstance(model, ResizerModel):
        return model.backbone, model.resizer
    return model, None


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    info = getattr(model, "medtricks_info", None) or {}
    return str(info.get("name") or cfg.get("architecture") or type(model).__name__)


def features_to_grid(model: nn.Module, features: Any, *, name: Optional[str] = None) -> torch.Tensor:
    """``model``'s ``forward_features`` output as a ``[B, H, W, C]`` grid of embeddings.

    Tokens ``[B, T, C]`` lose their ``model.num_prefix_tokens`` class/register tokens and are reshaped to
    ``model.patch_embed.grid_size`` (or a square grid of the remaining tokens); 4-D features are
    ``[B, H, W, C]`` when ``model.output_fmt`` is ``NHWC`` (timm's Swin) and ``[B, C, H, W]`` otherwise (CNNs).
    Raises ConfigError naming the model when there is no grid of at least 2 x 2 positions.
    """
    backbone, _ = _unwrap(model)
    name = name or _model_name(backbone)
    if not isinstance(features, torch.Tensor):
        raise ConfigError(
            f"tricks.drloc: model {name!r}: forward_features returns a {type(features).__name__}, "
            "not a tensor of embeddings on a grid; DRLoc needs ViT tokens, a Swin [B, H, W, C] map or "
            "a CNN [B, C, H, W] map"
        )
    if features.dim() == 3:
        batch, tokens, channels = features.shape
        prefix = getattr(backbone, "num_prefix_tokens", None)
        grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
        if grid is not None and len(tuple(grid)) == 2:
            h, w = (int(g) for g in grid)
            if prefix is None and tokens >= h * w:
                prefix = tokens - h * w
            if prefix is not None and tokens - int(prefix) != h * w:
                grid = None  # another input size than the model was built for (dynamic_img_size)
        if grid is None or len(tuple(grid)) != 2:
            n = tokens - int(prefix or 0)
            side = math.isqrt(max(n, 0))
            if side * side != n:
                raise ConfigError(
                    f"tricks.drloc: model {name!r} gives {tokens} tokens ({prefix or 0} prefix tokens): "
                    "not a square grid, and the model has no patch_embed.grid_size to reshape them by"
                )
            h = w = side
        prefix = int(prefix or 0)
        grid_tokens = features[:, prefix:]
        out = grid_tokens.reshape(batch, h, w, channels)
    elif features.dim() == 4:
        fmt = str(getattr(backbone, "output_fmt", "NCHW") or "NCHW").upper()
        out = features if "NHWC" in fmt else features.permute(0, 2, 3, 1)
    else:
        raise ConfigError(
            f"tricks.drloc: model {name!r}: forward_features gives a tensor of shape "
            f"{tuple(features.shape)}, not a grid of embeddings ([B, tokens, C], [B, C, H, W] or "
            "[B, H, W, C]); DRLoc needs a model that keeps a spatial grid (ViT, Swin, CNN)"
        )
    h, w = int(out.shape[1]), int(out.shape[2])
    if h < 2 or w < 2:
        raise ConfigError(
            f"tricks.drloc: model {name!r} has a {h}x{w} grid of final embeddings at this input size; "
            "DRLoc needs at least 2x2 positions: use larger images (data.image_size) or a model with "
            "a finer final grid, or set tricks.drloc.lambda: 0"
        )
    return out


def token_grid(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C]`` embeddings of ``images`` on ``model``'s final grid: runs ``forward_features``
    (through the learnable resizer when there is one) -- a forward pass of its own; see
    :func:`features_to_grid` for the layouts and the errors."""
    backbone, resizer = _unwrap(model)
    if not callable(getattr(backbone, "forward_features", None)):
        raise ConfigError(
            f"tricks.drloc: model {_model_name(backbone)!r} has no forward_features(); DRLoc needs "
            "a timm model (ViT/DeiT, Swin, CNN) whose features keep a spatial grid"
        )
    x = resizer(images) if resizer is not None else images
    return features_to_grid(backbone, backbone.forward_features(x))


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
class DrlocHead(nn.Module):
    """The offset predictor: ``2C → 512 → 512`` (ReLU) and ``→ 2`` (l1) or ``→ (2H-1, 2W-1)`` (ce)."""

    def __init__(self, channels: int, grid: tuple[int, int], mode: str = "l1", hidden: int = HIDDEN):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"tricks.drloc.mode must be one of {list(MODES)}, got {mode!r}")
        self.channels, self.grid, self.mode = int(channels), (int(grid[0]), int(grid[1])), mode
        self.trunk = nn.Sequential(
            nn.Linear(2 * self.channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        if mode == "l1":
            self.out = nn.Linear(hidden, 2)
        else:
            self.out_rows = nn.Linear(hidden, 2 * self.grid[0] - 1)
            self.out_cols = nn.Linear(hidden, 2 * self.grid[1] - 1)

    def forward(self, pairs: torch.Tensor):
        hidden = self.trunk(pairs)
        if self.mode == "l1":
            return self.out(hidden)
        return self.out_rows(hidden), self.out_cols(hidden)


def sample_positions(
    batch: int, height: int, width: int, pairs: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[batch, pairs, 2]`` long tensors of (row, column) positions, uniform with replacement.

    Drawn on the CPU from torch's global generator (re-seeded by the engine every epoch), so the draws
    are the same on every device and a resumed run draws the same pairs; then moved to ``device``.
    """
    rows = torch.randint(height, (2, batch, pairs))
    cols = torch.randint(width, (2, batch, pairs))
    pos = torch.stack([rows, cols], dim=-1)
    if device is not None:
        pos = pos.to(device)
    return pos[0], pos[1]


def pair_features(grid: torch.Tensor, pos1: torch.Tensor, pos2: torch.Tensor) -> torch.Tensor:
    """``[B, pairs, 2C]``: the embeddings at ``pos1`` and ``pos2`` of each image of ``grid`` [B, H, W, C],
    concatenated (first ``pos1``'s, then ``pos2``'s)."""
    batch, height, width, channels = grid.shape
    flat = grid.reshape(batch, height * width, channels)
    rows = torch.arange(batch, device=grid.device).unsqueeze(1)
    first = flat[rows, pos1[..., 0] * width + pos1[..., 1]]
    second = flat[rows, pos2[..., 0] * width + pos2[..., 1]]
    return torch.cat([first, second], dim=-1)


def relative_targets(pos1: torch.Tensor, pos2: torch.Tensor, height: int, width: int, mode: str = "l1") -> torch.Tensor:
    """The offsets to predict, ``[..., 2]`` (rows, columns): l1 ``((i-k)/H, (j-l)/W)`` (float), ce the
    class indices ``(i-k+H-1, j-l+W-1)`` (long) for ``pos1 = (i, j)``, ``pos2 = (k, l)``."""
    delta = pos1 - pos2
    if mode == "l1":
        return delta.float() / torch.tensor([float(height), float(width)], device=delta.device)
    if mode == "ce":
        return delta + torch.tensor([height - 1, width - 1], device=delta.device)
    raise ConfigError(f"tricks.drloc.mode must be one of {list(MODES)}, got {mode!r}")


def drloc_loss(grid: torch.Tensor, head, pairs: int, mode: str = "l1") -> torch.Tensor:
    """The DRLoc loss of one batch (unweighted): draw ``pairs`` position pairs per image of ``grid``
    [B, H, W, C] (:func:`sample_positions`), predict their offsets with ``head`` and compare with
    :func:`relative_targets` -- the mean absolute error over pairs and both axes (l1), or the sum of
    the rows' and the columns' cross-entropies (ce)."""
    batch, height, width, _ = grid.shape
    pos1, pos2 = sample_positions(batch, height, width, pairs, device=grid.device)
    prediction = head(pair_features(grid, pos1, pos2))
    target = relative_targets(pos1, pos2, height, width, mode)
    if mode == "l1":
        return F.l1_loss(prediction.float(), target)
    rows, cols = prediction
    return F.cross_entropy(rows.reshape(-1, rows.shape[-1]).float(), target[..., 0].reshape(-1)) + F.cross_entropy(
        cols.reshape(-1, cols.shape[-1]).float(), target[..., 1].reshape(-1)
    )


# --------------------------------------------------------------------------------------------
# finding the module that produces the features (so the training forward's features can be kept)
# --------------------------------------------------------------------------------------------
def _probe(backbone: nn.Module, size: int, in_chans: int) -> tuple[torch.Tensor, Optional[str], int]:
    """Run one zero image through ``forward_features`` in eval mode with a hook on every module: the
    features, and the (name, call number) of the module call whose output *is* them (the outermost one:
    the last to finish), or ``(features, None, 0)``."""
    try:
        device = next(backbone.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    calls: list[tuple[str, int, Any]] = []
    counts: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            counts[name] = counts.get(name, 0) + 1
            calls.append((name, counts[name], output))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in backbone.named_modules() if name]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            features = backbone.forward_features(torch.zeros(1, in_chans, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    for name, number, output in reversed(calls):
        if output is features:
            return features, name, number
    return features, None, 0


def _in_chans(recipe: Any, backbone: nn.Module) -> int:
    chans = getattr(getattr(recipe, "model", None), "in_chans", None)
    if chans:
        return int(chans)
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 3


def _backbone_input_size(recipe: Any, backbone: nn.Module) -> int:
    """The size the backbone sees: the resizer's output when it is on, else ``data.image_size``."""
    model_cfg = getattr(recipe, "model", None)
    resizer = getattr(model_cfg, "resizer", None)
    if resizer is not None and getattr(resizer, "enabled", False):
        return int(resizer.output_size)
    size = getattr(getattr(recipe, "data", None), "image_size", None)
    if size:
        return int(size)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


# --------------------------------------------------------------------------------------------
# the trick
# --------------------------------------------------------------------------------------------
class Drloc(DrlocKeys):
    """Finds the model's grid and feature module, trains the head, and adds the term to every batch loss."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg = self.config.drloc
        self.head: Optional[DrlocHead] = None
        self.grid: Optional[tuple[int, int]] = None
        self.backbone: Optional[nn.Module] = None
        self.model_name = ""
        self._feature_module: Optional[nn.Module] = None
        self._feature_name: Optional[str] = None
        self._feature_call = 0
        self._handle = None
        self._seen = 0
        self._captured: Optional[torch.Tensor] = None
        self._warned = False
        self._pending: Optional[dict] = None
        self._loss_sum: Optional[torch.Tensor] = None
        self._batches = 0

    def log_params(self):
        if self.head is None:
            return {}
        return {
            "drloc.grid": f"{self.grid[0]}x{self.grid[1]}",
            "drloc.channels": self.head.channels,
            "drloc.head_params": sum(p.numel() for p in self.head.parameters()),
            "drloc.features": (
                f"hook on {self._feature_name}" if self._feature_name is not None else "forward_features run again"
            ),
        }

    # ---- the model: find its grid, build the head
    def on_model(self, model):
        backbone, _ = _unwrap(model)
        model_cfg = getattr(self.recipe, "model", None)
        self.model_name = str(getattr(model_cfg, "name", "") or _model_name(backbone))
        if not callable(getattr(backbone, "forward_features", None)):
            raise ConfigError(
                f"tricks.drloc: model {self.model_name!r} has no forward_features(); DRLoc needs a timm "
                "model (ViT/DeiT, Swin, CNN) whose features keep a spatial grid"
            )
        size = _backbone_input_size(self.recipe, backbone)
        features, name, call = _probe(backbone, size, _in_chans(self.recipe, backbone))
        grid = features_to_grid(backbone, features, name=self.model_name)
        self.grid, channels = (int(grid.shape[1]), int(grid.shape[2])), int(grid.shape[3])
        self.backbone = backbone
        if name is None:
            warnings.warn(
                f"tricks.drloc: no module of model {self.model_name!r} outputs its forward_features; DRLoc "
                "runs forward_features a second time on every batch (about twice the backbone's cost)",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            self._feature_module = dict(backbone.named_modules())[name]
            self._feature_name, self._feature_call = name, call
        seed = int(getattr(getattr(self.recipe, "experiment", None), "seed", 0) or 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + _HEAD_SEED_OFFSET)
            self.head = DrlocHead(channels, self.grid, self.cfg.mode)

    # ---- the head is trained by the run's optimizer
    def extra_modules(self):
        return {} if self.head is None else {"drloc_head": self.head}

    def on_fit_start(self, model):
        if self.head is None:
            self.on_model(model)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device(self.ctx.device or "cpu")
        self.head.to(device)  # in place: the optimizer keeps the same parameter objects
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    # ---- the features of the training forward
    def _disarm(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _keep(self, module, inputs, output):
        self._seen += 1
        if self._seen == self._feature_call:
            self._captured = output
            self._disarm()

    def transform_batch(self, images, targets):
        self._disarm()
        self._captured, self._seen = None, 0
        if self._feature_module is not None:
            self._handle = self._feature_module.register_forward_hook(self._keep)
        return images, targets

    def _grid(self, model, images) -> torch.Tensor:
        self._disarm()
        features, self._captured = self._captured, None
        if isinstance(features, torch.Tensor) and features.shape[0] == images.shape[0]:
            return features_to_grid(self.backbone, features, name=self.model_name)
        if self._feature_module is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"tricks.drloc: the hook on {self._feature_name!r} kept no features of this batch; running "
                "forward_features again",
                RuntimeWarning,
                stacklevel=2,
            )
        return token_grid(model, images)

    def extra_loss(self, model, images, targets, logits):
        if self.head is None:
            raise RuntimeError("Drloc.extra_loss before on_model/on_fit_start: the head is built there")
        grid = self._grid(model, images)
        if (int(grid.shape[1]), int(grid.shape[2])) != self.grid or int(grid.shape[3]) != self.head.channels:
            raise ConfigError(
                f"tricks.drloc: model {self.model_name!r} gives a {tuple(grid.shape[1:])} grid (H, W, C) "
                f"in training but {(*self.grid, self.head.channels)} when probed at its input size; "
                "train at the image size the model was built for"
            )
        loss = drloc_loss(grid, self.head, self.cfg.pairs, self.cfg.mode)
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._batches += 1
        return self.cfg.weight * loss

    def on_epoch_end(self, epoch, metrics):
        self._disarm()
        if self._batches:
            metrics["train/drloc_loss"] = float(self._loss_sum) / self._batches
        self._loss_sum, self._batches = None, 0

    # ---- resume
    def state_dict(self):
        if self.head is None:
            return None
        return {"head": self.head.state_dict()}  # its optimizer state is in the run's optimizer

    def load_state_dict(self, state):
        if self.head is None:
            self._pending = state  # applied in on_fit_start, once the head exists
            return
        self.head.load_state_dict(state["head"])
