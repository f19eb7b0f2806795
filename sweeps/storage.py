"""Where a sweep's files live when `--out` is an object store URI (s3://, gs://, ...).

Tune's own experiment (checkpoints, experiment state) goes straight to `OUT/ray` through pyarrow's
file systems; the result files (`sweep.json`, `results.jsonl`, `report/`) are written to a local
staging copy and mirrored to the store: `sweep.json` when the sweep starts, `results.jsonl` as rows
arrive (at most every UPLOAD_EVERY_S seconds, and at the end), the report at the end. The store is
the truth: a driver (re)starting a sweep first copies the store's result files into its staging
copy, so a resumed sweep on another machine continues from what the store holds.

The staging copy is `$DISTILL_CACHE/remote/<scheme>/<bucket>/<path>` (default
`~/.cache/distill-sweeps/remote/...`), never inside the checkout.

An S3-compatible store (MinIO, Ceph, moto, R2, ...) is reached through pyarrow's S3 settings: the
environment (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), or query parameters of the URI itself, which travel
with it to every Ray node: `s3://bucket/path?endpoint_override=host:9000&scheme=http`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

SWEEP_FILE = "sweep.json"  # sweeps.results' names, repeated so that this module imports nothing of Ray
RESULTS_FILE = "results.jsonl"
REPORT_DIR = "report"
CACHE_ENV = "DISTILL_CACHE"
UPLOAD_EVERY_S = 5.0  # results.jsonl goes to the store at most this often while a sweep runs (and at its end)


def is_remote(out: str) -> bool:
    return "://" in str(out)


def split_query(uri: str) -> tuple[str, str]:
    """`s3://b/p?endpoint_override=h:1` -> ("s3://b/p", "?endpoint_override=h:1"); ("...", "") without a query."""
    base, mark, query = uri.partition("?")
    return base.rstrip("/"), (mark + query) if mark else ""


def join(uri: str, *parts: str) -> str:
    """`uri`/parts, keeping the URI's query (pyarrow's file-system options) at the end."""
    base, query = split_query(uri)
    return "/".join([base, *(p.strip("/") for p in parts if p)]) + query


def display(uri: str) -> str:
    """The URI without its query, for messages."""
    return split_query(uri)[0]


def cache_root() -> Path:
    """`$DISTILL_CACHE` if set, else `~/.cache/distill-sweeps` (agent.mt_mini caches under it too)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distill-sweeps"


def staging_dir(uri: str) -> Path:
    """The local staging copy of remote OUT `uri`: cache_root()/remote/<scheme>/<bucket>/<path>."""
    parts = urlsplit(display(uri))
    names = [n for n in f"{parts.netloc}/{parts.path}".split("/") if n not in ("", ".", "..")]
    return cache_root().joinpath("remote", parts.scheme or "unknown", *names)


def filesystem(uri: str):
    """(pyarrow FileSystem, path on it) of `uri`."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_reachable(uri: str) -> str | None:
    """None when the store of `uri` can be listed (its bucket exists and the credentials reach it),
    else one line saying why not. Nothing is written."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket if bucket and urlsplit(uri).scheme in ("s3", "gs", "gcs") else path)
    except (OSError, ValueError) as exc:
        return f"cannot reach it: {first_line(exc)}"
    if urlsplit(uri).scheme in ("s3", "gs", "gcs") and info.type == pafs.FileType.NotFound:
        return f"no bucket {bucket!r} there (create it first; endpoint and credentials: see README, object storage)"
    return None


def exists(uri: str, directory: bool = False) -> bool:
    """Whether `uri` is a file (a directory with `directory`) in its store."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        return fs.get_file_info(path).type == (pafs.FileType.Directory if directory else pafs.FileType.File)
    except (OSError, ValueError):
        return False


def read_bytes(uri: str) -> bytes | None:
    """The file at `uri`, or None when there is none (or it cannot be read)."""
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as handle:
            return handle.read()
    except (OSError, ValueError):
        return None


def upload_file(local: Path, uri: str) -> None:
    """Copy one local file to `uri` (one PUT: readers see the old file or the new one)."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as handle:
        handle.write(Path(local).read_bytes())


def upload_results(staging: Path, uri: str, report: bool = True) -> None:
    """Mirror the result files of `staging` (sweep.json, results.jsonl, and report/ when `report`) to OUT `uri`."""
    import pyarrow.fs as pafs

    for name in (SWEEP_FILE, RESULTS_FILE):
        if (staging / name).is_file():
            upload_file(staging / name, join(uri, name))
    if report and (staging / REPORT_DIR).is_dir():
        fs, path = filesystem(join(uri, REPORT_DIR))
        pafs.copy_files(str(staging / REPORT_DIR), path, destination_filesystem=fs)


def copy_dir(source_fs, source: str, destination: str | Path) -> None:
    """Copy directory `source` of pyarrow file system `source_fs` (where Tune stored a checkpoint)
    into `destination`, a local directory or a store URI; files already there are replaced."""
    import pyarrow.fs as pafs

    if is_remote(str(destination)):
        fs, path = filesystem(str(destination))
    else:
        Path(destination).mkdir(parents=True, exist_ok=True)
        fs, path = pafs.LocalFileSystem(), str(Path(destination).resolve())
    pafs.copy_files(source, path, source_filesystem=source_fs, destination_filesystem=fs)


def download_results(uri: str, staging: Path) -> None:
    """Make the staging copy's sweep.json and results.jsonl those of the store (removed where the
    store has none), so that a driver continues from what the store holds. Rows that only the
    staging copy holds are kept when it is a copy of the same sweep (the same sweep.json): a driver
    killed before its last upload loses none of the rows it wrote."""
    from sweeps.results import atomic_write_text, merge_rows, read_rows, write_rows

    staging.mkdir(parents=True, exist_ok=True)
    remote_meta, remote_rows = read_bytes(join(uri, SWEEP_FILE)), read_bytes(join(uri, RESULTS_FILE))
    local_meta = (staging / SWEEP_FILE).read_bytes() if (staging / SWEEP_FILE).is_file() else None
    same_sweep = remote_meta is not None and remote_meta == local_meta
    local_rows = read_rows(staging) if same_sweep else []
    for name, data in ((SWEEP_FILE, remote_meta), (RESULTS_FILE, remote_rows)):
        if data is None:
            (staging / name).unlink(missing_ok=True)
        else:
            atomic_write_text(staging / name, data.decode())
    if local_rows:
        write_rows(staging, merge_rows(read_rows(staging), local_rows))


class ResultsMirror:
    """Uploads a staging copy's results.jsonl to the store when rows were added: at most every
    `every` seconds (`flush(force=True)` at once). A failed upload is reported once on stderr and
    retried at the next flush; the sweep goes on."""

    def __init__(self, staging: Path, uri: str, every: float = UPLOAD_EVERY_S):
        self.staging, self.uri, self.every = Path(staging), uri, every
        self.dirty = False
        self.last = float("-inf")
        self.warned = False

    def changed(self) -> None:
        self.dirty = True
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.dirty or (not force and time.monotonic() - self.last < self.every):
            return
        path = self.staging / RESULTS_FILE
        try:
            if path.is_file():
                upload_file(path, join(self.uri, RESULTS_FILE))
        except (OSError, ValueError) as exc:
            if not self.warned:
                print(f"warning: could not upload {RESULTS_FILE} to {display(self.uri)} ({first_line(exc)}); "
                      "retrying as rows arrive", file=sys.stderr)
                self.warned = True
            return
        self.dirty, self.last = False, time.monotonic()
