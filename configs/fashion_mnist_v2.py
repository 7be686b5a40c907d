"""Fashion-MNIST with today's recipe: the fashion_mnist recipe (which stays the seed-style
baseline, seed 000's optimiser and schedule) plus the parts of torchvision's second-generation
recipe that suit 60,000 small grey images on a CPU.

    python -m torch_ref.train --recipe fashion_mnist_v2
    python -m flax_impl.train --recipe fashion_mnist_v2

Measured over its 30 epochs (torch_ref, seed 0, docs/augmentation.md): 94.22% (EMA 94.24%),
below the plain recipe's 94.62%: the augmentation is too strong for 30 epochs (the last epoch's
train accuracy 87%); flax_impl, seed 0: 93.93% (EMA 93.93%). Without TrivialAugment
(`trivial_augment=false`, torch_ref): 94.69% seed 0, 94.75% seed 1, no longer under-fit (train
accuracy 95.4%) but level with the plain recipe. No setting tried reaches 95% in 30 epochs, and
nothing is promised for this recipe beyond these numbers. TrivialAugment stays on: it is
torchvision's recipe, which this one stands for, and both stacks are measured with it; dropping
it waits for flax_impl's run without it. What each change rests on (8-epoch runs of this
project on the real data, docs/training.md and docs/regularisers.md):
- a model EMA: 92.98% against the model's 92.73% after 8 epochs (torch_ref), and the EMA was
  ahead of the model in every epoch after the first;
- label smoothing 0.1: 93.11% against 92.73% after 8 epochs;
- TrivialAugment and Random Erasing: torchvision's recipe; Random Erasing's paper (Zhong et al.,
  AAAI 2020) reports it lowering ResNet-20's Fashion-MNIST error (its probability 0.5 there,
  torchvision's 0.1 for ImageNet; 0.25 here, between them, as TrivialAugment already adds
  strong distortions);
- a one-epoch linear warm-up, rising per step, and no weight decay on BatchNorm: torchvision's
  recipe (its warm-up is per epoch over 5 of 600 epochs; one epoch of 30 at lr x 0.01 would
  waste it, hence the per-step cosine);
- no repeated augmentation: it trades distinct images per epoch for copies, which pays with large
  global batches (torchvision's 1024 on 8 GPUs), not with one process at batch 128; no MixUp or
  CutMix, which torchvision's recipe has, because 30 epochs are too few for them to pay.
"""

from configs import fashion_mnist


def get_config(size: str = "full"):
    return fashion_mnist.get_config(size).replace(
        recipe="fashion_mnist_v2",
        trivial_augment=True,  # torchvision: --auto-augment ta_wide
        random_erasing=0.25,  # torchvision: --random-erase 0.1; Zhong et al.: 0.5 (see above)
        label_smoothing=0.1,  # torchvision: --label-smoothing 0.1; 93.11% vs 92.73% (8 epochs)
        ema_decay=0.9998,  # as measured: 92.98% vs 92.73% (8 epochs; every 32 steps, the default)
        warmup_epochs=1,  # torchvision: --lr-warmup-epochs 5 of 600; 1 of 30 here
        # per step, so that the warm-up rises within its epoch: stepped per epoch, a one-epoch
        # warm-up is a whole epoch at lr x 0.01 (an 8-epoch try: 48% test accuracy after it)
        schedule="cosine_per_step",
        warmup_decay=0.01,  # torchvision's --lr-warmup-decay default
        norm_weight_decay=0.0,  # torchvision: --norm-weight-decay 0.0
    )
