"""The embedded default (the main job): real Fashion-MNIST offline, the paper's CNN, 15 workers of which
the last 3 send the paper's uniform-random gradients. CPU-sized: 32 images per worker per step."""

from flagjax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="fashion_mnist",
        model="cnn",
        num_workers=15,
        num_byzantine=3,
        attack="random",
        rule="flag",
        batch_size=32,
        steps=600,
        lr=0.05,
        eval_every=100,
        out_dir="runs/main",
    )
