"""The paper's own setting, for users with a GPU/TPU and a network: CIFAR-10 through TFDS, ResNet-18,
batch 128 per worker, 15 workers (3 Byzantine), SGD momentum 0.9, weight decay 5e-4, lr x0.2 every
10 epochs. ~50000 / (15 * 128) = 26 steps per epoch per worker shard."""

from flagjax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="tfds:cifar10",
        model="resnet18",
        num_workers=15,
        num_byzantine=3,
        attack="random",
        rule="flag",
        batch_size=128,
        steps=26 * 60,
        lr=0.1,
        eval_every=260,
        out_dir="runs/cifar10_resnet18",
    )
