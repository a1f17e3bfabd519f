"""TensorFlow, imported without the lines its C++ libraries print to stderr as they load.

Importing TensorFlow prints, twice, "All log messages before absl::InitializeLog() is called
are written to STDERR" and "oneDNN custom operations are on ..." (absl's C++ logging, which
TF_CPP_MIN_LOG_LEVEL does not reach). They mean nothing to a user of the input pipeline.
Turning oneDNN off would silence them but cost the imagenet-preset pipeline about a tenth of
its throughput here, so instead stderr is captured while TensorFlow loads and written back
without them; anything else it printed still shows. RESNET_JAX_VERBOSE=1 (train.py
--verbose) shows everything.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

NOISE = re.compile(r"All log messages before absl::InitializeLog\(\)|"
                   r"oneDNN custom operations are on|cpu_feature_guard\.cc|"
                   r"^To enable the following instructions: .*rebuild TensorFlow")


def import_tensorflow() -> None:
  """Imports TensorFlow (once), dropping its loading noise from stderr (see above)."""
  if "tensorflow" in sys.modules or os.environ.get("RESNET_JAX_VERBOSE") == "1":
    import tensorflow  # noqa: F401
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      printed = captured.read().decode(errors="replace")
      sys.stderr.write("".join(line for line in printed.splitlines(keepends=True)
                               if not NOISE.search(line)))
