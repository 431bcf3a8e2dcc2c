"""The models against their references: ByzFL's cnn_mnist (PyTorch) for the port, Flax's reduce_window
max-pool for the reshape max-pool, PyTorch's default initialisation for CnnMnist's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

from flagjax import models
from flagjax.peers import byzfl_module


def _torch_cnn_mnist():
    torch.manual_seed(0)
    return byzfl_module("fed_framework.models").cnn_mnist()


def _params_from_torch(net) -> dict:
    """ByzFL's cnn_mnist weights as CnnMnist params: conv (out, in, kh, kw) -> (kh, kw, in, out); fc 1's
    inputs reordered from PyTorch's (C, H, W) flattening to NHWC's (H, W, C)."""
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    conv = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731
    f1 = sd["_f1.weight"].reshape(500, 50, 4, 4).transpose(0, 2, 3, 1).reshape(500, 800).T
    return {
        "Conv_0": {"kernel": conv(sd["_c1.weight"]), "bias": sd["_c1.bias"]},
        "Conv_1": {"kernel": conv(sd["_c2.weight"]), "bias": sd["_c2.bias"]},
        "Dense_0": {"kernel": f1, "bias": sd["_f1.bias"]},
        "Dense_1": {"kernel": sd["_f2.weight"].T, "bias": sd["_f2.bias"]},
    }


def test_cnn_mnist_is_byzfls_network(x64):
    """Same parameter count as ByzFL's cnn_mnist, and with its weights the same function: log-softmax of
    the port's logits equals ByzFL's output (float64) on random images."""
    net = _torch_cnn_mnist().double()
    model = models.make_model("cnn_mnist", 10)
    x = np.random.default_rng(0).uniform(size=(6, 28, 28, 1))
    params = model.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"]
    assert ravel_pytree(params)[0].size == sum(p.numel() for p in net.parameters()) == 431_080
    ours = jax.nn.log_softmax(model.apply({"params": _params_from_torch(net)}, jnp.asarray(x)))
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-10, atol=1e-10)


def test_cnn_mnist_initialises_as_pytorch():
    """Every weight and bias uniform on +-1/sqrt(fan_in) (PyTorch's Conv2d/Linear default), the same
    bounds as the PyTorch model's own tensors, with a uniform's standard deviation bound / sqrt(3)."""
    params = models.CnnMnist().init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))["params"]
    fan_in = {"Conv_0": 25, "Conv_1": 500, "Dense_0": 800, "Dense_1": 500}
    net = _torch_cnn_mnist()
    torch_layers = {"Conv_0": net._c1, "Conv_1": net._c2, "Dense_0": net._f1, "Dense_1": net._f2}
    for name, fi in fan_in.items():
        bound = 1 / np.sqrt(fi)
        for leaf in ("kernel", "bias"):
            w = np.asarray(params[name][leaf])
            assert np.abs(w).max() <= bound + 1e-7, (name, leaf)
            if w.size >= 500:  # enough draws for the spread to mean something
                assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3), (name, leaf)
        tw = torch_layers[name].weight.detach().numpy()
        assert np.abs(tw).max() <= bound + 1e-7 and np.abs(tw).max() > 0.9 * bound, name


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 9, 7, 2), (3, 24, 24, 10)])
def test_max_pool_2x2_is_flax_max_pool(shape):
    """Values equal to ``nn.max_pool(x, (2, 2), (2, 2))`` (odd edges dropped); on tie-free inputs the
    gradients are equal too."""
    x = jnp.asarray(np.random.default_rng(sum(shape)).normal(size=shape), jnp.float32)
    ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(models.max_pool_2x2(x)), np.asarray(ref(x)))
    c = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape), jnp.float32)
    grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * c))(x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(grad(models.max_pool_2x2)), np.asarray(grad(ref)), rtol=0, atol=0)


def test_paper_cnn_parameter_gradients_unchanged_by_the_pooling(x64):
    """The paper CNN's parameter gradients with the reshape max-pool equal those with Flax's
    reduce_window pool, on Fashion-MNIST-like images with flat black regions (where windows hold tied
    maxima: the two pools split the cotangent differently there, but the parameters' gradients agree)."""

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.max_pool(nn.Conv(10, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
            x = nn.relu(nn.max_pool(nn.Conv(20, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
            x = nn.relu(nn.Dense(50)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 28, 28, 1))
    x[:, :, :8] = 0.0  # a black band: constant conv outputs, tied windows
    x = jnp.asarray(x)
    y = jnp.asarray(rng.integers(0, 10, 8))
    params = models.PaperCNN().init(jax.random.key(0), x)["params"]

    def grads(model):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        return ravel_pytree(jax.grad(loss)(params))[0]

    np.testing.assert_allclose(
        np.asarray(grads(models.PaperCNN())), np.asarray(grads(Reference())), rtol=1e-9, atol=1e-12
    )


def _conv_reference(x, k):
    """Direct float64 loops: y[n, h, w, c] = sum_{i, j, d} x[n, h + i, w + j, d] k[i, j, d, c]."""
    kh, kw = k.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nhwd,dc->nhwc", x[:, i : i + ho, j : j + wo], k[i, j])
    return y


@pytest.mark.parametrize("shape,kshape", [((3, 12, 10, 1), (5, 5, 1, 4)), ((2, 9, 11, 3), (3, 4, 3, 5))])
def test_conv_valid_against_direct_loops(x64, shape, kshape):
    """``conv_valid`` (the CPU's GEMM forms: one-channel views, GEMM + col2im input gradient) equals direct
    float64 loops in value, and its input and kernel gradients equal the loops' adjoints."""
    rng = np.random.default_rng(sum(shape))
    x, k = rng.normal(size=shape), rng.normal(size=kshape)
    y = models.conv_valid(jnp.asarray(x), jnp.asarray(k))
    np.testing.assert_allclose(np.asarray(y), _conv_reference(x, k), rtol=1e-12, atol=1e-12)
    c = rng.normal(size=y.shape)
    dx, dk = jax.grad(lambda x, k: jnp.sum(models.conv_valid(x, k) * c), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
    # adjoints by the reference's linearity: <c, conv(e_x, k)> for each unit input, and the same for k
    kh, kw = kshape[:2]
    ho, wo = y.shape[1:3]
    ref_dk = np.stack(
        [np.stack([np.einsum("nhwd,nhwc->dc", x[:, i : i + ho, j : j + wo], c) for j in range(kw)]) for i in range(kh)]
    )
    ref_dx = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            ref_dx[:, i : i + ho, j : j + wo] += np.einsum("nhwc,dc->nhwd", c, k[i, j])
    np.testing.assert_allclose(np.asarray(dk), ref_dk, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-12, atol=1e-12)
    # under vmap (a batch of workers or runs) as well
    yv = jax.vmap(models.conv_valid, in_axes=(0, None))(jnp.asarray(np.stack([x, 2 * x])), jnp.asarray(k))
    np.testing.assert_allclose(np.asarray(yv[1]), 2 * _conv_reference(x, k), rtol=1e-12, atol=1e-12)


def test_conv_module_is_flax_conv():
    """``models.Conv`` has nn.Conv's parameters, initial values and outputs (float32 rounding)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 14, 3)), jnp.float32)
    ours, ref = models.Conv(6), nn.Conv(6, (5, 5), padding="VALID")
    p_ours, p_ref = ours.init(jax.random.key(3), x), ref.init(jax.random.key(3), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p_ours, p_ref))
    np.testing.assert_allclose(np.asarray(ours.apply(p_ours, x)), np.asarray(ref.apply(p_ref, x)), rtol=1e-5, atol=1e-5)
