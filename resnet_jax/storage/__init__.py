"""Where a run's files live: local folders and buckets (gs://, s3://), as `epath.Path`s.

`paths` turns a path string into an `epath.Path` and checks that a bucket can be reached;
everything else takes its paths from there. `emulator` runs a local GCS bucket for tests and
the fault table. `file_lock` serialises processes on one host.
"""
