"""Flax (Linen) models: the paper's MNIST CNN, an MLP, and ResNet-18 with CIFAR or ImageNet stem.

BatchNorm across workers: every worker normalises its mini-batch with its own batch statistics
(as each PyTorch worker in the paper does); the running averages used at evaluation are the mean of
the workers' updated running averages, computed in the same step (Byzantine workers only forge
gradients, not statistics). Models without BatchNorm have an empty ``batch_stats`` collection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flagjax.registry import Registry

__all__ = ["PaperCNN", "CnnMnist", "MLP", "ResNet18", "Conv", "conv_valid", "make_model", "max_pool_2x2", "MODELS"]


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2 x 2 max-pooling with stride 2 of an (N, H, W, C) array -> (N, H // 2, W // 2, C) (an odd last
    row or column is dropped, as ``nn.max_pool(x, (2, 2), (2, 2))`` with VALID padding does).

    Written as a reshape and a max rather than a ``reduce_window``: the same values, and XLA:CPU runs
    its gradient much faster than the select-and-scatter that differentiating ``reduce_window``
    produces (the paper CNN's forward + backward on 250 images with each: benchmarks/results/peer_step.md).
    Gradients differ only where a window holds several equal
    maxima: ``reduce_window`` sends the whole cotangent to one of them, this splits it equally; the
    parameter gradients of the models here are the same up to float rounding either way.
    """
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_xla(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DN)


def _conv_one_channel(x, kernel):
    """A one-channel image's VALID convolution as one GEMM: the k*k shifted views of the image stacked on
    a leading axis (contiguous copies) times the (k*k, C) kernel, then back to NHWC. Its weight gradient
    is a plain GEMM too."""
    n, h, w, _ = x.shape
    kh, kw, _, c = kernel.shape
    ho, wo = h - kh + 1, w - kw + 1
    views = jnp.stack([x[:, i : i + ho, j : j + wo, 0] for i in range(kh) for j in range(kw)])  # (kh kw, n, ho, wo)
    y = lax.dot_general(
        kernel.reshape(kh * kw, c), views, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
    )  # (c, n, ho, wo)
    return jnp.transpose(y, (1, 2, 3, 0))


@jax.custom_vjp
def _conv_matmul_dx(x, kernel):
    return _conv_xla(x, kernel)


def _conv_matmul_dx_fwd(x, kernel):
    return _conv_xla(x, kernel), (x, kernel)


def _conv_matmul_dx_bwd(res, dy):
    """Input gradient as a GEMM with the kernel (every output's k*k*C_in patch gradient) folded back onto
    the input by k*k shifted adds (col2im), instead of the padded full convolution XLA emits, which
    multiplies (k - 1)-wide zero borders too; weight gradient: XLA's."""
    x, kernel = res
    kh, kw, cin, cout = kernel.shape
    n, ho, wo, _ = dy.shape
    dp = jnp.dot(dy, kernel.reshape(kh * kw * cin, cout).T, precision=lax.Precision.HIGHEST)
    dp = dp.reshape(n, ho, wo, kh, kw, cin)
    pad = lambda i, j: ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0))  # noqa: E731
    dx = sum(jnp.pad(dp[:, :, :, i, j], pad(i, j)) for i in range(kh) for j in range(kw))
    _, vjp_kernel = jax.vjp(lambda k: _conv_xla(x, k), kernel)
    return dx, vjp_kernel(dy)[0]


_conv_matmul_dx.defvjp(_conv_matmul_dx_fwd, _conv_matmul_dx_bwd)


def _conv_cpu(x, kernel):
    return _conv_one_channel(x, kernel) if x.shape[-1] == 1 else _conv_matmul_dx(x, kernel)


def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID, stride-1 2-D convolution (cross-correlation, as ``nn.Conv``): x (N, H, W, C_in) float,
    kernel (kh, kw, C_in, C_out) -> (N, H - kh + 1, W - kw + 1, C_out); y[n, h, w, c] =
    sum_{i, j, d} x[n, h + i, w + j, d] kernel[i, j, d, c].

    On CPU it is written for XLA:CPU's fast paths, with the same values up to float rounding
    (tests/test_models.py): a one-channel input as one GEMM on its shifted views, otherwise XLA's
    convolution forward with a GEMM + col2im input gradient. Elsewhere XLA's convolution. The paper CNN
    uses it (its per-worker forward + backward: benchmarks/results/peer_step.md); ``cnn_mnist`` keeps
    ``nn.Conv``, whose per-worker gradients measured faster than this form's (89 vs 97 ms for 7 x 25
    images, both as one program per worker, one loaded core)."""
    return lax.platform_dependent(x, kernel, cpu=_conv_cpu, default=_conv_xla)


class Conv(nn.Module):
    """``nn.Conv(features, kernel_size, padding="VALID")`` computed by :func:`conv_valid`: the same
    parameters (``kernel`` (kh, kw, C_in, features), ``bias`` (features,)), initialisers and values."""

    features: int
    kernel_size: tuple[int, int] = (5, 5)
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return conv_valid(x, kernel) + bias


def _torch_kernel_init():
    """PyTorch's default Conv2d/Linear weight initialisation, kaiming_uniform(a=sqrt(5)):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    """PyTorch's default bias initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class PaperCNN(nn.Module):
    """The FA paper's MNIST network: conv 10@5x5 -> maxpool 2 -> ReLU -> conv 20@5x5 -> maxpool 2 ->
    ReLU -> fc 50 -> ReLU -> fc num_classes. Input (N, 28, 28, C) -> logits (N, num_classes)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(10, name="Conv_0")(x)
        x = nn.relu(max_pool_2x2(x))
        x = Conv(20, name="Conv_1")(x)
        x = nn.relu(max_pool_2x2(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(50)(x))
        return nn.Dense(self.num_classes)(x)


class CnnMnist(nn.Module):
    """ByzFL's ``cnn_mnist`` (``byzfl.fed_framework.models``), ported for the head-to-head with its
    training loop (experiments/peer_byzfl.py): conv 20@5x5 -> ReLU -> maxpool 2 -> conv 50@5x5 -> ReLU ->
    maxpool 2 -> fc 500 -> ReLU -> fc num_classes; 431,080 parameters for 28 x 28 x 1 inputs and 10
    classes, as in PyTorch. PyTorch's default initialisation (weights and biases uniform in
    +-1/sqrt(fan_in)). ByzFL ends with log_softmax and an NLL loss, which is the cross-entropy on these
    logits. The flattening order differs (NHWC here, NCHW there): a fixed permutation of fc 1's inputs,
    the same function class and the same initial distribution. Input (N, 28, 28, C) -> logits."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        cin = x.shape[-1]
        conv = lambda feat, fan_in: nn.Conv(  # noqa: E731
            feat, (5, 5), padding="VALID", kernel_init=_torch_kernel_init(), bias_init=_torch_bias_init(fan_in)
        )
        x = max_pool_2x2(nn.relu(conv(20, 25 * cin)(x)))
        x = max_pool_2x2(nn.relu(conv(50, 25 * 20)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(500, kernel_init=_torch_kernel_init(), bias_init=_torch_bias_init(x.shape[-1]))(x)
        x = nn.relu(x)
        return nn.Dense(self.num_classes, kernel_init=_torch_kernel_init(), bias_init=_torch_bias_init(500))(x)


class MLP(nn.Module):
    """Flatten -> Dense(h) + ReLU for each h in ``hidden`` -> Dense(num_classes)."""

    num_classes: int = 10
    hidden: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.filters, (3, 3), (self.strides, self.strides), padding=1, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), padding=1, use_bias=False)(y)
        y = norm()(y)
        if x.shape[-1] != self.filters or self.strides != 1:
            x = nn.Conv(self.filters, (1, 1), (self.strides, self.strides), use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016). ``stem="cifar"``: 3x3 conv, no max-pool (32x32 inputs);
    ``stem="imagenet"``: 7x7 stride-2 conv + 3x3 max-pool (the torchvision model the FA authors used)."""

    num_classes: int = 10
    stem: str = "cifar"

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        if self.stem == "cifar":
            x = nn.Conv(64, (3, 3), padding=1, use_bias=False)(x)
            x = nn.relu(norm()(x))
        elif self.stem == "imagenet":
            x = nn.Conv(64, (7, 7), (2, 2), padding=3, use_bias=False)(x)
            x = nn.relu(norm()(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet'; got {self.stem!r}")
        for i, filters in enumerate((64, 128, 256, 512)):
            for j in range(2):
                x = _Block(filters, 2 if (i > 0 and j == 0) else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MODELS: Registry = Registry("model")
MODELS.register("cnn", PaperCNN)
MODELS.register("cnn_mnist", CnnMnist)
MODELS.register("mlp", MLP)
MODELS.register("resnet18", partial(ResNet18, stem="cifar"))
MODELS.register("resnet18_imagenet", partial(ResNet18, stem="imagenet"))


def make_model(name: str, num_classes: int) -> nn.Module:
    """Model by name (see ``MODELS``, a :class:`flagjax.registry.Registry` of constructors taking
    ``num_classes``): 'cnn', 'cnn_mnist', 'mlp', 'resnet18', 'resnet18_imagenet', or one a user registered."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}; got {name!r}")
    return MODELS.get(name)(num_classes=num_classes)
