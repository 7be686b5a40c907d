"""The recipe schema: every knob of a run, typed, validated, overridable from the command line.

A recipe is a frozen `Recipe`. The files in `configs/` build one with `make_recipe(**fields)` and
say
where each number comes from. The command line changes fields with ``key=value`` overrides; an
unknown key, a value that does not parse as the field's type, or a value out of range is a
`UserError`, never a silently added key.

Durations are given in epochs; `core.sampling` turns them into steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Literal, Union, get_args, get_origin

from core.errors import UserError
from core.model_table import CIFAR_MODELS, IMAGENET_MODELS

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "imagenet")
SIZES = ("full", "smoke")
SCHEDULES = ("cosine_per_epoch", "cosine_per_step", "onecycle")
# PIL refuses images of more pixels than this as decompression bombs (twice its warning
# threshold, 89,478,485): the default of `max_image_pixels`
PIL_PIXEL_LIMIT = 178_956_970


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that shapes a run. Field comments give units; `configs/*.py` give sources."""

    recipe: str  # the recipe's name (chosen with --recipe)
    # --- model -------------------------------------------------------------------------------
    model: Literal[CIFAR_MODELS + IMAGENET_MODELS]  # resnet20..110: CIFAR family; 18..152: ImageNet
    num_classes: int  # outputs of the classifier, one per class
    in_channels: int = 3  # 1 = grey (Fashion-MNIST), 3 = RGB
    shortcut: Literal["projection", "identity"] = "projection"  # CIFAR family only
    stem: Literal["cifar", "imagenet"] = "imagenet"  # ImageNet family only
    # --- data --------------------------------------------------------------------------------
    dataset: Literal[DATASETS] = "cifar10"  # which data set the readers look for
    data_dir: str = ""  # "" = the dataset's default folder (core.datasets)
    data_source: Literal["files", "tfds"] = "files"  # tfds: a prepared TFDS set (flax_impl only)
    download: bool = True  # fetch CIFAR when it is not on disk and the network allows
    image_size: int = 32  # side of the training crop and of the eval image, pixels
    train_crop: int = 0  # ImageNet: side of the training crop (FixRes); 0 = image_size
    eval_crop: int = 0  # ImageNet: side of the eval centre crop (after eval_resize); 0 = image_size
    crop_padding: int = 4  # zero padding before the random crop, pixels; 0 = no random crop
    random_resized_crop: bool = False  # torchvision RandomResizedCrop (ImageNet) instead
    hflip: bool = True  # random horizontal flip (probability 0.5) of training images
    color_jitter: tuple[float, ...] = (0.0, 0.0, 0.0)  # brightness, contrast, saturation
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel mean subtracted, on the 0..1 scale
    std: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel standard deviation divided by
    eval_resize: int = 0  # resize the short side to this before the centre crop; 0 = as is
    pipeline: Literal["fast", "dataloader"] = "fast"  # fast = in-memory uint8 + batched tensor ops
    num_workers: int = 4  # DataLoader workers (dataloader pipeline and ImageNet)
    max_image_pixels: int = PIL_PIXEL_LIMIT  # larger image files are corrupt data; 0 = no limit
    # today's augmentation (torchvision's second-generation recipe), on every pipeline
    trivial_augment: bool = False  # TrivialAugment Wide on each training image (uint8, host)
    random_erasing: float = 0.0  # chance of torchvision's RandomErasing per training image
    repeated_augmentation: int = 0  # RASampler: each image this many times in a row; 0/1 = off
    # regularisers (core.regularisers): batched on the device, never at eval
    cutout_holes: int = 0  # Cutout squares per training image; 0 = off
    cutout_length: int = 16  # side of each Cutout square, pixels
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0 = off
    mix_switch_prob: float = 0.5  # with both on: the chance a batch uses CutMix, else MixUp
    label_smoothing: float = 0.0  # cross_entropy(label_smoothing=) of the training loss
    train_subset: int = 0  # use the first N training images; 0 = all
    eval_subset: int = 0  # use the first N test images; 0 = all
    # --- optimisation ------------------------------------------------------------------------
    epochs: int = 200  # passes over the training set
    batch_size: int = 128  # per process (per GPU); the global batch is batch_size x world size
    eval_batch_size: int = 256  # images per evaluation batch (does not change the results)
    drop_last: bool = False  # drop the last partial training batch of each epoch
    grad_accum_steps: int = 1  # micro-batches of batch_size / this per optimizer step; 1 = off
    lr: float = 0.1  # peak learning rate at the reference world size
    lr_reference_world_size: int = 0  # lr x world / this (linear scaling); 0 = no scaling
    momentum: float = 0.9  # SGD momentum (OneCycle cycles it instead)
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 0.0  # coupled (added to the gradient), as torch.optim.SGD does
    norm_weight_decay: float | None = None  # BatchNorm weights and biases; none = weight_decay
    bias_weight_decay: float | None = None  # every bias (BatchNorm's too); none = as the rest
    schedule: Literal[SCHEDULES] = "cosine_per_epoch"  # the lr schedule (core.schedules)
    warmup_epochs: int = 0  # linear warm-up before the cosine schedule, epochs; 0 = none
    warmup_decay: float = 0.01  # the warm-up starts at lr x this and rises linearly to lr
    ema_decay: float = 0.0  # model EMA's decay per update, before torchvision's adjustment; 0 = off
    ema_every_steps: int = 32  # model EMA: update after every Nth optimizer step of an epoch
    onecycle_pct_start: float = 0.3  # OneCycle: share of the steps spent rising to lr
    onecycle_div_factor: float = 25.0  # OneCycle: starts at lr / this
    onecycle_final_div_factor: float = 1e4  # OneCycle: ends at the start rate / this
    onecycle_base_momentum: float = 0.85  # OneCycle: momentum at the peak lr
    onecycle_max_momentum: float = 0.95  # OneCycle: momentum at the lowest lr
    onecycle_anneal: Literal["cos", "linear"] = "cos"  # OneCycle: shape of both phases
    # --- execution ---------------------------------------------------------------------------
    seed: int = 0  # every random draw: initial weights, order, augmentation
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"  # auto = fp16 on CUDA, off on CPU
    channels_last: bool = True  # torch: NHWC memory layout (faster convolutions on GPUs)
    sync_bn: bool = False  # torch: SyncBatchNorm under DDP (needs CUDA/NCCL)
    compile: bool = False  # torch: torch.compile the step's forward and loss, static shapes
    compile_backend: str = "inductor"  # torch: torch.compile's backend (aot_eager: no codegen)
    fused_optimizer: Literal["auto", "on", "off"] = "auto"  # torch: fused SGD; auto = on CUDA
    cuda_graphs: bool = False  # torch: capture the whole step as a CUDA graph (CUDA only)
    device_prefetch: int = 2  # flax: batches placed on the devices ahead of the step; 0 = none
    deterministic: bool = False  # torch.use_deterministic_algorithms + cuDNN deterministic
    log_every_steps: int = 50  # a record line (and one device sync) every N steps
    tensorboard: bool = True  # event files in WORKDIR/tensorboard/ (needs the tensorboard package)
    checkpoint_every_steps: int = 0  # also write `last` every N steps; 0 = at each epoch end
    resume_with_gap: bool = False  # resume although metrics.jsonl/tensorboard lost epochs
    size: Literal[SIZES] = "full"  # smoke = a few steps on a data subset (see `make_recipe`)

    # ----------------------------------------------------------------------------------------
    def replace(self, **changes) -> "Recipe":
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def is_cifar_family(self) -> bool:
        return self.model in CIFAR_MODELS

    @property
    def micro_batch(self) -> int:
        """Rows of a process's micro-batch: batch_size / grad_accum_steps (the whole batch when
        there is no accumulation)."""
        return self.batch_size // self.grad_accum_steps

    @property
    def train_size(self) -> int:
        """Side of a training image, pixels: `train_crop`, or `image_size` when that is 0."""
        return self.train_crop or self.image_size

    @property
    def eval_size(self) -> int:
        """Side of an evaluated (and predicted) image: `eval_crop`, or `image_size`."""
        return self.eval_crop or self.image_size


# Fields a resumed run may change without becoming a different run: where the data is, how it
# is read and logged. Everything else shapes the numbers and must match the run in the workdir.
RESUME_MAY_CHANGE = frozenset(
    {
        "data_dir",
        "data_source",
        "download",
        "num_workers",
        "log_every_steps",
        "checkpoint_every_steps",
        "eval_batch_size",
        "tensorboard",
        "max_image_pixels",
        "resume_with_gap",
        "device_prefetch",
    }
)

# What `size="smoke"` does to any recipe: a handful of steps on a data subset, same code paths.
SMOKE = dict(
    train_subset=256,
    eval_subset=200,
    epochs=2,
    batch_size=32,
    eval_batch_size=64,
    num_workers=0,
    log_every_steps=2,
)


def make_recipe(*, size: str = "full", **fields) -> Recipe:
    """Build and validate a recipe; ``size="smoke"`` shrinks it to a few steps on a data subset."""
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; use one of: {', '.join(SIZES)}")
    if size == "smoke":
        fields.update(SMOKE)
        # a warm-up keeps its code path: one epoch of the two
        fields["warmup_epochs"] = min(fields.get("warmup_epochs", 0), 1)
    return validate(Recipe(size=size, **fields))


def field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(Recipe)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _optional(tp):
    """X for a field typed ``X | None``, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(get_args(tp)):
            return rest[0]
    return None


def parse_value(key: str, text: str):
    """Parse the text of an override by the type of field `key` (``none`` for an optional one)."""
    tp = field_types()[key]
    inner = _optional(tp)
    if inner is not None:
        if text.strip().lower() == "none":
            return None
        tp = inner
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return text
    if tp is bool:
        return _parse_bool(text)
    if tp is int:
        try:
            return int(text, 10)
        except ValueError:
            raise ValueError("expected an integer") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if tp is str:
        return text
    if get_origin(tp) is tuple:
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError("expected comma-separated numbers, e.g. 0.2,0.2,0.2") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError("expected finite numbers")
        return values
    raise TypeError(f"field {key} has unsupported type {tp}")  # a bug in the schema, not the user's


def given_once(overrides: list[str]) -> list[str]:
    """A command line's overrides, refused when a key is given twice (the later one would
    silently win). Programs that layer overrides call apply_overrides directly: last wins."""
    seen = set()
    for item in overrides:
        key = item.split("=", 1)[0].strip().replace("-", "_")
        if "=" in item and key in seen:
            raise UserError(f"override {key} is given twice; give it once")
        seen.add(key)
    return overrides


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``key=value`` strings. Unknown keys, unparsable values and bad ranges are errors."""
    names = [f.name for f in dataclasses.fields(Recipe)]
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value; write e.g. epochs=5")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in ("recipe", "size"):
            raise UserError(f"{key} is chosen with --{key}, not as an override")
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UserError(f"unknown override key {key!r}{hint}; see --list-keys for the keys")
        try:
            changes[key] = parse_value(key, text.strip())
        except ValueError as err:
            raise UserError(f"override {key}={text!r}: {err}") from None
    return validate(dataclasses.replace(recipe, **changes)) if changes else recipe


def validate(r: Recipe) -> Recipe:
    """Check ranges and combinations; return the recipe unchanged or raise UserError."""

    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    for name in (
        "num_classes",
        "in_channels",
        "image_size",
        "epochs",
        "batch_size",
        "eval_batch_size",
        "log_every_steps",
        "ema_every_steps",
        "grad_accum_steps",
    ):
        need(getattr(r, name) >= 1, f"{name} must be at least 1 (got {getattr(r, name)})")
    for name in (
        "crop_padding",
        "num_workers",
        "device_prefetch",
        "train_subset",
        "eval_subset",
        "eval_resize",
        "train_crop",
        "eval_crop",
        "lr_reference_world_size",
        "checkpoint_every_steps",
        "seed",
        "max_image_pixels",
    ):
        need(getattr(r, name) >= 0, f"{name} must be 0 or more (got {getattr(r, name)})")
    need(r.lr > 0, f"lr must be positive (got {r.lr})")
    need(0 <= r.momentum < 1, f"momentum must be in [0, 1) (got {r.momentum})")
    need(r.weight_decay >= 0, f"weight_decay must be 0 or more (got {r.weight_decay})")
    for name in ("norm_weight_decay", "bias_weight_decay"):
        value = getattr(r, name)
        need(
            value is None or value >= 0,
            f"{name} must be 0 or more, or none for weight_decay's value (got {value})",
        )
    need(not r.nesterov or r.momentum > 0, "nesterov needs momentum > 0")
    need(
        r.batch_size % r.grad_accum_steps == 0,
        f"grad_accum_steps={r.grad_accum_steps} does not divide batch_size={r.batch_size}: "
        "an optimizer step's batch is cut into micro-batches of batch_size / grad_accum_steps",
    )
    need(
        0 <= r.ema_decay < 1,
        f"ema_decay must be in [0, 1): 0 is off, torchvision's recipe uses 0.99998 "
        f"(got {r.ema_decay})",
    )
    need(r.warmup_epochs >= 0, f"warmup_epochs must be 0 or more (got {r.warmup_epochs})")
    need(
        r.warmup_epochs < r.epochs,
        f"warmup_epochs={r.warmup_epochs} leaves no epoch of the schedule in a run of "
        f"epochs={r.epochs}; warm up for fewer epochs than the run has",
    )
    need(
        0 < r.warmup_decay <= 1,
        f"warmup_decay must be in (0, 1]: the warm-up starts at lr x warmup_decay "
        f"(got {r.warmup_decay})",
    )
    need(
        not (r.warmup_epochs and r.schedule == "onecycle"),
        "onecycle warms up by itself (onecycle_pct_start); set warmup_epochs=0 or use a cosine "
        "schedule",
    )
    need(0 < r.onecycle_pct_start < 1, "onecycle_pct_start must be in (0, 1)")
    need(
        r.onecycle_div_factor > 0 and r.onecycle_final_div_factor > 0,
        "onecycle_div_factor and onecycle_final_div_factor must be positive",
    )
    need(
        0 <= r.onecycle_base_momentum <= r.onecycle_max_momentum < 1,
        "onecycle momenta must satisfy 0 <= base_momentum <= max_momentum < 1",
    )
    need(
        len(r.color_jitter) == 3 and all(0 <= v <= 1 for v in r.color_jitter),
        "color_jitter must be three numbers in [0, 1]: brightness,contrast,saturation",
    )
    need(
        len(r.mean) == r.in_channels and len(r.std) == r.in_channels,
        f"mean and std need {r.in_channels} values, one per input channel",
    )
    need(all(s > 0 for s in r.std), "std values must be positive")
    need(r.cutout_holes >= 0, f"cutout_holes must be 0 or more (got {r.cutout_holes})")
    need(r.cutout_length >= 1, f"cutout_length must be at least 1 (got {r.cutout_length})")
    need(
        not r.cutout_holes or r.cutout_length <= r.train_size,
        f"cutout_length must be 1 to the training image's {r.train_size} pixels "
        f"(image_size or train_crop; got {r.cutout_length})",
    )
    need(
        0 <= r.random_erasing <= 1,
        f"random_erasing is a probability: use a value in [0, 1], torchvision's recipe uses "
        f"0.1 (got {r.random_erasing})",
    )
    need(
        r.repeated_augmentation >= 0,
        "repeated_augmentation is how often each image repeats in an epoch's order: 0 or 1 "
        f"is off, torchvision's recipe uses 4 (got {r.repeated_augmentation})",
    )
    for name in ("mixup_alpha", "cutmix_alpha"):
        need(getattr(r, name) >= 0, f"{name} must be 0 (off) or positive (got {getattr(r, name)})")
    need(
        0 <= r.mix_switch_prob <= 1, f"mix_switch_prob must be in [0, 1] (got {r.mix_switch_prob})"
    )
    need(0 <= r.label_smoothing < 1, f"label_smoothing must be in [0, 1) (got {r.label_smoothing})")
    if r.model not in CIFAR_MODELS:
        need(r.shortcut == "projection", "shortcut=identity exists only for resnet20..resnet110")
    if r.dataset == "imagenet":
        need(r.pipeline == "dataloader", "imagenet does not fit in memory: use pipeline=dataloader")
    need(
        not r.random_resized_crop or r.dataset == "imagenet",
        "random_resized_crop is for imagenet; CIFAR and Fashion-MNIST crop with crop_padding",
    )
    need(
        r.crop_padding == 0 or not r.random_resized_crop,
        "choose random_resized_crop or crop_padding, not both",
    )
    need(
        r.dataset == "imagenet" or r.train_size == r.eval_size == r.image_size,
        "train_crop and eval_crop are for imagenet (a random resized crop, a resize and a centre "
        f"crop); {r.dataset} images are image_size={r.image_size} pixels: set both to 0",
    )
    need(
        not r.eval_resize or r.eval_size <= r.eval_resize,
        f"the eval centre crop ({r.eval_size} pixels: eval_crop or image_size) is larger than "
        f"eval_resize={r.eval_resize}; crop at most what the resize leaves",
    )
    need(bool(r.compile_backend), "compile_backend must name a torch.compile backend (inductor)")
    if r.cuda_graphs:  # what a captured step cannot change between replays (torch_ref.graphs)
        for ok, what in (
            (not r.compile, "compile=true (choose one of the two)"),
            (r.grad_accum_steps == 1, "gradient accumulation (grad_accum_steps > 1)"),
            (
                not (r.mixup_alpha or r.cutmix_alpha),
                "MixUp/CutMix (their weights change per batch)",
            ),
            (r.schedule != "onecycle", "schedule=onecycle (SGD takes its momentum as a number)"),
            (r.fused_optimizer != "off", "fused_optimizer=off"),
        ):
            need(ok, f"cuda_graphs does not combine with {what}; set cuda_graphs=false")
    return r


def field_comments() -> dict[str, str]:
    """Each field's meaning: its comment in the `Recipe` class above (one line each)."""
    import inspect
    import io
    import tokenize

    try:
        source = inspect.getsource(Recipe)
    except (OSError, TypeError):  # no source (a frozen build): types and defaults only
        return {}
    names = {f.name for f in dataclasses.fields(Recipe)}
    out, line_name = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            line_name[tok.start[0]] = tok.string  # a field's name, where a line starts
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_name:
            out[line_name[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def keys_help() -> str:
    """One line per key: name, type, default and meaning, for --list-keys."""
    lines, meaning = [], field_comments()
    for f in dataclasses.fields(Recipe):
        tp = field_types()[f.name]
        if get_origin(tp) is Literal:
            tname = "|".join(map(str, get_args(tp)))
        elif get_origin(tp) is tuple:
            tname = "floats,..."
        elif _optional(tp) is not None:
            tname = f"{_optional(tp).__name__}|none"
        else:
            tname = tp.__name__
        default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
        about = f": {meaning[f.name]}" if f.name in meaning else ""
        lines.append(f"  {f.name}: {tname}{default}{about}")
    return "\n".join(lines)


def resume_differences(saved: dict, current: Recipe) -> list[str]:
    """Fields that differ between a saved run's config and this one, ignoring RESUME_MAY_CHANGE."""
    now = current.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_MAY_CHANGE:
            continue
        # a key added after the saved run was written: it ran with the key's default
        a, b = saved.get(key, defaults.get(key)), now.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def world_lr(r: Recipe, world_size: int) -> float:
    """The peak learning rate after linear scaling (seed 002: lr 0.1 x world/4 for ImageNet)."""
    if r.lr_reference_world_size:
        return r.lr * world_size / r.lr_reference_world_size
    return r.lr
