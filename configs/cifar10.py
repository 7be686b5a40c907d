"""CIFAR-10, ResNet-20 with projection shortcuts: seed 000 ("A from-scratch CIFAR-10 ResNet").

    python -m torch_ref.train --recipe cifar10
    python -m flax_impl.train --recipe cifar10

Expected: 91-93% test accuracy after 200 epochs (seed 000; He et al. 2015 report 91.25% for
ResNet-20). Time: seed 000 quotes ~35 s/epoch on an RTX 3060 and ~10 s on an A100 with its
DataLoader pipeline; see BENCHMARKS.md for this project's in-memory pipeline.
"""

from configs.base import base


def get_config(size: str = "full"):
    return base(
        size=size,
        recipe="cifar10",
        model="resnet20",  # seed 000: three stages of three basic blocks, 16/32/64 wide
        shortcut="projection",  # seed 000: 1x1 conv + BN where shapes change (272,474 params)
        num_classes=10,
        in_channels=3,
        dataset="cifar10",
        image_size=32,
        crop_padding=4,  # seed 000: T.RandomCrop(32, padding=4)
        hflip=True,  # seed 000: T.RandomHorizontalFlip()
        color_jitter=(0.2, 0.2, 0.2),  # seed 000: T.ColorJitter(0.2, 0.2, 0.2)
        mean=(0.4914, 0.4822, 0.4465),  # seed 000: per-channel training-set statistics
        std=(0.2470, 0.2435, 0.2616),
        pipeline="fast",  # ours; pipeline=dataloader reproduces seed 000's loader
        num_workers=4,  # seed 000: DataLoader(..., num_workers=4)
        epochs=200,  # seed 000: 200 epochs
        batch_size=128,  # seed 000: DataLoader(train_ds, 128, ...)
        eval_batch_size=256,  # seed 000: DataLoader(test_ds, 256, ...)
        drop_last=False,  # seed 000: default DataLoader, 391 steps per epoch
        lr=0.1,  # seed 000: SGD(lr=0.1, momentum=0.9, weight_decay=5e-4,
        momentum=0.9,  #           nesterov=True)
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine_per_epoch",  # seed 000: CosineAnnealingLR(T_max=200), stepped per epoch
        amp="auto",  # seed 000: fp16 autocast + GradScaler on CUDA
    )
