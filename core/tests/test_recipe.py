"""Recipes: each loads, overrides are typed, mistakes are one-line UserErrors."""

import dataclasses

import pytest

from configs import RECIPES, get_config
from core import sampling
from core.errors import UserError
from core.recipe import Recipe, apply_overrides, resume_differences, world_lr


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds_full_and_smoke(name):
    full, smoke = get_config(name), get_config(name, "smoke")
    assert full.recipe == smoke.recipe == name
    assert smoke.epochs < full.epochs and smoke.train_subset > 0
    # the smoke size changes only the size fields, never the recipe's optimiser or model
    for f in ("model", "lr", "momentum", "nesterov", "weight_decay", "schedule", "mean", "std"):
        assert getattr(full, f) == getattr(smoke, f)


def test_recipes_carry_the_seed_numbers():
    c10, c100, inet = get_config("cifar10"), get_config("cifar100"), get_config("imagenet")
    assert (c10.model, c10.epochs, c10.batch_size, c10.lr, c10.nesterov, c10.weight_decay) == (
        "resnet20",
        200,
        128,
        0.1,
        True,
        5e-4,
    )
    assert c10.color_jitter == (0.2, 0.2, 0.2) and c10.schedule == "cosine_per_epoch"
    assert (c100.model, c100.stem, c100.epochs, c100.weight_decay, c100.schedule) == (
        "resnet50",
        "cifar",
        100,
        1e-4,
        "onecycle",
    )
    assert (inet.batch_size, inet.epochs, inet.drop_last, inet.eval_resize) == (64, 90, True, 256)
    # seed 002: lr 0.1 x world/4
    assert world_lr(inet, 4) == pytest.approx(0.1) and world_lr(inet, 8) == pytest.approx(0.2)
    assert world_lr(c10, 8) == 0.1
    # seed 000: 391 steps per epoch (the last one partial); ImageNet drops its partial batch
    assert sampling.steps_in_epoch(50_000, 128, drop_last=False) == 391
    assert sampling.steps_in_epoch(1_281_167, 256, drop_last=True) == 5004


def test_overrides_parse_by_type():
    r = apply_overrides(
        get_config("cifar10"),
        [
            "epochs=3",
            "lr=0.05",
            "nesterov=false",
            "color_jitter=0,0.1,0",
            "pipeline=dataloader",
            "data-dir=/x",
        ],
    )
    assert (r.epochs, r.lr, r.nesterov, r.color_jitter, r.pipeline, r.data_dir) == (
        3,
        0.05,
        False,
        (0.0, 0.1, 0.0),
        "dataloader",
        "/x",
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("epoch=3", "unknown override key 'epoch' (did you mean epochs?)"),
        ("epochs=3.5", "expected an integer"),
        ("epochs", "is not key=value"),
        ("lr=fast", "expected a number"),
        ("lr=nan", "expected a finite number"),
        ("lr=-0.1", "lr must be positive"),
        ("lr=0", "lr must be positive"),
        ("batch_size=0", "batch_size must be at least 1"),
        ("epochs=0", "epochs must be at least 1"),
        ("momentum=1", "momentum must be in"),
        ("amp=fp8", "expected one of auto, off, fp16, bf16"),
        ("nesterov=maybe", "expected true or false"),
        ("color_jitter=0.2,0.2", "color_jitter must be three numbers"),
        ("mean=0.5", "mean and std need 3 values"),
        ("recipe=cifar100", "chosen with --recipe"),
        ("warmup_epochs=200", "warmup_epochs=200 leaves no epoch of the schedule"),
        ("warmup_epochs=-1", "warmup_epochs must be 0 or more"),
        ("warmup_decay=0", "warmup_decay must be in (0, 1]"),
        ("warmup_decay=1.5", "warmup_decay must be in (0, 1]"),
        ("norm_weight_decay=-1e-4", "norm_weight_decay must be 0 or more, or none"),
        ("bias_weight_decay=x", "expected a number"),
        ("schedule=cosine", "expected one of cosine_per_epoch, cosine_per_step, onecycle"),
        ("train_crop=24", "train_crop and eval_crop are for imagenet"),
        ("grad_accum_steps=3", "grad_accum_steps=3 does not divide batch_size=128"),
        ("grad_accum_steps=0", "grad_accum_steps must be at least 1"),
        ("eval_crop=-1", "eval_crop must be 0 or more"),
        ("random_erasing=1.5", "random_erasing is a probability: use a value in [0, 1]"),
        ("random_erasing=-0.1", "random_erasing is a probability"),
        ("repeated_augmentation=-1", "repeated_augmentation is how often each image repeats"),
        ("trivial_augment=maybe", "expected true or false"),
    ],
)
def test_bad_overrides_are_user_errors(override, message):
    with pytest.raises(UserError) as err:
        apply_overrides(get_config("cifar10"), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_warmup_before_onecycle_is_refused_and_none_resets_a_rate():
    with pytest.raises(UserError, match="onecycle warms up by itself"):
        apply_overrides(get_config("imagenet"), ["warmup_epochs=5"])
    r = apply_overrides(get_config("cifar10"), ["norm_weight_decay=0", "bias_weight_decay=1e-5"])
    assert (r.norm_weight_decay, r.bias_weight_decay) == (0.0, 1e-5)
    assert apply_overrides(r, ["norm_weight_decay=none"]).norm_weight_decay is None


def test_fixres_crops_are_checked_against_the_resize():
    r = apply_overrides(get_config("imagenet"), ["train_crop=176", "eval_resize=232"])
    assert (r.train_size, r.eval_size) == (176, 224)
    with pytest.raises(UserError, match="the eval centre crop .240 pixels.* eval_resize=232"):
        apply_overrides(r, ["eval_crop=240"])
    with pytest.raises(UserError, match="training image's 176 pixels"):
        apply_overrides(r, ["cutout_holes=1", "cutout_length=200"])


def test_unknown_recipe():
    with pytest.raises(UserError, match="unknown recipe 'cifar11'"):
        get_config("cifar11")


def test_resume_differences_ignore_paths_only():
    r = get_config("cifar10")
    saved = dataclasses.asdict(r.replace(data_dir="/elsewhere", num_workers=1))
    assert resume_differences(saved, r) == []
    saved = dataclasses.asdict(r.replace(epochs=5))
    assert resume_differences(saved, r) == ["epochs: 5 -> 200"]


def test_every_field_is_overridable():
    """Every field's type has a parser, so no key is settable in a file but not from the CLI."""
    r = get_config("cifar10")
    for f in dataclasses.fields(Recipe):
        if f.name in ("recipe", "size"):
            continue
        value = getattr(r, f.name)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert getattr(apply_overrides(r, [f"{f.name}={text}"]), f.name) == value


def test_sampling_shares_partition_each_global_batch():
    perm = sampling.epoch_permutation(103, seed=0, epoch=2)
    assert sorted(perm.tolist()) == list(range(103))
    world, batch = 3, 8
    steps = sampling.steps_in_epoch(103, batch * world, drop_last=False, world_size=world)
    seen = []
    for step in range(steps):
        parts = [
            sampling.step_slice(perm, step, batch, world, r).local_indices for r in range(world)
        ]
        one = sampling.step_slice(perm, step, batch * world, 1, 0).local_indices
        assert list(one) == [i for p in parts for i in p]  # the union, in order, is one process's
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        seen += list(one)
    assert sorted(seen) == list(range(103))  # every example exactly once per epoch
    ranges = [sampling.eval_shard(10, 4, r) for r in range(4)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(10))


def test_augment_params_are_a_function_of_seed_epoch_step():
    a = sampling.augment_params(0, 1, 5, 16, 4, True, (0.2, 0.2, 0.2))
    b = sampling.augment_params(0, 1, 5, 16, 4, True, (0.2, 0.2, 0.2))
    assert all((getattr(a, f) == getattr(b, f)).all() for f in ("crop_y", "crop_x", "flip"))
    assert a.crop_y.min() >= 0 and a.crop_y.max() <= 8
    assert (a.jitter >= 0.8).all() and (a.jitter <= 1.2).all()
    c = sampling.augment_params(0, 1, 6, 16, 4, True, (0.2, 0.2, 0.2))
    assert not (a.crop_y == c.crop_y).all()


def test_regularised_variants_carry_their_sources():
    mmda, mixcut = get_config("cifar100_mmda"), get_config("imagenet_mixcut")
    # seed 002: CutOut(n_holes=1, length=16) and mixup_data(alpha=0.2) on the cifar100 recipe
    assert (mmda.cutout_holes, mmda.cutout_length, mmda.mixup_alpha, mmda.cutmix_alpha) == (
        1,
        16,
        0.2,
        0.0,
    )
    assert dataclasses.replace(
        mmda, recipe="cifar100", cutout_holes=0, mixup_alpha=0.0
    ) == get_config("cifar100")
    # torchvision's ResNet-50 reference: mixup 0.2, cutmix 1.0, label smoothing 0.1
    assert (mixcut.mixup_alpha, mixcut.cutmix_alpha, mixcut.label_smoothing) == (0.2, 1.0, 0.1)
    base = get_config("cifar10")
    assert (base.cutout_holes, base.mixup_alpha, base.cutmix_alpha, base.label_smoothing) == (
        0,
        0.0,
        0.0,
        0.0,
    )


def test_a_run_saved_before_a_key_existed_resumes():
    """A workdir's config.json written before the regulariser, decay and warm-up keys: it ran with
    their defaults."""
    saved = get_config("cifar10").to_dict()
    for key in (
        "cutout_holes",
        "cutout_length",
        "mixup_alpha",
        "cutmix_alpha",
        "mix_switch_prob",
        "label_smoothing",
        "norm_weight_decay",
        "bias_weight_decay",
        "warmup_epochs",
        "warmup_decay",
        "ema_decay",
        "ema_every_steps",
        "grad_accum_steps",
        "train_crop",
        "eval_crop",
    ):
        del saved[key]
    assert resume_differences(saved, get_config("cifar10")) == []
    assert resume_differences(saved, get_config("cifar10").replace(mixup_alpha=0.2)) == [
        "mixup_alpha: 0.0 -> 0.2"
    ]


def test_every_key_says_what_it_means():
    """--list-keys prints each field's comment in the schema: a field without one fails here."""
    import dataclasses

    from core import recipe

    meaning = recipe.field_comments()
    assert {f.name for f in dataclasses.fields(recipe.Recipe)} == set(meaning)
    assert all(len(m) > 8 for m in meaning.values()), meaning
    assert (
        "  max_image_pixels: int (default 178956970): larger image files are corrupt data; "
        "0 = no limit" in recipe.keys_help()
    )
