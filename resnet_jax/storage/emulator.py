"""A local GCS bucket: the `gcp-storage-emulator` package's server on 127.0.0.1.

The tests and the fault table run against it instead of a mock: gcsfs (run files), orbax's
tensorstore (checkpoint arrays) and JAX's compilation cache reach it as they would reach
Google Cloud Storage, once `environment()`'s variables are set:
- `STORAGE_EMULATOR_HOST`: gcsfs (and google-cloud-storage) talk to it, without credentials;
- `TENSORSTORE_GCS_HTTP_URL` and `GOOGLE_AUTH_TOKEN_FOR_TESTING`: tensorstore does;
- `EPATH_USE_TF=false`: etils sends gs:// through fsspec (see `paths`);
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs does not ask the storage-control API,
  which the emulator lacks, what kind of bucket it is (a warning on every call otherwise).
In-memory mode is the fast one; on-disk mode (`data_dir`) keeps the objects when the server
stops, for a restart on the same port.

The emulator's downloads lack two things GCS does and tensorstore relies on: the
`x-goog-generation` header, and the preconditions `ifGenerationMatch` (412 when the object's
generation differs) and `ifGenerationNotMatch` (304 when it is the same). Without them
tensorstore's OCDBT manifests (every orbax save) failed with "Malformed StorageGeneration" in
up to 9 of 20 saves. `serve` (this module run as a program) adds them before starting it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LocalBucket:
  """One emulated bucket, served from a subprocess while started (a context manager)."""

  def __init__(self, bucket: str = "resnet-jax-test", data_dir: str | None = None,
               port: int | None = None):
    if len(bucket) < 3:  # tensorstore rejects shorter names, as GCS does
      raise ValueError(f"bucket name {bucket!r}: GCS bucket names have at least 3 characters")
    self.bucket, self.data_dir = bucket, data_dir
    self.port = port or free_port()
    self._server: subprocess.Popen | None = None

  @property
  def url(self) -> str:
    """gs://BUCKET, the root of the bucket's paths."""
    return f"gs://{self.bucket}"

  @property
  def endpoint(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def environment(self) -> dict[str, str]:
    """The variables that point gcsfs, tensorstore and etils at this bucket."""
    return {"STORAGE_EMULATOR_HOST": self.endpoint, "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def start(self, timeout: float = 30) -> LocalBucket:
    """Starts the server (with the bucket created) and waits until it accepts connections."""
    storage = ["-d", self.data_dir] if self.data_dir else []
    mode = [] if self.data_dir else ["--in-memory"]
    self._server = subprocess.Popen(
        [sys.executable, "-m", __name__, *storage, "start", "--host=127.0.0.1",
         f"--port={self.port}", f"--default-bucket={self.bucket}", *mode],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._server.poll() is not None:
        raise RuntimeError(f"the storage emulator exited at start (code {self._server.returncode});"
                           f" is port {self.port} free?")
      try:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
          return self
      except OSError:
        time.sleep(0.05)
    self.stop()
    raise RuntimeError(f"the storage emulator did not listen on port {self.port} in {timeout} s")

  def stop(self) -> None:
    """Ends the server; in-memory objects are gone, on-disk ones stay for `start`."""
    if self._server is not None:
      self._server.terminate()
      try:
        self._server.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._server.kill()
        self._server.wait()
      self._server = None

  def __enter__(self) -> LocalBucket:
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()


def use(bucket: LocalBucket) -> None:
  """Points this process (and the processes it starts) at `bucket`.

  Call it before the first bucket access: gcsfs and tensorstore read the variables once.
  """
  os.environ.update(bucket.environment())


def _download_as_gcs(original, request, response, storage, *args, **kwargs) -> None:
  """The emulator's download, with GCS's generation header and read preconditions."""
  from http import HTTPStatus
  try:
    stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 - missing: the emulator's own 404
    return original(request, response, storage, *args, **kwargs)
  generation = str(stored["generation"])
  match = request.query.get("ifGenerationMatch", [None])[0]
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(stored["metageneration"])
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  return original(request, response, storage, *args, **kwargs)


def serve(argv: list[str]) -> None:
  """`gcp-storage-emulator ARGV`, its downloads made to behave as GCS's (see above)."""
  import functools
  from gcp_storage_emulator import server
  from gcp_storage_emulator.__main__ import main
  from gcp_storage_emulator.handlers import objects
  patched = functools.partial(_download_as_gcs, objects.download)
  for _, methods in server.HANDLERS:  # the routes that name it directly...
    for method, handler in list(methods.items()):
      if handler is objects.download:
        methods[method] = patched
  objects.download = patched  # ...and objects.get, which calls it for ?alt=media
  main(argv)


if __name__ == "__main__":
  serve(sys.argv[1:])
