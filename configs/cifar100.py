"""CIFAR-100, ResNet-50 with the CIFAR stem: seed 002 ("Training ResNet from Scratch"), section 04.

    python -m torch_ref.train --recipe cifar100
    python -m flax_impl.train --recipe cifar100

Expected: 73% top-1 (seed 002's target) after 100 epochs. Unlike seed 002's full loop, which
evaluates CIFAR-100 through ImageNet's Resize(256)/CenterCrop(224) (a slip), eval here sees the
32x32 test images as they are.
"""

from configs.base import base


def get_config(size: str = "full"):
    return base(
        size=size,
        recipe="cifar100",
        model="resnet50",  # seed 002: resnet50(num_classes=100)
        stem="cifar",  # seed 002: 3x3 stride-1 conv1, no max-pool, for 32x32 input
        num_classes=100,
        in_channels=3,
        dataset="cifar100",
        image_size=32,
        crop_padding=4,  # seed 002 PMDA: T.RandomCrop(32, padding=4)
        hflip=True,  # seed 002 PMDA: T.RandomHorizontalFlip(p=0.5)
        color_jitter=(0.0, 0.0, 0.0),
        mean=(0.5071, 0.4867, 0.4408),  # seed 002 PMDA: T.Normalize
        std=(0.2675, 0.2565, 0.2761),
        pipeline="fast",
        num_workers=4,  # seed 002: num_workers=4
        epochs=100,  # seed 002: epochs=100
        batch_size=128,  # seed 002: batch_size=128
        eval_batch_size=256,  # seed 002: val batch_size=256
        drop_last=False,  # seed 002: default DataLoader
        lr=0.1,  # seed 002: SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        schedule="onecycle",  # seed 002 full loop: OneCycleLR(max_lr=0.1, epochs=100,
        onecycle_pct_start=0.3,  #   steps_per_epoch=len(train_loader)) with torch's defaults:
        onecycle_div_factor=25.0,  #   pct_start 0.3, cos, div 25, final div 1e4,
        onecycle_final_div_factor=1e4,  # momentum cycled between 0.85 and 0.95, stepped per step
        onecycle_base_momentum=0.85,
        onecycle_max_momentum=0.95,
        onecycle_anneal="cos",
        amp="auto",  # seed 002 pitfall 5: mixed precision
    )
