"""ImageNet-1k, ResNet-50: seed 002 ("Training ResNet from Scratch"), sections 04-05, with DDP.

    torchrun --nproc_per_node=4 -m torch_ref.train --recipe imagenet --data-dir /data/imagenet
    python -m flax_impl.train --recipe imagenet --data-dir /data/imagenet

--data-dir holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG. Expected: 75% top-1 (seed 002's target)
after 90 epochs. The learning rate scales linearly with the number of processes: 0.1 x world/4.
"""

from configs.base import base


def get_config(size: str = "full"):
    return base(
        size=size,
        recipe="imagenet",
        model="resnet50",  # seed 002: resnet50(), torchvision layout
        stem="imagenet",  # seed 002: 7x7/2 conv + 3x3/2 max-pool
        num_classes=1000,
        in_channels=3,
        dataset="imagenet",
        image_size=224,
        crop_padding=0,
        random_resized_crop=True,  # seed 002: T.RandomResizedCrop(224)
        hflip=True,  # seed 002: T.RandomHorizontalFlip()
        color_jitter=(0.4, 0.4, 0.4),  # seed 002: T.ColorJitter(0.4, 0.4, 0.4)
        mean=(0.485, 0.456, 0.406),  # seed 002: T.Normalize (ImageNet statistics)
        std=(0.229, 0.224, 0.225),
        eval_resize=256,  # seed 002: T.Resize(256) + T.CenterCrop(224)
        pipeline="dataloader",  # JPEG decoding in DataLoader workers
        num_workers=8,  # seed 002 train_ddp: num_workers=8
        epochs=90,  # seed 002: epochs=90
        batch_size=64,  # seed 002: 64 per GPU
        eval_batch_size=128,  # seed 002: val batch_size=128
        drop_last=True,  # seed 002: DataLoader(..., drop_last=True)
        lr=0.1,  # seed 002: lr = 0.1 x world_size / 4
        lr_reference_world_size=4,
        momentum=0.9,  # seed 002: momentum=0.9, weight_decay=1e-4
        nesterov=False,
        weight_decay=1e-4,
        schedule="onecycle",  # seed 002: OneCycleLR(max_lr=0.1 x world/4, epochs,
        onecycle_pct_start=0.3,  #   steps_per_epoch) with torch's defaults
        onecycle_div_factor=25.0,
        onecycle_final_div_factor=1e4,
        onecycle_base_momentum=0.85,
        onecycle_max_momentum=0.95,
        onecycle_anneal="cos",
        amp="auto",  # seed 002 pitfall 5: mixed precision (fp16 + GradScaler)
        checkpoint_every_steps=1000,  # ours: an ImageNet epoch is long; lose little to preemption
    )
