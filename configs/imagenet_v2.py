"""ImageNet ResNet-50 with today's recipe: torchvision's second-generation one, which trains
ResNet-50 to 80.858% top-1 (`ResNet50_Weights.IMAGENET1K_V2`), the training side of it.

    torchrun --nproc_per_node=8 -m torch_ref.train --recipe imagenet_v2 --data-dir /data/imagenet
    python -m flax_impl.train --recipe imagenet_v2 --data-dir /data/imagenet

Every value is torchvision's published command for that model ("How to train state-of-the-art
models using TorchVision's latest primitives", and the ResNet-50 V2 entry of its classification
references' README):

    train.py --model resnet50 --batch-size 128 --lr 0.5 --lr-scheduler cosineannealinglr
    --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide --epochs 600
    --random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1
    --mixup-alpha 0.2 --cutmix-alpha 1.0 --train-crop-size 176 --model-ema --val-resize-size 232
    --ra-sampler --ra-reps 4

on 8 GPUs (a global batch of 1024), with the reference's defaults for what the command leaves
out (momentum 0.9, warm-up decay 0.01, EMA every 32 steps at 0.99998, a 224 centre crop,
TrivialAugment with bilinear interpolation, Random Erasing's scale, ratio and value). One
difference, said in docs/training.md: the reference's repeated-augmentation sampler cuts each
epoch to a multiple of 256 images; here an epoch keeps the data set's length. This project has
not trained it (no GPU here): 80.9% is torchvision's number, not a measured one of this code.
"""

from configs import imagenet
from configs.base import base


def get_config(size: str = "full"):
    # imagenet's fields with these changed, then `size` (smoke shrinks the epochs and batches)
    seed_002 = imagenet.get_config("full").to_dict()
    del seed_002["size"]
    return base(size=size, **{**seed_002, **v2()})


def v2() -> dict:
    return dict(
        recipe="imagenet_v2",
        image_size=224,  # --val-crop-size 224 (the reference's default)
        train_crop=176,  # --train-crop-size 176 (FixRes: train low, test high)
        eval_resize=232,  # --val-resize-size 232
        color_jitter=(0.0, 0.0, 0.0),  # the V2 preset has no colour jitter
        drop_last=False,  # the reference's training DataLoader keeps the last batch
        epochs=600,  # --epochs 600
        batch_size=128,  # --batch-size 128 per GPU, 8 GPUs: 1024
        lr=0.5,  # --lr 0.5 for the global batch of 1024
        lr_reference_world_size=8,  #   so lr x world/8 with other world sizes
        momentum=0.9,  # the reference's default
        weight_decay=2e-5,  # --weight-decay 0.00002
        norm_weight_decay=0.0,  # --norm-weight-decay 0.0
        schedule="cosine_per_epoch",  # --lr-scheduler cosineannealinglr, stepped per epoch
        warmup_epochs=5,  # --lr-warmup-epochs 5 --lr-warmup-method linear
        warmup_decay=0.01,  # --lr-warmup-decay's default
        label_smoothing=0.1,  # --label-smoothing 0.1
        mixup_alpha=0.2,  # --mixup-alpha 0.2
        cutmix_alpha=1.0,  # --cutmix-alpha 1.0
        mix_switch_prob=0.5,  # the reference: RandomChoice([MixUp, CutMix])
        ema_decay=0.99998,  # --model-ema with --model-ema-decay's default
        ema_every_steps=32,  # --model-ema-steps's default
        trivial_augment=True,  # --auto-augment ta_wide
        random_erasing=0.1,  # --random-erase 0.1
        repeated_augmentation=4,  # --ra-sampler --ra-reps 4
    )
