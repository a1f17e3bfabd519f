"""Float32 NHWC × HWIO convolutions and their gradients on oneDNN, through XLA's FFI (CPU).

oneDNN is the library PyTorch's CPU convolutions run on. On the CIFAR ResNets' 3×3 convs
(batch 128, 16-64 channels) it computes the forward pass 1.3-2.5× faster than XLA:CPU's own
kernels (YNNPACK, Eigen), the input gradient 1.9-2.8× and the weight gradient 4.5-8×
(BENCHMARKS.md, "CIFAR-size nets against PyTorch"). `conv` is a custom VJP whose forward pass
and both gradients are oneDNN calls; outputs and gradients equal XLA's to float32 rounding
(tests/test_onednn.py).

The kernels (`onednn_conv.cc`) are compiled on first use, with the C++ compiler ($CXX or
g++), against the oneDNN wheels (`onednn-cpu-gomp`, headers from `onednn-devel-cpu-gomp`:
Linux x86-64) and jaxlib's FFI headers, into $XDG_CACHE_HOME/resnet_jax (~/.cache). Where any
of these is missing, `unavailable_reason()` says which and `layer_impl="auto"` keeps XLA's
convolutions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Array = jax.Array
SOURCE = os.path.join(os.path.dirname(__file__), "onednn_conv.cc")
HANDLERS = {"forward": "OnednnConvForward", "input_grad": "OnednnConvInputGrad",
            "weight_grad": "OnednnConvWeightGrad"}
TARGET_PREFIX = "resnet_jax_onednn_conv_"


class OnednnUnavailable(RuntimeError):
  """oneDNN's convolutions cannot be used here (no wheel, no compiler, not Linux x86-64)."""


def _find_onednn() -> tuple[str, str]:
  """(include dir, lib dir) of the installed oneDNN wheels, in this environment or the user's."""
  for prefix in dict.fromkeys((sys.prefix, site.getuserbase())):
    include, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib")
    if (os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"))
        and os.path.exists(os.path.join(lib, "libdnnl.so"))):
      return include, lib
  raise OnednnUnavailable(
      f"no oneDNN headers and library under {sys.prefix} (pip install onednn-cpu-gomp "
      "onednn-devel-cpu-gomp; Linux x86-64 only)")


def _cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  path = os.path.join(root, "resnet_jax")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    path = os.path.join(tempfile.gettempdir(), "resnet_jax_cache")
    os.makedirs(path, exist_ok=True)
  return path


def _build() -> str:
  """The compiled kernels' shared library, compiled now unless the cache holds this build."""
  if sys.platform != "linux":
    raise OnednnUnavailable(f"the oneDNN wheels are for Linux; this is {sys.platform}")
  include, lib = _find_onednn()
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise OnednnUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
  with open(SOURCE, "rb") as f:
    source = f.read()
  fingerprint = hashlib.sha256(b"\0".join(
      [source, jax.ffi.include_dir().encode(), include.encode(), lib.encode(),
       compiler.encode(), jax.__version__.encode()])).hexdigest()[:16]
  library = os.path.join(_cache_dir(), f"onednn_conv-{fingerprint}.so")
  if os.path.exists(library):
    return library
  partial = f"{library}.{os.getpid()}.tmp"  # processes compiling at once each write their own
  command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-I{jax.ffi.include_dir()}", f"-I{include}", SOURCE, f"-L{lib}", "-ldnnl",
             f"-Wl,-rpath,{lib}", "-o", partial]
  logging.info("Compiling the oneDNN convolution kernels: %s", " ".join(command))
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise OnednnUnavailable(f"compiling {SOURCE} failed:\n{result.stderr[-2000:]}")
  os.replace(partial, library)
  return library


@functools.cache
def _registration() -> str | None:
  """Compiles, loads and registers the kernels once; None, or why they are unavailable."""
  try:
    library = ctypes.CDLL(_build())
  except (OnednnUnavailable, OSError) as e:
    return str(e)
  for op, symbol in HANDLERS.items():
    jax.ffi.register_ffi_target(TARGET_PREFIX + op, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return None


def unavailable_reason() -> str | None:
  """None where oneDNN's convolutions can run here; otherwise why not."""
  return _registration()


def supports(lhs: Array, rhs: Array, window_strides: Sequence[int],
             preferred_element_type: Any) -> bool:
  """Whether `conv` computes this dense, ungrouped NHWC × HWIO conv: 2-D, float32."""
  return (lhs.ndim == 4 and rhs.ndim == 4 and len(window_strides) == 2
          and lhs.dtype == rhs.dtype == jnp.float32
          and preferred_element_type in (None, jnp.float32) and lhs.shape[0] > 0)


def _attributes(strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> dict:
  (top, bottom), (left, right) = padding
  return {name: np.int64(value) for name, value in zip(
      ("stride_h", "stride_w", "pad_top", "pad_bottom", "pad_left", "pad_right"),
      (*strides, top, bottom, left, right))}


def _call(op: str, result_shape: tuple[int, ...], a: Array, b: Array,
          strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> Array:
  reason = _registration()
  if reason is not None:
    raise OnednnUnavailable(reason)
  result = jax.ShapeDtypeStruct(result_shape, jnp.float32)
  # Under vmap (populations) each member is its own call, in a loop.
  return jax.ffi.ffi_call(TARGET_PREFIX + op, result, vmap_method="sequential")(
      a, b, **_attributes(strides, padding))


def explicit_padding(x_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int], padding: Any) -> tuple[tuple[int, int], ...]:
  """`padding` ("SAME", "VALID" or pairs) as ((top, bottom), (left, right))."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding)
  return tuple((int(low), int(high)) for low, high in padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: Array, kernel: Array, strides: tuple[int, int],
         padding: tuple[tuple[int, int], ...]) -> Array:
  """x [N, H, W, C] ⋆ kernel [KH, KW, C, O] → [N, OH, OW, O], float32, on oneDNN."""
  out_shape = jax.eval_shape(functools.partial(
      jax.lax.conv_general_dilated, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC")), x, kernel).shape
  return _call("forward", out_shape, x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(jnp.float32)
  dx = _call("input_grad", x.shape, dy, kernel, strides, padding)
  dkernel = _call("weight_grad", kernel.shape, x, dy, strides, padding)
  return dx, dkernel


conv.defvjp(_conv_fwd, _conv_bwd)
