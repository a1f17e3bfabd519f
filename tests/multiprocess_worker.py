"""One of two processes of tests/test_multiprocess.py: 4 CPU devices each, gloo collectives.

Usage: python multiprocess_worker.py PROCESS_ID PORT PARALLELISM WORKDIR DATA_DIR
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

from resnet_jax.training import loop  # noqa: E402
from short_run import short_digits_config  # noqa: E402


def main(process_id: int, port: int, parallelism: str, workdir: str, data_dir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  config = short_digits_config(data_dir)
  config.checkpoint_every_steps = 2
  config.parallelism = parallelism
  metrics = loop.train_and_evaluate(config, workdir)
  print("RESULT " + json.dumps({"devices": jax.device_count(), **metrics}), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
