"""Building pieces shared by every block: norm factory, shortcuts, squeeze-excite, drop path.

Padding is explicit and symmetric (k // 2 on each side), as in torchvision, so converted
weights give matching logits; XLA's "SAME" pads stride-2 convs asymmetrically.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.ad_checkpoint import checkpoint_name

from resnet_jax.models import onednn

Array = jax.Array
Dtype = Any

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class NormFactory(Protocol):
  """Makes a normalisation layer over `features` channels, named `name`."""

  def __call__(self, features: int, name: str, zero_init: bool = False) -> nn.Module:
    ...


LAYER_IMPLS = ("auto", "onednn", "tuned", "plain")
CONV_OUTPUT = "conv_output"  # every conv's result carries this checkpoint name (remat policies)


def _is_dense(lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None) -> bool:
  """Whether neither the input nor the kernel of a conv is dilated."""
  return all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))


def is_pointwise(rhs_shape: tuple[int, ...], window_strides: Sequence[int], padding: Any,
                 lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
                 feature_group_count: int) -> bool:
  """Whether a conv (HWIO kernel) is a 1×1 one that a strided slice and a matmul compute."""
  no_padding = padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)
  return (tuple(rhs_shape[:2]) == (1, 1) and no_padding and _is_dense(lhs_dilation, rhs_dilation)
          and feature_group_count == 1)


def tuned_conv(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
               lhs_dilation: Sequence[int] | None = None,
               rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
               feature_group_count: int = 1, precision: Any = None,
               preferred_element_type: Any = None) -> Array:
  """`lax.conv_general_dilated` for NHWC × HWIO, in the forms XLA:CPU runs fastest.

  1×1 convs: a matmul over channels (XLA:CPU runs a 1×1 conv 2-2.5× slower than the same
  contraction as a dot; a 1×1 conv's "SAME" padding is zero, so a stride is just a slice).
  Other stride-1 convs: XLA's, with their gradients written out (`conv_with_canonical_grads`).
  The rest (strided, grouped, dilated) go to XLA as they are.
  """
  if not is_pointwise(rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                      feature_group_count):
    if has_canonical_grads(rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                           feature_group_count):
      return conv_with_canonical_grads(lhs, rhs, tuple(map(tuple, padding)), precision,
                                       preferred_element_type)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  stride_h, stride_w = window_strides
  strided = (stride_h, stride_w) != (1, 1)
  x = lhs[:, ::stride_h, ::stride_w, :] if strided else lhs
  return pointwise_matmul(x, rhs, precision, preferred_element_type, strided)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def pointwise_matmul(x: Array, kernel: Array, precision: Any = None,
                     preferred_element_type: Any = None, x_is_strided: bool = False) -> Array:
  """x [..., C_in] @ kernel [1, 1, C_in, C_out]: a 1×1 conv as a matmul over channels.

  Its weight gradient contracts the pixels, which x and the output gradient both hold as
  rows, so XLA:CPU transposes one of them for its matmul. This transposes the one with
  fewer channels, unless `x_is_strided` (a strided slice, which XLA reads scattered into
  the transposed copy: 3-7× slower per element than a contiguous operand here).
  The kernel is kept for the backward pass in its HWIO shape, as the parameter itself:
  under `scan_blocks` a residual that is a slice of the stacked parameters is read from
  them, while its squeezed [C_in, C_out] copy would be stacked again per block (ResNet-152,
  scanned: 18% less temporary memory).
  """
  return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=preferred_element_type)


def _forward_keeping_operands(primal: Callable[..., Array]) -> Callable[..., Any]:
  """A custom VJP's forward pass: `primal`'s output, and its two array operands for later."""

  def forward(x: Array, kernel: Array, *static: Any) -> tuple[Array, tuple[Array, Array]]:
    return primal(x, kernel, *static), (x, kernel)

  return forward


def _matmul_bwd(precision, preferred_element_type, x_is_strided, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  dx = jax.lax.dot_general(dy, kernel[0, 0], (((dy.ndim - 1,), (1,)), ((), ())),
                           precision=precision)
  rows = tuple(range(x.ndim - 1))
  if x.shape[-1] < dy.shape[-1] and not x_is_strided:
    dkernel = jax.lax.dot_general(x, dy, ((rows, rows), ((), ())), precision=precision)
  else:
    dkernel = jax.lax.dot_general(dy, x, ((rows, rows), ((), ())), precision=precision).T
  return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


pointwise_matmul.defvjp(_forward_keeping_operands(pointwise_matmul), _matmul_bwd)


NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def has_canonical_grads(rhs_shape: tuple[int, ...], window_strides: Sequence[int], padding: Any,
                        lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
                        feature_group_count: int) -> bool:
  """Whether `conv_with_canonical_grads` computes this conv: stride 1, dense, ungrouped,
  explicit padding of at most kernel - 1 on each side."""
  if isinstance(padding, str) or feature_group_count != 1 or tuple(window_strides) != (1, 1):
    return False
  if not _is_dense(lhs_dilation, rhs_dilation):
    return False
  return all(0 <= low <= k - 1 and 0 <= high <= k - 1
             for (low, high), k in zip(padding, rhs_shape[:2]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_with_canonical_grads(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...],
                              precision: Any = None, preferred_element_type: Any = None) -> Array:
  """A stride-1 NHWC × HWIO conv whose two gradients are NHWC × HWIO convs as well.

  XLA:CPU hands a convolution to its fast kernels only in the layout NHWC × HWIO → NHWC;
  autodiff's gradient convs have other layouts, and XLA rewrites them (with transposes)
  only outside loops. Inside a loop (`scan_blocks`) it emitted them as plain loop nests,
  slow to compile and 30× slower to run; written out here, they stay fast everywhere.
  """
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=NHWC_HWIO,
                                      precision=precision,
                                      preferred_element_type=preferred_element_type)


def _conv_bwd(padding, precision, preferred_element_type, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  # dx: dy correlated with the kernel turned 180° and its in/out axes swapped.
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  dx_padding = [(k - 1 - low, k - 1 - high) for (low, high), k in zip(padding, kernel.shape[:2])]
  dx = jax.lax.conv_general_dilated(dy, flipped, (1, 1), dx_padding,
                                    dimension_numbers=NHWC_HWIO, precision=precision)
  # dkernel: channels in as the batch, the batch as the contracted features, dy as the kernel.
  dkernel = jax.lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1), padding,
      dimension_numbers=NHWC_HWIO, precision=precision)
  return dx.astype(x.dtype), jnp.transpose(dkernel, (1, 2, 0, 3)).astype(kernel.dtype)


conv_with_canonical_grads.defvjp(_forward_keeping_operands(conv_with_canonical_grads),
                                 _conv_bwd)


def xla_layer_impl() -> str:
  """What "auto" resolves to with XLA's own ops only (no oneDNN): "tuned" on CPU, "plain"
  elsewhere. Exported programs use it: they cannot carry calls into this process."""
  return "tuned" if jax.default_backend() == "cpu" else "plain"


def resolve_layer_impl(impl: str) -> str:
  """"auto": on CPU "onednn" where its kernels are available (`onednn.unavailable_reason`)
  and one device runs the step (XLA cannot split a oneDNN call over a mesh), "tuned" where
  not; "plain" (XLA's own ops) elsewhere. "onednn" is "tuned" with the float32 convolutions
  other than 1×1 on oneDNN."""
  if impl not in LAYER_IMPLS:
    raise ValueError(f"layer_impl={impl!r}: must be one of {', '.join(LAYER_IMPLS)}")
  if impl == "auto":
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
      return xla_layer_impl()
    reason = onednn.unavailable_reason()
    if reason is not None:
      _warn_once(f"layer_impl=auto: XLA's convolutions, not oneDNN's (CIFAR nets train "
                 f"2-2.7× faster with them): {reason}")
    return xla_layer_impl() if reason else "onednn"
  if impl == "onednn" and (reason := onednn.unavailable_reason()) is not None:
    raise ValueError(f"layer_impl=onednn: {reason}. Use layer_impl=tuned or auto.")
  return impl


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


def is_tuned(impl: str) -> bool:
  """Whether `impl` resolves to the tuned layers (with or without oneDNN's convolutions)."""
  return resolve_layer_impl(impl) in ("onednn", "tuned")


def onednn_conv(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                lhs_dilation: Sequence[int] | None = None,
                rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                feature_group_count: int = 1, precision: Any = None,
                preferred_element_type: Any = None) -> Array:
  """`tuned_conv`, with the float32 convs other than 1×1 (matmuls there) on oneDNN: on
  CIFAR shapes 1.3-2.5× XLA:CPU's speed forward, 2-8× in the gradients (`onednn`)."""
  if (not is_pointwise(rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                       feature_group_count)
      and _is_dense(lhs_dilation, rhs_dilation) and feature_group_count == 1
      and onednn.supports(lhs, rhs, window_strides, preferred_element_type)):
    strides = tuple(int(s) for s in window_strides)
    return onednn.conv(lhs, rhs, strides,
                       onednn.explicit_padding(lhs.shape, rhs.shape, strides, padding))
  return tuned_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, precision, preferred_element_type)


def make_conv(dtype: Dtype, param_dtype: Dtype, layer_impl: str = "plain"
              ) -> Callable[..., nn.Conv]:
  """A bias-free conv with torchvision's initialiser and the given dtypes.

  `layer_impl="tuned"` computes them by `tuned_conv`, "onednn" by `onednn_conv`; the
  parameters are the same. Either way the result is named CONV_OUTPUT for remat's
  "conv_outputs_saveable" policy.
  """
  conv = {"onednn": onednn_conv, "tuned": tuned_conv}.get(resolve_layer_impl(layer_impl),
                                                          jax.lax.conv_general_dilated)
  return functools.partial(
      nn.Conv, use_bias=False, kernel_init=conv_kernel_init, dtype=dtype, param_dtype=param_dtype,
      conv_general_dilated=_named_output(conv))


def _named_output(conv: Callable[..., Array]) -> Callable[..., Array]:
  """`conv` with its result named CONV_OUTPUT, so a remat policy can keep it by name."""
  @functools.wraps(conv)
  def named(*args: Any, **kwargs: Any) -> Array:
    return checkpoint_name(conv(*args, **kwargs), CONV_OUTPUT)
  return named


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Any
                     ) -> tuple[Array, Array, Array]:
  """Train-mode BatchNorm over all axes but the last: (output in `dtype`, mean, variance).

  Computes what Flax's BatchNorm does (float32 statistics, variance as E[x²] - E[x]²
  clipped at zero), but its backward pass keeps only x, the mean and 1/√(var + ε), where
  autodiff of Flax's keeps eight values per norm: under `scan_blocks` each is one more
  buffer stacked per block (ResNet-152's scanned step: 123 → 63 of them). The mean and
  variance are for the running averages only: their own gradients are taken as zero.
  """
  return _batch_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_forward(x, scale, bias, epsilon, dtype):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(0.0, jnp.mean(x32 * x32, axes) - mean * mean)
  inv = jax.lax.rsqrt(var + epsilon)
  y = ((x32 - mean) * (inv * scale) + bias).astype(dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, dtype, residuals, cotangents):
  # Σ dy·x̂ as (Σ dy·x − mean·Σ dy)·inv, and dx straight from x and dy: no normalised x̂
  # as an array of its own, which XLA:CPU would write and read back in full (ResNet-50's
  # step at 224², batch 8: temp memory 1,065 → 726 MiB; as accurate, since the forward's
  # E[x²] − E[x]² limits both forms alike).
  x, mean, inv, scale = residuals
  dy = cotangents[0].astype(mean.dtype)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x32 = x.astype(mean.dtype)
  dbias = jnp.sum(dy, axes)
  dscale = (jnp.sum(dy * x32, axes) - mean * dbias) * inv
  dx = (scale * inv / count) * (count * dy - dbias - (x32 - mean) * (inv * dscale))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_bwd)


class TrainBatchNorm(nn.Module):
  """Train-mode nn.BatchNorm (same variables, same outputs) computed by `batch_norm_train`."""

  momentum: float
  epsilon: float
  dtype: Dtype
  param_dtype: Dtype
  scale_init: Callable[..., Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                           (features,))
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, dtype)
    if not self.is_initializing():
      momentum = self.momentum
      ra_mean.value = momentum * ra_mean.value + (1 - momentum) * jax.lax.stop_gradient(mean)
      ra_var.value = momentum * ra_var.value + (1 - momentum) * jax.lax.stop_gradient(var)
    return y


@jax.custom_jvp
def select_relu(x: Array) -> Array:
  """max(x, 0) as a select, with jax.nn.relu's gradient (0 at 0); the same values, NaN kept.

  XLA:CPU fuses a cheap one-input op like max(x, 0) into every elementwise consumer,
  duplicating it. At a block's output that feeds both the next conv and the next residual
  add, each block's fusion then recomputes every earlier block of its stage: the unrolled
  ResNet-152's stage 3 had fusions of 10, 15, ... 186 operands. A select reads two arrays
  (the mask and x), so XLA computes it once: the unrolled ResNet-152 step compiled 42%
  faster and ran 14% faster (224², batch 8).
  """
  return jnp.where(x < 0, jnp.zeros_like(x), x)


select_relu.defjvps(lambda g, ans, x: jax.lax.select(x > 0, g, jax.lax.full_like(g, 0)))


def make_relu(layer_impl: str = "plain") -> Callable[[Array], Array]:
  """`select_relu` for `layer_impl="tuned"`, jax.nn.relu otherwise."""
  return select_relu if is_tuned(layer_impl) else nn.relu


def make_norm(
    kind: str,
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    axis_name: str | None,
    dtype: Dtype,
    param_dtype: Dtype,
    layer_impl: str = "plain",
) -> NormFactory:
  """BatchNorm (statistics in `batch_stats`, synced over `axis_name`) or GroupNorm.

  `zero_init=True` starts the scale at zero: used for the last norm of a residual branch.
  `layer_impl="tuned"` trains BatchNorm (without `axis_name`) by `TrainBatchNorm`: the
  same variables; evaluation is Flax's either way.
  """
  if kind not in ("batch", "group"):
    raise ValueError(f"norm={kind!r}: must be 'batch' or 'group'")
  own_backward = train and axis_name is None and is_tuned(layer_impl)

  def norm(features: int, name: str, zero_init: bool = False) -> nn.Module:
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if kind == "batch":
      if own_backward:
        return TrainBatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype,
                              param_dtype=param_dtype, scale_init=scale_init, name=name)
      return nn.BatchNorm(
          use_running_average=not train, momentum=momentum, epsilon=epsilon,
          axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init,
          name=name)
    # 32 groups (Wu & He, 2018), fewer where a layer has fewer channels (CIFAR nets).
    return nn.GroupNorm(
        num_groups=math.gcd(32, features), epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, scale_init=scale_init, name=name)

  return norm


def conv_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """torchvision's symmetric padding for an odd kernel."""
  return ((kernel_size // 2, kernel_size // 2),) * 2


def max_pool_3x3_s2(x: Array, layer_impl: str = "plain") -> Array:
  """The ImageNet stem's max-pool (3×3, stride 2, padding 1).

  "tuned": the maximum of three strided row slices, then of three strided column slices of
  that. Same output; its gradient is elementwise selects, which XLA:CPU runs several times
  faster than reduce-window's select-and-scatter (BENCHMARKS.md). (The two split a gradient
  differently only between equal maxima: after a ReLU, zeros, whose gradient the ReLU drops
  anyway.)
  """
  if resolve_layer_impl(layer_impl) == "plain":
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  height, width = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2  # outputs per side
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  rows = functools.reduce(jnp.maximum, [padded[:, i:i + 2 * height - 1:2] for i in range(3)])
  return functools.reduce(jnp.maximum, [rows[:, :, j:j + 2 * width - 1:2] for j in range(3)])


class Shortcut(nn.Module):
  """The skip connection of a residual block, for every kind of ResNet.

  - identity when shape is unchanged;
  - "projection": 1×1 conv "conv" (with the block's stride) + norm "bn" (option B, torchvision);
  - "avgpool": 2×2 average pool, then 1×1 conv + norm (ResNet-D, Bag of Tricks);
  - "zero_pad": strided identity with zero-padded channels, no parameters (option A,
    the CIFAR nets of He et al. 2015).
  `norm=None` leaves the projection un-normalised (pre-activation blocks).
  """

  kind: str
  features: int
  strides: int
  conv: Callable[..., nn.Conv]
  norm: NormFactory | None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.shape[-1] == self.features and self.strides == 1:
      return x
    if self.kind == "zero_pad":
      x = x[:, ::self.strides, ::self.strides, :]
      pad = self.features - x.shape[-1]
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    if self.kind == "avgpool":
      if self.strides > 1:
        x = nn.avg_pool(x, (self.strides, self.strides), strides=(self.strides, self.strides),
                        padding="SAME", count_include_pad=False)
      x = self.conv(self.features, (1, 1), name="conv")(x)
    elif self.kind == "projection":
      x = self.conv(self.features, (1, 1), strides=self.strides, name="conv")(x)
    else:
      raise ValueError(f"shortcut={self.kind!r}: must be 'projection', 'avgpool', 'zero_pad' "
                       "or 'none'")
    if self.norm is not None:
      x = self.norm(self.features, "bn")(x)
    return x


class SqueezeExcite(nn.Module):
  """Channel attention (Hu et al., 2018): x * sigmoid(fc2(relu(fc1(mean(x)))))."""

  reduced_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype,
                              param_dtype=self.param_dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(dense(self.reduced_features, name="fc1")(s))
    s = nn.sigmoid(dense(x.shape[-1], name="fc2")(s))
    return x * s


def drop_path(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
  """Stochastic depth: zeroes the whole residual branch of some examples in training.

  Randomness comes from the module's explicit "drop_path" PRNG stream; eval is the identity.
  `rate` may be traced (a scanned input of scanned blocks).
  """
  if not train or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(module.make_rng("drop_path"), keep_prob, (x.shape[0], 1, 1, 1))
  return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))
