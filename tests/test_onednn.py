"""oneDNN's convolutions (resnet_jax/models/onednn.py) against XLA's, and the fallback."""

import functools
import os
import platform
import subprocess
import sys

import chex
import jax
import pytest

from resnet_jax.models import layers, onednn

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the oneDNN wheels are for Linux x86-64")
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def test_the_kernels_compile_and_load_where_the_wheels_install():
  assert onednn.unavailable_reason() is None


def conv_and_grads(conv, x, kernel, dy):
  y, vjp = jax.vjp(conv, x, kernel)
  return y, *vjp(dy)


def xla_conv(strides, padding, x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC_HWIO)


def onednn_conv(strides, padding, x, kernel):
  explicit = onednn.explicit_padding(x.shape, kernel.shape, strides, padding)
  return onednn.conv(x, kernel, strides, explicit)


def random_operands(x_shape, kernel_shape, strides, padding):
  keys = jax.random.split(jax.random.key(0), 3)
  x, kernel = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], kernel_shape)
  y_shape = jax.eval_shape(functools.partial(xla_conv, strides, padding), x, kernel).shape
  return x, kernel, jax.random.normal(keys[2], y_shape)


@pytest.mark.parametrize("x_shape,kernel_shape,strides,padding", [
    ((4, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),  # a CIFAR block's conv
    ((4, 8, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # its stage's first, strided
    ((2, 9, 7, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),  # the ImageNet stem, odd sides
    ((2, 6, 7, 4), (3, 3, 4, 5), (1, 2), ((0, 2), (1, 0))),  # asymmetric strides and padding
    ((2, 6, 6, 4), (3, 3, 4, 5), (1, 1), "SAME"),
    ((2, 7, 7, 4), (2, 2, 4, 5), (2, 2), "VALID"),
    ((3, 5, 5, 8), (1, 1, 8, 4), (2, 2), ((0, 0), (0, 0))),
])
def test_conv_and_its_gradients_equal_xla_and_repeat_bitwise(x_shape, kernel_shape, strides,
                                                             padding):
  operands = random_operands(x_shape, kernel_shape, strides, padding)
  ours = jax.jit(functools.partial(conv_and_grads,
                                   functools.partial(onednn_conv, strides, padding)))
  xla = jax.jit(functools.partial(conv_and_grads, functools.partial(xla_conv, strides, padding)))
  got = ours(*operands)
  chex.assert_trees_all_close(got, xla(*operands), rtol=1e-5, atol=1e-4)
  chex.assert_trees_all_equal(ours(*operands), got)  # resumed runs rely on the same bits


def test_conv_under_vmap_is_each_members_conv():
  # A population's members: each its own input and kernel.
  strides, padding = (2, 2), ((1, 1), (1, 1))
  members = [random_operands((2, 6, 6, 4), (3, 3, 4, 8), strides, padding) for _ in range(3)]
  members = [tuple(a * (i + 1) for a in operands) for i, operands in enumerate(members)]
  stacked = jax.tree.map(lambda *a: jax.numpy.stack(a), *members)
  grads = functools.partial(conv_and_grads, functools.partial(onednn_conv, strides, padding))
  got = jax.jit(jax.vmap(grads))(*stacked)
  for i, operands in enumerate(members):
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[i], got), jax.jit(grads)(*operands))


def test_onednn_layers_run_the_3x3_convs_on_onednn_and_the_1x1_as_matmuls():
  x, kernel3, _ = random_operands((2, 6, 6, 4), (3, 3, 4, 8), (1, 1), "SAME")
  kernel1 = kernel3[1:2, 1:2]
  hlo = jax.jit(lambda x: layers.onednn_conv(x, kernel3, (1, 1), ((1, 1), (1, 1)))).lower(x)
  assert onednn.TARGET_PREFIX + "forward" in hlo.as_text()
  hlo = jax.jit(lambda x: layers.onednn_conv(x, kernel1, (1, 1), ((0, 0), (0, 0)))).lower(x)
  assert "custom_call" not in hlo.as_text() and "dot_general" in hlo.as_text()
  half = jax.jit(lambda x: layers.onednn_conv(x.astype("bfloat16"), kernel3.astype("bfloat16"),
                                              (1, 1), ((1, 1), (1, 1)))).lower(x)
  assert "custom_call" not in half.as_text()  # bfloat16: XLA's


def test_auto_falls_back_to_xla_with_a_warning_and_onednn_names_why(tmp_path):
  code = ("from resnet_jax.models import layers\n"
          "print('auto ->', layers.resolve_layer_impl('auto'))\n"
          "layers.resolve_layer_impl('onednn')\n")
  env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
         "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one device, as a user's run
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
  assert "auto -> tuned" in result.stdout
  assert "XLA's convolutions, not oneDNN's" in result.stderr
  assert result.returncode != 0
  assert "layer_impl=onednn: no C++ compiler" in result.stderr.strip().splitlines()[-1]
