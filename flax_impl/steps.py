"""The pure functions of training: state, one train step, one eval step, and their sharding.

`TrainState` is one pytree: step, params, batch_stats, opt_state. `train_step(state, batch)`
and `eval_step(state, batch)` are pure; `Steps` jits them once for a mesh, with the state replicated
and the batch split along its first axis over the mesh's ``data`` axis, and the state buffers
donated. Batches have a fixed shape: a short last batch is padded and carries a 0/1 ``mask``, which
the loss, the accuracy and BatchNorm's statistics respect, so nothing recompiles at the end of an
epoch and nothing padded is counted.

A batch is a dict of arrays:
    images   uint8 (B, H, W, C), already cropped to the model's input size, or
    index    int32 (B,) rows of an in-memory dataset held on the devices (`Steps.source`), then
             cropped/flipped here with crop_y, crop_x (B,) and flip (B,)
    labels   int32 (B,)
    mask     float32 (B,)
    jitter, jitter_order   (B, 3) colour-jitter factors and order, when the recipe jitters
    holes, partner, lam, one_minus_lam, mix_kind, box   Cutout/MixUp/CutMix draws per row, when
             the recipe has any (core.regularisers; flax_impl.augment.regularise)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_impl import augment
from core.errors import UserError
from core.recipe import Recipe

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A TrainState with a model EMA (recipes with ema_decay > 0): ``ema`` holds ``params``,
    ``batch_stats`` and ``count`` (torch's AveragedModel.n_averaged). Without an EMA the state is
    a plain TrainState, so the checkpoints of such runs keep their tree."""

    ema: Any


def with_ema(state: TrainState) -> EmaTrainState:
    """`state` with an EMA that starts as a copy of the model and a count of 0 (torch's
    AveragedModel deep-copies the model; its first update copies again)."""
    ema = {
        "params": jax.tree_util.tree_map(jnp.copy, state.params),
        "batch_stats": jax.tree_util.tree_map(jnp.copy, state.batch_stats),
        "count": jnp.zeros((), jnp.int32),
    }
    return EmaTrainState(state.step, state.params, state.batch_stats, state.opt_state, ema)


def ema_step(state: EmaTrainState, restart, *, decay: float) -> EmaTrainState:
    """One update of the model EMA, as torch's AveragedModel(use_buffers=True) with
    get_ema_multi_avg_fn(decay) does it: at count 0 a copy of the model; else each float array
    moves by torch.lerp(ema, model, 1 - decay) (for a weight under 0.5 ``ema + w (model - ema)``,
    else ``model - (model - ema)(1 - w)``) and an integer one (num_batches_tracked) becomes
    ``ema * decay + model * (1 - decay)`` in float32 truncated back, as torch's integer branch
    does. Then count + 1, or 0 when `restart` (torchvision's warm-up)."""
    w = 1.0 - decay
    first = state.ema["count"] == 0

    def move(e, m):
        if jnp.issubdtype(e.dtype, jnp.floating):
            new = e + w * (m - e) if w < 0.5 else m - (m - e) * (1.0 - w)
        else:
            f = e.astype(jnp.float32) * decay + m.astype(jnp.float32) * w
            new = f.astype(e.dtype)
        return jnp.where(first, m, new)

    model = {"params": state.params, "batch_stats": state.batch_stats}
    moved = jax.tree_util.tree_map(
        move, {k: state.ema[k] for k in ("params", "batch_stats")}, model
    )
    count = jnp.where(restart, 0, state.ema["count"] + 1).astype(jnp.int32)
    return state.replace(ema={**moved, "count": count})


def ema_view(state: EmaTrainState) -> TrainState:
    """The EMA's weights and statistics as a TrainState, for eval_step."""
    return TrainState(state.step, state.ema["params"], state.ema["batch_stats"], state.opt_state)


def compute_dtype(recipe: Recipe, platform: str):
    """bf16 compute on GPU/TPU unless the recipe says otherwise; float32 on CPU."""
    if recipe.amp == "fp16":
        raise UserError(
            "flax_impl has no fp16 loss scaling; use amp=bf16 (bf16 compute, "
            "float32 parameters) or amp=off"
        )
    if recipe.amp == "bf16" or (recipe.amp == "auto" and platform != "cpu"):
        return jnp.bfloat16
    return jnp.float32


def create_state(model, tx, rng, image_shape, param_dtype=jnp.float32) -> TrainState:
    """Initialise the model (as `model.init(key, x, train=False)`) and the optimizer state."""
    init_key, _ = jax.random.split(rng)  # the split keeps the weights of earlier versions
    variables = model.init(init_key, jnp.zeros((1, *image_shape), param_dtype), train=False)
    return state_from_variables(variables, tx)


def state_from_variables(variables, tx) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )


def prepare_inputs(batch: dict, source, aug: dict, dtype):
    """The model's input from a batch: gather from the in-memory source, crop/flip, jitter, norm."""
    if "index" in batch:
        images = source[0][batch["index"]]
        labels = source[1][batch["index"]]
    else:
        images, labels = batch["images"], batch["labels"]
    if "crop_y" in batch:
        images = augment.crop_flip(
            images, aug["pad"], batch["crop_y"], batch["crop_x"], batch["flip"]
        )
    jitter = (batch["jitter"], batch["jitter_order"]) if "jitter" in batch else None
    return augment.to_float_normalized(images, aug["mean"], aug["std"], jitter, dtype), labels


def cross_entropy(logits, labels, smoothing: float = 0.0):
    """Per-example cross-entropy; with smoothing eps the targets of torch's
    cross_entropy(label_smoothing=eps): (1 - eps) * nll + eps * mean over classes of -log p."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 stays
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if smoothing:
        smooth = -jnp.mean(jax.nn.log_softmax(logits), axis=-1)
        ce = (1.0 - smoothing) * ce + smoothing * smooth
    return ce


def masked_cross_entropy(logits, labels, mask):
    ce = cross_entropy(logits, labels)
    count = jnp.sum(mask)
    return jnp.sum(ce * mask) / jnp.maximum(count, 1), ce, count


def train_loss(logits, labels, mask, smoothing: float = 0.0, mix=None, count=None):
    """Mean over the real rows of CE_eps(y), or under MixUp/CutMix of
    lam * CE_eps(y) + (1 - lam) * CE_eps(y[partner]) (core.regularisers); `count`: divide by
    this many rows instead of this batch's (a micro-batch's share of its step's mean)."""
    ce = cross_entropy(logits, labels, smoothing)
    if mix is not None:
        partner_labels, lam, rest = mix
        ce = ce * lam.astype(ce.dtype) + cross_entropy(
            logits, partner_labels, smoothing
        ) * rest.astype(ce.dtype)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask) if count is None else count, 1)


def train_step(
    state: TrainState,
    batch: dict,
    source=None,
    *,
    model,
    tx,
    aug: dict,
    dtype,
    smoothing: float = 0.0,
    chunks: int = 1,
    micro_sharding=None,
):
    """One SGD step on the (global) batch; returns (new state, metrics of this batch).
    `chunks` > 1: gradient accumulation (`accumulated_grads`)."""
    x, labels = prepare_inputs(batch, source, aug, dtype)
    mask = batch["mask"]
    mix, dominant = None, labels
    if "partner" in batch:  # Cutout / MixUp / CutMix
        x, partner_labels, lam, rest = augment.regularise(x, labels, batch)
        mix = (partner_labels, lam, rest)
        # train accuracy under mixing: the label with the larger weight
        dominant = jnp.where(lam >= 0.5, labels, partner_labels)

    if chunks > 1:
        loss, batch_stats, grads, correct = accumulated_grads(
            state, x, labels, mask, mix, dominant, model, smoothing, chunks, micro_sharding
        )
        return _apply(state, tx, grads, batch_stats, loss, correct, mask)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mask=mask,
            mutable=["batch_stats"],
        )
        loss = train_loss(logits, labels, mask, smoothing, mix)
        return loss, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    correct = jnp.sum((jnp.argmax(logits, -1) == dominant) * mask)
    return _apply(state, tx, grads, batch_stats, loss, correct, mask)


def accumulated_grads(state, x, labels, mask, mix, dominant, model, smoothing, chunks, sharding):
    """Gradient accumulation: the batch's rows in `chunks` micro-batches of consecutive rows
    (as torch_ref cuts them: a short batch's padded rows fall in its last micro-batches), one
    after the other, BatchNorm's running statistics carried from each to the next; each adds
    its real rows' share of the mean loss's gradient. A micro-batch of padding only leaves the
    statistics as they were (it runs with every row counted, so nothing divides by zero, and
    weighs nothing in the loss). `sharding` spreads each micro-batch over the devices, so the
    result does not depend on how many there are. Returns (loss, batch_stats, grads, correct)."""
    count = jnp.sum(mask)

    def split(a):
        a = a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])
        if sharding is not None:
            a = jax.lax.with_sharding_constraint(a, sharding(a.ndim))
        return a

    rows = {"x": x, "labels": labels, "mask": mask, "dominant": dominant}
    if mix is not None:
        rows["partner_labels"], rows["lam"], rows["rest"] = mix
    parts = jax.tree_util.tree_map(split, rows)

    def body(carry, part):
        batch_stats, grads, loss, correct = carry
        real = jnp.sum(part["mask"]) > 0
        bn_mask = jnp.where(real, part["mask"], jnp.ones_like(part["mask"]))
        mixed = None if mix is None else (part["partner_labels"], part["lam"], part["rest"])

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                part["x"],
                train=True,
                mask=bn_mask,
                mutable=["batch_stats"],
            )
            micro = train_loss(logits, part["labels"], part["mask"], smoothing, mixed, count)
            return micro, (updates["batch_stats"], logits)

        (micro, (new_stats, logits)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        batch_stats = jax.tree_util.tree_map(
            lambda new, old: jnp.where(real, new, old), new_stats, batch_stats
        )
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        hits = jnp.sum((jnp.argmax(logits, -1) == part["dominant"]) * part["mask"])
        return (batch_stats, grads, loss + micro, correct + hits), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    loss_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float64 in the parity tests
    start = (state.batch_stats, zeros, jnp.zeros((), loss_dtype), jnp.zeros((), mask.dtype))
    (batch_stats, grads, loss, correct), _ = jax.lax.scan(body, start, parts)
    return loss, batch_stats, grads, correct


def _apply(state, tx, grads, batch_stats, loss, correct, mask):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "correct": correct,
        "count": jnp.sum(mask),
        "finite": jnp.isfinite(loss),
    }
    new = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new, metrics


def eval_step(state: TrainState, batch: dict, source=None, *, model, aug: dict, dtype):
    """Sums over the real (unmasked) examples: loss, correct, count; and per example the label,
    the prediction and whether it is real (the host counts the confusion matrix from them: a
    few integers per image, where a matrix per batch would be 1000 x 1000 for ImageNet)."""
    x, labels = prepare_inputs(batch, source, aug, dtype)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    _, ce, count = masked_cross_entropy(logits, labels, batch["mask"])
    pred = jnp.argmax(logits, -1)
    correct = jnp.sum((pred == labels) * batch["mask"])
    return {
        "loss_sum": jnp.sum(ce * batch["mask"]),
        "correct": correct,
        "count": count,
        "labels": labels.astype(jnp.int32),
        "pred": pred.astype(jnp.int32),
        "real": batch["mask"] > 0,
    }


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh over all devices (or the given ones): pure data parallelism."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,))


class Steps:
    """`train_step` and `eval_step` jitted for a mesh: state replicated, batch split over ``data``.

    `source` (train/evaluate's last argument) is an in-memory dataset already on the devices (see
    `replicate`), or None when batches carry their images.
    """

    def __init__(
        self,
        model,
        tx,
        aug: dict,
        mesh: Mesh,
        dtype=jnp.float32,
        smoothing: float = 0.0,
        chunks: int = 1,
    ):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.split = NamedSharding(mesh, P(DATA_AXIS))

        def micro_sharding(ndim):  # (chunks, rows, ...): each micro-batch over every device
            return NamedSharding(mesh, P(None, DATA_AXIS, *([None] * (ndim - 2))))

        # on a batch already placed by `put_batch`: (state, batch, source) -> (state, metrics)
        step = functools.partial(train_step, model=model, tx=tx, aug=aug, dtype=dtype)
        accumulate = dict(chunks=chunks, micro_sharding=micro_sharding)
        self.train_placed = jax.jit(
            functools.partial(step, smoothing=smoothing, **accumulate),
            donate_argnums=(0,),
            out_shardings=(self.replicated, self.replicated),
        )
        self.evaluate_placed = jax.jit(
            functools.partial(eval_step, model=model, aug=aug, dtype=dtype),
            out_shardings=self.replicated,
        )

    def replicate(self, tree):
        """A copy of `tree` on every device of the mesh (state, in-memory datasets)."""
        return jax.device_put(tree, self.replicated)

    def put_batch(self, batch: dict) -> dict:
        """This process's rows of the global batch -> one global array split over the mesh."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.split)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.split, a), batch
        )

    def train(self, state: TrainState, batch: dict, source=None):
        """One step on a host batch (this process's rows): place it, then step."""
        return self.train_placed(state, self.put_batch(batch), source)

    def evaluate(self, state: TrainState, batch: dict, source=None):
        return self.evaluate_placed(state, self.put_batch(batch), source)
