"""PyTorch's train step of our model, timed as a reference for `bench.throughput --compare_torch`.

The same model, batch and image size as ours (torchvision's ResNets; for the paper's CIFAR
nets, `interop.torch_cifar`), trained the usual PyTorch way: SGD with momentum 0.9 and
weight decay 1e-4, cross-entropy, `zero_grad`/`backward`/`step`. Float32 on CPU; on CUDA,
bfloat16 or float16 autocast (AMP) when ours runs in those dtypes. Timed in NCHW and in
channels-last memory format, which is faster on most CPUs and GPUs. Needs `torch`, and
`torchvision` for its models (neither is a dependency of resnet_jax).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from resnet_jax.models import create_model


@dataclasses.dataclass(frozen=True)
class TorchResult:
  source: str  # "torchvision", or "torch_cifar" (the paper's CIFAR nets, interop.torch_cifar)
  memory_format: str  # "nchw" or "channels_last"
  device: str
  autocast_dtype: str  # "" when not autocasting
  step_time_ms: float
  images_per_sec: float


def is_cifar_net(model: str) -> bool:
  """Whether `model` is one of the paper's CIFAR nets (compared with interop.torch_cifar)."""
  return create_model(model).stem == "cifar"


def torch_available(model: str) -> bool:
  """Whether what `model`'s PyTorch reference needs is installed."""
  try:
    import torch  # noqa: F401
    if not is_cifar_net(model):
      import torchvision  # noqa: F401
  except ImportError:
    return False
  return True


def torch_model(model: str, num_classes: int):
  """(source, the PyTorch twin of registry model `model`)."""
  if is_cifar_net(model):
    from resnet_jax.interop import torch_cifar
    return "torch_cifar", torch_cifar.cifar_resnet(model, num_classes=num_classes)
  import torchvision
  if not hasattr(torchvision.models, model):
    raise ValueError(f"torchvision has no model {model!r} to compare with")
  return "torchvision", getattr(torchvision.models, model)(num_classes=num_classes)


@dataclasses.dataclass(frozen=True)
class StepTimer:
  """One more PyTorch train step of a model on one batch, timed: `time_one_step()` seconds."""

  source: str
  device: str
  autocast_dtype: str  # "" when not autocasting
  time_one_step: Callable[[], float]


def step_timer(model: str, images, labels, *, channels_last: bool, dtype: str = "float32",
               num_classes: int = 1000) -> StepTimer:
  """A timer of the PyTorch twin's train step on `images` (NCHW float) and `labels`.

  SGD with momentum 0.9 and weight decay 1e-4, cross-entropy, zero_grad/backward/step;
  float32 on CPU; on CUDA, bfloat16 or float16 autocast (AMP) when `dtype` is one of those.
  """
  import torch

  source, net = torch_model(model, num_classes)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
  if device == "cpu":
    autocast = None  # CPU autocast is a different, slower path; compare float32 with float32
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(device, memory_format=memory_format).train()
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  scaler = torch.amp.GradScaler(device, enabled=autocast == torch.float16)
  images = images.to(device, memory_format=memory_format)
  labels = labels.to(device)

  def time_one_step() -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
      loss = torch.nn.functional.cross_entropy(net(images), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  return StepTimer(source, device, str(autocast).removeprefix("torch.") if autocast else "",
                   time_one_step)


def time_torch(model: str, *, batch_size: int, image_size: int, dtype: str, steps: int,
               warmup_steps: int, channels_last: bool, num_classes: int = 1000) -> TorchResult:
  """Mean train-step time of the PyTorch twin of `model` on random images (after warm-up)."""
  import torch

  generator = torch.Generator().manual_seed(0)
  images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
  labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
  timer = step_timer(model, images, labels, channels_last=channels_last, dtype=dtype,
                     num_classes=num_classes)
  for _ in range(max(warmup_steps, 1)):
    timer.time_one_step()
  step_s = sum(timer.time_one_step() for _ in range(steps)) / steps
  return TorchResult(timer.source, "channels_last" if channels_last else "nchw", timer.device,
                     timer.autocast_dtype, step_s * 1e3, batch_size / step_s)
