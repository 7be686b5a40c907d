"""The measurements behind the parity contract (parity_tests/README.md), shared by the tests and
the report.

Each function runs torch_ref and flax_impl on the same weights and inputs and returns numbers;
the tests hold them to bounds, `python -m parity_tests.report` prints them. Relative errors are
``||a - b|| / ||b||`` per tensor (Frobenius norms), the worst tensor reported.

Float32 cannot prove that two implementations do the same arithmetic: in train mode, BatchNorm
over a small batch amplifies rounding so much that torch alone moves its gradients by about a
percent between float32 and float64, or between 1 and 2 threads. So every quantity is measured
twice: in float64 (level 1, the proof: agreement to ~1e-12) and in float32 (level 2, the
behaviour), where the cross-framework gap is reported beside each framework's own float32 noise,
its distance from the float64 result.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from crossing import weights as convert
from flax_impl import models as fm
from core.model_table import CIFAR_MODELS as CIFAR, IMAGENET_MODELS as IMAGENET
from benchmarks.timing import median_seconds
from torch_ref import models as tm


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the contract: architecture, variant, input size and batch."""

    name: str
    variant: str  # shortcut for the CIFAR family, stem for the ImageNet family
    size: int
    batch: int
    num_classes: int = 10

    @property
    def kwargs(self) -> dict:
        key = "shortcut" if self.name in CIFAR else "stem"
        return {key: self.variant, "num_classes": self.num_classes}

    @property
    def label(self) -> str:
        return f"{self.name}/{self.variant}"


def all_cases() -> list[Case]:
    """Every model of both families. The big ImageNet-stem ones run at 64 px (the layers do not
    care about the size, and 64 px keeps a 7x7/2 stem plus max-pool meaningful)."""
    cases = [Case(n, v, 32, 4) for n in CIFAR for v in ("projection", "identity")]
    cases += [Case(n, "cifar", 32, 4) for n in IMAGENET]
    cases += [Case(n, "imagenet", 64, 4) for n in IMAGENET]
    return cases


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_model(case: Case, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(tm, case.name)(**case.kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # non-trivial BatchNorm state, so eval mode tests something
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model


def flax_model(case: Case, dtype):
    return getattr(fm, case.name)(**case.kwargs, dtype=dtype, param_dtype=dtype)


def inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(case.batch, 3, case.size, case.size))
    y = rng.integers(0, case.num_classes, case.batch)
    return x, y


@dataclasses.dataclass
class Forward:
    """Everything one framework computes on one case at one precision."""

    eval_logits: np.ndarray
    train_logits: np.ndarray
    stats: dict  # torch state_dict names -> running statistics after one train-mode forward
    grads: dict  # torch parameter names -> gradient of the train-mode loss
    seconds: float | None  # forward + backward wall time, median of 5 warm calls; None: untimed


def run_torch(case: Case, dtype, threads: int | None = None, timed: bool = False) -> Forward:
    model = torch_model(case)
    model = model.to(torch.float64 if dtype == np.float64 else torch.float32)
    tdt = next(model.parameters()).dtype
    x_np, y_np = inputs(case)
    x, y = torch.tensor(x_np, dtype=tdt), torch.tensor(y_np)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model.eval()
        with torch.no_grad():
            eval_logits = model(x).numpy().copy()
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        stats = {
            k: v.numpy().copy()
            for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k
        }
        train_logits = logits.detach().numpy().copy()

        def step():
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()

        seconds = median_seconds(step) if timed else None
    finally:
        torch.set_num_threads(old_threads)
    return Forward(eval_logits, train_logits, stats, grads, seconds)


def run_flax(case: Case, dtype, timed: bool = False) -> Forward:
    jdt = jnp.float64 if dtype == np.float64 else jnp.float32
    variables = convert.torch_to_flax(torch_model(case).state_dict())
    variables = jax.tree_util.tree_map(
        lambda a: np.asarray(a, dtype) if a.dtype.kind == "f" else a, variables
    )
    model = flax_model(case, jdt)
    x_np, y_np = inputs(case)
    x = jnp.asarray(x_np.transpose(0, 2, 3, 1), jdt)
    y = jnp.asarray(y_np)
    eval_logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))

    def loss_fn(params, batch_stats, x, y):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1).mean()
        return ce, (logits, upd["batch_stats"])

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (logits, new_stats)), grads = grad_fn(variables["params"], variables["batch_stats"], x, y)
    jax.block_until_ready(grads)
    seconds = None
    if timed:
        on_device = jax.device_put((variables["params"], variables["batch_stats"]))
        seconds = median_seconds(lambda: jax.block_until_ready(grad_fn(*on_device, x, y)))
    grads_t = dict(convert.flax_to_torch({"params": grads}))
    stats_t = dict(convert.flax_to_torch({"params": {}, "batch_stats": new_stats}))
    return Forward(eval_logits, np.asarray(logits), stats_t, grads_t, seconds)


def worst(a: dict, b: dict, metric=rel) -> tuple[float, str]:
    """The largest per-tensor error between two name -> array dicts, and where it is."""
    assert set(a) == set(b), set(a) ^ set(b)
    errs = {k: metric(a[k], b[k]) for k in b if "num_batches" not in k}
    key = max(errs, key=errs.get)
    return errs[key], key


@dataclasses.dataclass
class ModelParity:
    case: Case
    torch_params: int
    flax_params: int
    round_trip_exact: bool
    # level 1, float64: torch vs flax
    f64_eval_logits: float
    f64_train_logits: float
    f64_stats: float
    f64_grads: float
    # level 2, float32: torch vs flax, and each one's own distance from float64
    f32_eval_logits: float
    f32_eval_logits_abs: float
    f32_stats: float
    f32_stats_abs: float
    f32_grads: float
    f32_grads_abs: float
    f32_grads_where: str
    torch_noise_grads: float
    flax_noise_grads: float
    torch_noise_stats: float
    flax_noise_stats: float
    torch_seconds: float | None
    flax_seconds: float | None


def model_parity(case: Case, timed: bool = False) -> ModelParity:
    """Both frameworks on one case, float64 and float32. `timed` adds the float32
    forward+backward times (5 more calls each: the report wants them, the tests do not)."""
    t_model = torch_model(case)
    variables = convert.torch_to_flax(t_model.state_dict())
    back = convert.torch_state_dict(variables)
    exact = all(
        torch.equal(back[k], v) and back[k].dtype == v.dtype
        for k, v in t_model.state_dict().items()
    ) and set(back) == set(t_model.state_dict())
    flax_count = sum(np.asarray(a).size for a in jax.tree_util.tree_leaves(variables["params"]))
    with jax.enable_x64(True):
        t64, f64 = run_torch(case, np.float64), run_flax(case, np.float64)
    t32, f32 = run_torch(case, np.float32, timed=timed), run_flax(case, np.float32, timed=timed)
    stats_noise = (worst(t32.stats, t64.stats)[0], worst(f32.stats, f64.stats)[0])
    grads_noise = (worst(t32.grads, t64.grads)[0], worst(f32.grads, f64.grads)[0])
    g32, where = worst(f32.grads, t32.grads)
    return ModelParity(
        case=case,
        torch_params=sum(p.numel() for p in t_model.parameters()),
        flax_params=flax_count,
        round_trip_exact=exact,
        f64_eval_logits=rel(f64.eval_logits, t64.eval_logits),
        f64_train_logits=rel(f64.train_logits, t64.train_logits),
        f64_stats=worst(f64.stats, t64.stats)[0],
        f64_grads=worst(f64.grads, t64.grads)[0],
        f32_eval_logits=rel(f32.eval_logits, t32.eval_logits),
        f32_eval_logits_abs=max_abs(f32.eval_logits, t32.eval_logits),
        f32_stats=worst(f32.stats, t32.stats)[0],
        f32_stats_abs=worst(f32.stats, t32.stats, max_abs)[0],
        f32_grads=g32,
        f32_grads_abs=worst(f32.grads, t32.grads, max_abs)[0],
        f32_grads_where=where,
        torch_noise_grads=grads_noise[0],
        flax_noise_grads=grads_noise[1],
        torch_noise_stats=stats_noise[0],
        flax_noise_stats=stats_noise[1],
        torch_seconds=t32.seconds,
        flax_seconds=f32.seconds,
    )


# --- optimizer and schedules --------------------------------------------------------------------


def torch_schedule(recipe, steps_per_epoch: int, world_size: int = 1):
    """(lr, momentum) at every step of a whole run, from torch's own schedulers as torch_ref
    builds and steps them (cosine once per epoch, OneCycle once per step)."""
    import warnings

    from torch_ref import optim as torch_optim

    holder = torch.nn.Linear(1, 1)
    opt, sched, when = torch_optim.for_recipe(holder, recipe, steps_per_epoch, world_size)
    total = recipe.epochs * steps_per_epoch
    lrs, moms = np.empty(total), np.empty(total)
    group = opt.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no step here
        for k in range(total):
            lrs[k], moms[k] = group["lr"], group["momentum"]
            if when == "step":
                if k < total - 1:  # OneCycleLR refuses a step past its total
                    sched.step()
            elif (k + 1) % steps_per_epoch == 0:
                sched.step()
    return lrs, moms


def schedule_parity(recipe, steps_per_epoch: int, world_size: int = 1) -> dict:
    """flax_impl's schedules (float64 values and the float32 tables it applies) against torch."""
    from flax_impl import optim
    from core import schedules

    want_lr, want_m = torch_schedule(recipe, steps_per_epoch, world_size)
    lr64, m64 = schedules.for_recipe(recipe, steps_per_epoch, world_size)
    _, lr_fn, m_fn = optim.for_recipe(recipe, steps_per_epoch, world_size)
    steps = jnp.arange(len(want_lr))
    lr32 = np.asarray(jax.jit(jax.vmap(lr_fn))(steps), np.float64)
    m32 = np.asarray(jax.jit(jax.vmap(m_fn))(steps), np.float64)
    # relative to the value where the rate is at least 1e-6 of its peak (every step of the
    # per-epoch cosine and of OneCycle, which ends at 4e-6); below that, the per-step cosine's
    # last few steps, relative to the peak: torch steps that cosine recursively, dividing two
    # 1 + cos values that cancel there, so its own value drifts from the closed form
    body = want_lr >= 1e-6 * want_lr.max()
    return {
        "steps": len(want_lr),
        "lr_f64": float(np.max(np.abs(lr64 - want_lr)[body] / want_lr[body])),
        "momentum_f64": float(np.max(np.abs(m64 - want_m) / want_m)),
        "lr_f32": float(np.max(np.abs(lr32 - want_lr)[body] / want_lr[body])),
        "momentum_f32": float(np.max(np.abs(m32 - want_m) / want_m)),
        "lr_of_peak": float(np.max(np.abs(lr64 - want_lr)) / want_lr.max()),
    }


def optimizer_parity(
    recipe, steps: int = 20, steps_per_epoch: int = 5, dtype=np.float64, tx=None
) -> float:
    """Worst relative parameter difference after `steps` updates of torch.optim.SGD (as torch_ref
    builds it) and the optax chain (flax_impl.optim, or `tx`) on identical gradients."""
    import warnings

    from flax_impl import optim
    from torch_ref import optim as torch_optim

    rng = np.random.default_rng(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 16)]
    init = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(steps)]
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    holder = torch.nn.Module()
    params = [torch.nn.Parameter(torch.tensor(a, dtype=tdt)) for a in init]
    for i, p in enumerate(params):
        holder.register_parameter(f"p{i}", p)
    recipe = recipe.replace(epochs=max(recipe.epochs, -(-steps // steps_per_epoch)))
    opt, sched, when = torch_optim.for_recipe(holder, recipe, steps_per_epoch, 1)
    jdt = jnp.float64 if dtype == np.float64 else jnp.float32
    if tx is None:
        tx, _, _ = optim.for_recipe(recipe, steps_per_epoch, 1, dtype=jdt)
    jparams = [jnp.asarray(a, jdt) for a in init]
    state = tx.init(jparams)
    import optax

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, g in enumerate(grads):
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi, dtype=tdt)
            opt.step()
            if when == "step" or (k + 1) % steps_per_epoch == 0:
                sched.step()
            updates, state = tx.update([jnp.asarray(gi, jdt) for gi in g], state, jparams)
            jparams = optax.apply_updates(jparams, updates)
    return max(rel(np.asarray(j), p.detach().numpy()) for j, p in zip(jparams, params))


def grouped_optimizer_parity(recipe, steps: int = 5, dtype=np.float64) -> dict:
    """torch.optim.SGD over torch_ref's parameter groups against the optax chain with its decay
    masks, on a real model of the recipe (identical weights, identical random gradients): the
    worst relative parameter difference after `steps` updates (one epoch of the schedule), and the
    decay rate each side gives each parameter (torch names), so a parameter put in the wrong
    group shows by name."""
    import optax

    from flax_impl import optim
    from torch_ref import models as torch_models, optim as torch_optim

    tdt = torch.float64 if dtype == np.float64 else torch.float32
    jdt = jnp.float64 if dtype == np.float64 else jnp.float32
    torch.manual_seed(0)
    model = torch_models.build_model(recipe).to(tdt)
    opt, sched, when = torch_optim.for_recipe(model, recipe, steps_per_epoch=steps, world_size=1)
    torch_rate = {}
    named = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            torch_rate[named[id(p)]] = group["weight_decay"]
    state = model.state_dict()
    params = convert.torch_to_flax(state)["params"]
    flax_rate = convert.flax_to_torch({"params": optim.decay_rates(params, recipe)})
    tx, _, _ = optim.for_recipe(recipe, steps, 1, dtype=jdt)
    jparams = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jdt), params)
    opt_state = tx.init(jparams)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        grads = {n: rng.normal(size=p.shape) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = torch.tensor(grads[n], dtype=tdt)
        opt.step()
        if when == "step":  # OneCycle; the per-epoch cosine would step after the last one
            sched.step()
        buffers = {k: v for k, v in state.items() if k not in grads}  # BatchNorm is told by them
        jgrads = convert.torch_to_flax({**grads, **buffers})["params"]
        jgrads = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jdt), jgrads)
        updates, opt_state = tx.update(jgrads, opt_state, jparams)
        jparams = optax.apply_updates(jparams, updates)
    back = convert.flax_to_torch({"params": jax.tree_util.tree_map(np.asarray, jparams)})
    worst = max(rel(back[n], p.detach().numpy()) for n, p in model.named_parameters())
    return {
        "worst": worst,
        "torch_rates": torch_rate,
        "flax_rates": {k: float(v) for k, v in flax_rate.items()},
    }
